"""Request and response bodies of /v1/contacts and /v1/lists, and the checks the struct types cannot do.

An import checks 10,000 contacts per request, so the checks work column by column, not in a Python
loop per contact: all emails go through one compiled regex at once (about 0.3 µs per address),
which accepts only what email-validator accepts; only when it refuses one does each address go to
email-validator (~20 µs each), which decides. Phones: an E.164 regex and a length check per
country code, cached from phonenumbers' metadata (parsing each number would cost ~12 µs).
"""
from __future__ import annotations

import re
import uuid
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any

import msgspec
from email_validator import EmailNotValidError, validate_email
from msgspec import UNSET, Meta, UnsetType

from api_service.problems import problem
from api_service.schemas.common import NO_NUL, Input, Name
from shared.audience.contacts import ATTRIBUTES, EMAIL, LOCALE, PHONE, ContactBatch
from shared.kernel import limits as lim

try:
    import phonenumbers
    from phonenumbers import COUNTRY_CODE_TO_REGION_CODE as _COUNTRY_CODES
except ImportError:  # without it, a phone is checked by the E.164 regex alone
    phonenumbers = None  # type: ignore[assignment]
    _COUNTRY_CODES = {}

MAX_CONTACTS = 10_000  # per POST /v1/contacts
MAX_MEMBERS = 100_000  # ids per membership change
MAX_ERRORS = 50  # a 10,000-item import with a systematic mistake gets a readable answer
# A contact's attributes as JSON: every batch job carries them, and nats-server refuses a message
# over 1 MiB, so a contact beyond that could never be sent to (shared/kernel/limits.py).
MAX_ATTRIBUTES_BYTES = lim.MAX_ATTRIBUTES_BYTES

ExternalId = Annotated[str, Meta(min_length=1, max_length=255, pattern=NO_NUL,
                                 description="your id for the contact: the upsert key")]
Email = Annotated[str, Meta(max_length=254, examples=["ada@example.com"])]
Phone = Annotated[str, Meta(max_length=16, description="E.164", examples=["+14155550100"])]
ContactId = Annotated[int, Meta(ge=1, le=2**63 - 1)]
Locale = Annotated[str, Meta(max_length=35, description="a BCP 47 tag", examples=["en", "pt-BR"])]


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


def decode_problem(message: str) -> str:
    """msgspec's message about a contact, said in terms of the attribute limits where it is about them
    (still ending in msgspec's "- at `$path`", from which the 422 takes the field)."""
    if m := _TOO_DEEP.search(message):
        return f"nested deeper than {lim.MAX_ATTRIBUTE_DEPTH} levels of objects and arrays - at `{m.group(1)}`"
    if m := _KEY.search(message):
        return f"a key is longer than {m.group(1)} characters - at `{m.group(2)}`"
    return message.replace("Expected `object` of length <=", "more keys than")


class ContactIn(Input, kw_only=True, gc=False):  # not tracked by the GC: 10,000 per request, no cycles
    """A contact to create or update. With an `external_id` the tenant already has, the fields given
    replace the stored ones (null clears one), fields left out are kept, and `attributes` are merged
    key by key into the stored ones."""

    external_id: ExternalId | None = None
    email: Email | None | UnsetType = UNSET
    phone: Phone | None | UnsetType = UNSET
    locale: Locale | None | UnsetType = UNSET
    attributes: Attributes | UnsetType = UNSET  # type: ignore[valid-type]


class Contact(msgspec.Struct, kw_only=True):
    id: int
    external_id: str | None
    email: str | None
    phone: str | None
    locale: str | None
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

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_END = r"(?:\n|\Z)"
# One address per line: a dot-atom local part of at most 64 characters; labels of letters and digits
# joined by single hyphens, at most 63 characters; a last label ending with a letter (as every TLD
# does) that is not a special-use name; 254 characters in all. Whatever this does not accept
# (double hyphens as in Punycode, IP literals, quoting, non-ASCII) is left to email-validator.
_EMAIL_LINE = (
    rf"(?=[^@\n]{{1,64}}@)(?=[^\n]{{1,254}}{_END}){_ATEXT}+(?:\.{_ATEXT}+)*@"
    rf"(?:(?=[A-Za-z0-9-]{{1,63}}\.)[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\.)+"
    rf"(?!(?i:arpa|invalid|local|localhost|onion|test){_END})(?=[A-Za-z0-9-]{{1,63}}{_END})"
    r"(?:[A-Za-z0-9]+-)*[A-Za-z0-9]*[A-Za-z]"
)
_FAST_EMAIL = re.compile(_EMAIL_LINE)
_FAST_EMAILS = re.compile(rf"(?:(?>{_EMAIL_LINE})\n)*+(?>{_EMAIL_LINE})")
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_LOCALE = re.compile(
    r"([A-Za-z]{2,3})(?:[-_]([A-Za-z]{4}))?(?:[-_]([A-Za-z]{2}|[0-9]{3}))?((?:[-_](?:[A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*)"
)
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")  # \u0000, not an escaped backslash and u0000
NUL = lim.PATTERN_REASONS[lim.NO_NUL_PATTERN]  # Postgres stores no NUL in text or jsonb


def email_problem(address: str) -> str | None:
    """Why an address is not a valid email address, or None; email-validator's rules, without DNS."""
    if _FAST_EMAIL.fullmatch(address):
        return None
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as e:
        return str(e)
    return None


def _all_fast_emails(addresses: list[str]) -> bool:
    """True if every address passes the fast path: one regex over all of them, no call per address."""
    joined = "\n".join(addresses)
    return joined.count("\n") == len(addresses) - 1 and _FAST_EMAILS.fullmatch(joined) is not None


@lru_cache(maxsize=4096)
def _possible_length(country_code: int, length: int) -> str | None:
    """phonenumbers' possible-number check depends only on the country code and the length."""
    number = phonenumbers.PhoneNumber(country_code=country_code, national_number=int("1" * length))
    if phonenumbers.is_possible_number_with_reason(number) == phonenumbers.ValidationResult.IS_POSSIBLE:
        return None
    return f"a +{country_code} number cannot have {length} digits after the country code"


def phone_problem(number: str) -> str | None:
    if not _E164.fullmatch(number):
        return "must be an E.164 number: + and 7 to 15 digits, no spaces (e.g. +14155550100)"
    if phonenumbers is None:
        return None
    for size in (1, 2, 3):  # country calling codes are prefix-free
        code = int(number[1 : 1 + size])
        if code in _COUNTRY_CODES:
            return _possible_length(code, len(number) - 1 - size)
    return f"{number[:4]}… does not start with a country calling code"


@lru_cache(maxsize=1024)
def canonical_locale(tag: str) -> str | None:
    """The tag in canonical case with hyphens (pt_br → pt-BR), or None if it is not BCP 47-like."""
    m = _LOCALE.fullmatch(tag)
    if m is None:
        return None
    language, script, region, variants = m.groups()
    parts = [language.lower()]
    if script:
        parts.append(script.title())
    if region:
        parts.append(region.upper())
    if variants:
        parts.extend(v.lower() for v in variants[1:].replace("_", "-").split("-"))
    return "-".join(parts)


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


def contact_batch(items: list[ContactIn], array: bool) -> ContactBatch:
    """Check every item and turn them into columns; one bad item rejects the request (422 naming every
    bad field). Column-wise, so a 10,000-item import costs a few C-level passes, not a loop per item."""
    n = len(items)
    external_ids = [c.external_id for c in items]
    emails = [c.email for c in items]
    phones = [c.phone for c in items]
    locales = [c.locale for c in items]
    attributes = [c.attributes for c in items]
    errors = _Errors(array)

    given_emails = [e for e in emails if isinstance(e, str)]
    if given_emails and not _all_fast_emails(given_emails):
        for i, e in enumerate(emails):
            if isinstance(e, str) and (reason := email_problem(e)):
                errors.add(i, "email", reason)
    if phones.count(UNSET) + phones.count(None) < n:
        for i, p in enumerate(phones):
            if isinstance(p, str) and (reason := phone_problem(p)):
                errors.add(i, "phone", reason)
    if locales.count(UNSET) + locales.count(None) < n:
        for i, tag in enumerate(locales):
            if isinstance(tag, str):
                locales[i] = canonical_locale(tag)
                if locales[i] is None:
                    errors.add(i, "locale", "must be a BCP 47 language tag such as en, en-GB or pt-BR")

    masks = [_given(emails, EMAIL, n), _given(phones, PHONE, n), _given(locales, LOCALE, n), _given(attributes, ATTRIBUTES, n)]
    if None in masks:
        given = [
            (e is not UNSET) * EMAIL | (p is not UNSET) * PHONE | (tag is not UNSET) * LOCALE | (a is not UNSET) * ATTRIBUTES
            for e, p, tag, a in zip(emails, phones, locales, attributes)
        ]
    else:
        given = [sum(masks)] * n  # type: ignore[arg-type]
    for column in (emails, phones, locales, attributes):
        if UNSET in column:
            column[:] = [None if v is UNSET else v for v in column]
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
    return ContactBatch(external_ids, emails, phones, locales, attributes_json.decode(), given)  # type: ignore[arg-type]
