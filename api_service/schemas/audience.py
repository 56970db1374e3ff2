"""Request and response bodies of /v1/contacts and /v1/lists, and the checks the struct types cannot do.

An import checks 10,000 contacts per request, so the checks work column by column, not in a Python
loop per contact (shared/audience/fields.py has the field rules and their fast paths).
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from api_service.problems import problem
from api_service.schemas.common import NO_NUL, Input, Name
from shared.audience.contacts import (
    ATTRIBUTES,
    COLUMNS,
    EMAIL,
    LOCALE,
    PHONE,
    PUSH_TOKENS,
    TELEGRAM_CHAT_ID,
    TIMEZONE,
    WHATSAPP,
    ContactBatch,
    ContactChanges,
)
from shared.audience.fields import (
    LOCALE_REASON,
    MAX_PUSH_TOKEN_CHARS,
    MAX_PUSH_TOKENS,
    PUSH_TOKEN_PATTERN,
    PUSH_TOKEN_REASON,
    TIMEZONE_REASON,
    all_e164,
    all_fast_emails,
    canonical_locale,
    canonical_timezone,
    checked_email,
    e164,
    region_problem,
    shape_problems,
    telegram_chat_id_problem,
    unique_tokens,
)
from shared.kernel import limits as lim

MAX_CONTACTS = 10_000  # per POST /v1/contacts
MAX_MEMBERS = 100_000  # ids per membership change
MAX_ERRORS = 50  # a 10,000-item import with a systematic mistake gets a readable answer
# A contact's attributes as JSON: every batch job carries them, and nats-server refuses a message
# over 1 MiB, so a contact beyond that could never be sent to (shared/kernel/limits.py).
MAX_ATTRIBUTES_BYTES = lim.MAX_ATTRIBUTES_BYTES
MAX_PHONE_CHARS = 64  # a number as people write it: "+1 (415) 555-0100", "0044 20 7946 0958"

ExternalId = Annotated[str, Meta(min_length=1, max_length=255, pattern=NO_NUL,
                                 description="your id for the contact: the upsert key")]
Email = Annotated[str, Meta(max_length=254, examples=["ada@example.com"])]
Phone = Annotated[str, Meta(
    max_length=MAX_PHONE_CHARS, examples=["+14155550100", "+1 (415) 555-0100", "030 1234567"],
    description="stored in E.164; any format phonenumbers parses, a national number with `phone_region`",
)]
PhoneRegion = Annotated[str, Meta(
    min_length=2, max_length=2, pattern="^[A-Za-z]{2}$", examples=["DE", "US"],
    description="where `phone` and `whatsapp` are national numbers (ISO 3166-1 alpha-2); not stored",
)]
ContactId = Annotated[int, Meta(ge=1, le=2**63 - 1)]
Locale = Annotated[str, Meta(max_length=35, description="a BCP 47 tag", examples=["en", "pt-BR"])]
TimeZone = Annotated[str, Meta(max_length=lim.MAX_TIMEZONE_CHARS, description="an IANA time zone",
                               examples=["Europe/Berlin", "America/New_York"])]
TelegramChatId = (
    Annotated[str, Meta(max_length=33, examples=["123456789", "-1001234567890", "@channelname"],
                        description="a chat id (an integer, also as a JSON number) or a channel's @username")]
    | Annotated[int, Meta(ge=-(10**16), le=10**16)]
)
PushToken = Annotated[str, Meta(min_length=1, max_length=MAX_PUSH_TOKEN_CHARS, pattern=PUSH_TOKEN_PATTERN)]
PushTokens = Annotated[list[PushToken], Meta(
    max_length=MAX_PUSH_TOKENS, description=f"device tokens (FCM, APNs), at most {MAX_PUSH_TOKENS}; repeats are dropped",
)]


def _attributes_type() -> Any:
    """The attributes object as a type, so that msgspec checks the key count, key length and depth while
    it decodes (in C, no pass per contact) and the OpenAPI schema shows them: an object of at most
    MAX_ATTRIBUTE_KEYS keys whose values are scalars, arrays or objects, MAX_ATTRIBUTE_DEPTH levels deep."""
    key = Annotated[str, Meta(max_length=lim.MAX_ATTRIBUTE_KEY_CHARS)]
    value: Any = str | int | float | bool | None
    for _ in range(lim.MAX_ATTRIBUTE_DEPTH - 1):
        value = str | int | float | bool | None | list[value] | Annotated[dict[key, value], Meta(max_length=lim.MAX_ATTRIBUTE_KEYS)]
    return Annotated[
        dict[key, value],
        Meta(
            max_length=lim.MAX_ATTRIBUTE_KEYS,
            description=(
                f"your variables for templates (`attributes.plan`): at most {lim.MAX_ATTRIBUTE_KEYS} keys per object, "
                f"keys of at most {lim.MAX_ATTRIBUTE_KEY_CHARS} characters, {lim.MAX_ATTRIBUTE_DEPTH} levels of "
                f"objects and arrays, {lim.MAX_ATTRIBUTES_BYTES:,} bytes as JSON "
                f"({lim.MAX_STORED_ATTRIBUTES_BYTES:,} once merged into the stored ones)"
            ),
        ),
    ]


Attributes = _attributes_type()
_TOO_DEEP = re.compile(r"Expected `bool \| int \| float \| str \| null`, got `(?:array|object)` - at `(\$[^`]*?\.attributes)[^`]*`")
_KEY = re.compile(r"Expected `str` of length <= (\d+) - at `key` in `(\$[^`]*)`")
_PUSH_TOKEN = re.compile(r"Expected `str` (?:of length [<>]= \d+|matching regex .*) - at `(\$[^`]*\.push_tokens\[\d+\])`")
_TOO_MANY_TOKENS = re.compile(r"Expected `array` of length <= \d+ - at `(\$[^`]*\.push_tokens)`")


def decode_problem(message: str) -> str:
    """msgspec's message about a contact, said in terms of the attribute limits where it is about them
    (still ending in msgspec's "- at `$path`", from which the 422 takes the field)."""
    if m := _TOO_DEEP.search(message):
        return f"nested deeper than {lim.MAX_ATTRIBUTE_DEPTH} levels of objects and arrays - at `{m.group(1)}`"
    if m := _KEY.search(message):
        return f"a key is longer than {m.group(1)} characters - at `{m.group(2)}`"
    if m := _PUSH_TOKEN.search(message):
        return f"{PUSH_TOKEN_REASON} - at `{m.group(1)}`"
    if m := _TOO_MANY_TOKENS.search(message):
        return f"at most {MAX_PUSH_TOKENS} push tokens - at `{m.group(1)}`"
    return message.replace("Expected `object` of length <=", "more keys than")


class ContactIn(Input, kw_only=True, gc=False):  # not tracked by the GC: 10,000 per request, no cycles
    """A contact to create or update. With an `external_id` the tenant already has, the fields given
    replace the stored ones (null clears one), fields left out are kept, and `attributes` are merged
    key by key into the stored ones. Stored in normal forms: `email` as email-validator normalises it
    (the domain in lower case), `phone` and `whatsapp` in E.164, `locale` in canonical case
    (pt_br: pt-BR), `timezone` as the IANA database spells it, `push_tokens` without repeats."""

    external_id: ExternalId | None = None
    email: Email | None | UnsetType = UNSET
    phone: Phone | None | UnsetType = UNSET
    phone_region: PhoneRegion | None | UnsetType = UNSET
    whatsapp: Phone | None | UnsetType = UNSET
    telegram_chat_id: TelegramChatId | None | UnsetType = UNSET
    push_tokens: PushTokens | None | UnsetType = UNSET
    locale: Locale | None | UnsetType = UNSET
    timezone: TimeZone | None | UnsetType = UNSET
    attributes: Attributes | UnsetType = UNSET  # type: ignore[valid-type]


class ContactPatch(Input, kw_only=True):
    """The fields to change: each one given replaces the stored one (null clears it), fields left out
    are kept. `attributes` is a JSON merge patch (RFC 7396): a key given replaces the stored value,
    an object is merged into a stored object the same way, a null removes the key, keys left out are
    kept; `"attributes": null` removes them all. `push_tokens` given replaces the whole list."""

    external_id: ExternalId | None | UnsetType = UNSET
    email: Email | None | UnsetType = UNSET
    phone: Phone | None | UnsetType = UNSET
    phone_region: PhoneRegion | None | UnsetType = UNSET
    whatsapp: Phone | None | UnsetType = UNSET
    telegram_chat_id: TelegramChatId | None | UnsetType = UNSET
    push_tokens: PushTokens | None | UnsetType = UNSET
    locale: Locale | None | UnsetType = UNSET
    timezone: TimeZone | None | UnsetType = UNSET
    attributes: Attributes | None | UnsetType = UNSET  # type: ignore[valid-type]


class Contact(msgspec.Struct, kw_only=True):
    id: int
    external_id: str | None
    email: str | None
    phone: str | None  # E.164
    whatsapp: str | None  # E.164
    telegram_chat_id: str | None
    push_tokens: list[str]
    locale: str | None
    timezone: str | None
    attributes: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class ContactsImported(msgspec.Struct, kw_only=True):
    """The answer to an array: counts of distinct contacts, and the id of each item in request order."""

    created: int
    updated: int
    ids: list[int]


class ListCreate(Input, kw_only=True):
    name: Name


class ContactList(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    name: str
    member_count: int
    created_at: datetime


class MembersChange(Input, kw_only=True):
    """Exactly one of the two: contacts by Crier id, or by your external id."""

    contact_ids: Annotated[list[ContactId], Meta(max_length=MAX_MEMBERS)] | None = None
    external_ids: Annotated[list[ExternalId], Meta(max_length=MAX_MEMBERS)] | None = None


class MembersAdded(msgspec.Struct, kw_only=True):
    added: int  # contacts that were not members before
    member_count: int


class MembersRemoved(msgspec.Struct, kw_only=True):
    removed: int  # contacts that were members before
    member_count: int


# -- checks --------------------------------------------------------------------------------------

_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")  # \u0000, not an escaped backslash and u0000
NUL = lim.PATTERN_REASONS[lim.NO_NUL_PATTERN]  # Postgres stores no NUL in text or jsonb


class _Errors:
    def __init__(self, array: bool) -> None:
        self.array = array
        self.found: list[tuple[int, str, str]] = []

    def add(self, index: int, field: str, reason: str) -> None:
        self.found.append((index, field, reason))

    def raise_any(self) -> None:
        if not self.found:
            return
        self.found.sort(key=lambda e: e[0])  # by item, then in field order (the sort is stable)
        errors = [{"field": f"[{i}].{f}" if self.array else f, "reason": r} for i, f, r in self.found[:MAX_ERRORS]]
        detail = "; ".join(f"{e['field']}: {e['reason']}" for e in errors[:5])
        if len(self.found) > 5:
            detail += f"; and {len(self.found) - 5} more"
        raise problem(422, detail, errors=errors)


def _given(column: list[Any], bit: int, n: int) -> int | None:
    """The bit if every item gives the field, 0 if none does, None if some do."""
    missing = column.count(UNSET)
    return bit if missing == 0 else 0 if missing == n else None


def contact_batch(items: Sequence[ContactIn | ContactPatch], array: bool) -> ContactBatch:
    """Check every item and turn them into columns of normal forms; one bad item rejects the request
    (422 naming every bad field). Column-wise, so a 10,000-item import costs a few C-level passes,
    not a loop per item: a field no item gives costs a list of UNSETs and two counts."""
    n = len(items)
    external_ids = [c.external_id for c in items]
    emails = [c.email for c in items]
    phones = [c.phone for c in items]
    locales = [c.locale for c in items]
    attributes = [c.attributes for c in items]
    timezones = [c.timezone for c in items]
    whatsapps = [c.whatsapp for c in items]
    telegram_chat_ids = [c.telegram_chat_id for c in items]
    push_tokens = [c.push_tokens for c in items]
    columns = {EMAIL: emails, PHONE: phones, LOCALE: locales, ATTRIBUTES: attributes, TIMEZONE: timezones,
               WHATSAPP: whatsapps, TELEGRAM_CHAT_ID: telegram_chat_ids, PUSH_TOKENS: push_tokens}
    left_out = {bit: column.count(UNSET) for bit, column in columns.items()}  # items that do not give it
    valued = {bit: n - left_out[bit] - (column.count(None) if left_out[bit] < n else 0)  # items with a value
              for bit, column in columns.items()}
    errors = _Errors(array)

    if valued[EMAIL]:
        given_emails = [e for e in emails if isinstance(e, str)]
        if all_fast_emails(given_emails):
            joined = "".join(given_emails)
            if joined.lower() != joined:  # on the fast path only the domain's case changes
                emails[:] = [checked_email(e)[0] if isinstance(e, str) else e for e in emails]
        else:
            for i, e in enumerate(emails):
                if isinstance(e, str):
                    emails[i], reason = checked_email(e)
                    if reason:
                        errors.add(i, "email", reason)
    if valued[PHONE] or valued[WHATSAPP]:
        _phones(items, phones, whatsapps, errors)
    if valued[LOCALE]:
        for i, tag in enumerate(locales):
            if isinstance(tag, str):
                locales[i] = canonical_locale(tag)
                if locales[i] is None:
                    errors.add(i, "locale", LOCALE_REASON)
    if valued[TIMEZONE]:
        for i, zone in enumerate(timezones):
            if isinstance(zone, str):
                timezones[i] = canonical_timezone(zone)
                if timezones[i] is None:
                    errors.add(i, "timezone", TIMEZONE_REASON)
    if valued[TELEGRAM_CHAT_ID]:
        for i, chat in enumerate(telegram_chat_ids):
            if isinstance(chat, (str, int)):
                telegram_chat_ids[i] = chat = str(chat)
                if reason := telegram_chat_id_problem(chat):
                    errors.add(i, "telegram_chat_id", reason)
    if valued[PUSH_TOKENS]:
        push_tokens[:] = [unique_tokens(t) if isinstance(t, list) else t for t in push_tokens]

    given = [sum(bit for bit, k in left_out.items() if k == 0)] * n
    for bit, column in columns.items():
        if 0 < left_out[bit] < n:  # some items give it, some do not
            given = [g | bit if v is not UNSET else g for g, v in zip(given, column)]
            column[:] = [None if v is UNSET else v for v in column]
        elif left_out[bit]:
            column[:] = [None] * n
    attributes_json = msgspec.json.encode(attributes)
    if len(attributes_json) > MAX_ATTRIBUTES_BYTES:  # only then can one contact's be too large
        for i, a in enumerate(attributes):
            if a is not None and (size := len(msgspec.json.encode(a))) > MAX_ATTRIBUTES_BYTES:
                errors.add(i, "attributes", f"must be at most {MAX_ATTRIBUTES_BYTES:,} bytes as JSON, not {size:,}")
    if b"\\u0000" in attributes_json:
        for i, a in enumerate(attributes):
            if a is not None and _NUL_ESCAPE.search(msgspec.json.encode(a)):
                errors.add(i, "attributes", NUL)
    errors.raise_any()
    return ContactBatch(
        external_ids, emails, phones, locales, attributes_json.decode(), given,  # type: ignore[arg-type]
        # A column without a value is left out of the upsert (None): its default is the same.
        timezones=timezones if valued[TIMEZONE] else None,
        whatsapps=whatsapps if valued[WHATSAPP] else None,
        telegram_chat_ids=telegram_chat_ids if valued[TELEGRAM_CHAT_ID] else None,  # type: ignore[arg-type]
        push_tokens=push_tokens if valued[PUSH_TOKENS] else None,  # type: ignore[arg-type]
    )


def _phones(items: Sequence[ContactIn | ContactPatch], phones: list[Any], whatsapps: list[Any], errors: _Errors) -> None:
    """Check `phone` and `whatsapp` and put them in E.164, in place. Numbers already in E.164 are
    checked by one regex over all of them and a length check per country code (phonenumbers'
    metadata, cached); any other form is parsed by phonenumbers, a national one in `phone_region`."""
    regions: list[Any] = [c.phone_region for c in items]
    unusable: set[int] = set()  # items whose region is wrong: that error is the one to fix
    if regions.count(UNSET) + regions.count(None) < len(regions):
        for i, region in enumerate(regions):
            if isinstance(region, str) and (reason := region_problem(region)):
                errors.add(i, "phone_region", reason)
                unusable.add(i)
    for field, column in (("phone", phones), ("whatsapp", whatsapps)):
        numbers = [p for p in column if isinstance(p, str)]
        if not numbers or (all_e164(numbers) and not shape_problems(numbers)):
            continue  # none given, or all stored as they are
        for i, number in enumerate(column):
            if isinstance(number, str) and i not in unusable:
                region = regions[i] if isinstance(regions[i], str) else None
                column[i], reason = e164(number, region)
                if reason:
                    errors.add(i, field, reason)


def contact_changes(patch: ContactPatch) -> ContactChanges:
    """A PATCH's fields checked and in their normal forms, as an upsert's are (422 naming the field)."""
    batch = contact_batch([patch], array=False)
    values: dict[str, Any] = {}
    if patch.external_id is not UNSET:
        values["external_id"] = patch.external_id
    for bit, column, name in COLUMNS:
        if batch.given[0] & bit:
            value = (getattr(batch, name) or [None])[0]
            values[column] = [] if column == "push_tokens" and value is None else value
    return ContactChanges(values=values, attributes=patch.attributes)
