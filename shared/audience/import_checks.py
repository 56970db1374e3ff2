"""The rows of an import checked column by column (pure): what each field may hold, and the chunk of
valid rows as columns ready to be written, with the rows rejected and why.

A million-row file is checked in a few C-level passes per column: every email through one regex at
once (shared/audience/fields.py), likewise E.164 phones; a Python call per value only for what the
fast paths cannot settle. A row is in one of three states per field: not given (an empty CSV cell,
an NDJSON key left out: the stored value is kept), None (NDJSON null: cleared) or a value.
"""
from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta

from shared.audience.fields import (
    LOCALE_REASON,
    MAX_PUSH_TOKENS,
    TIMEZONE_REASON,
    all_e164,
    all_fast_emails,
    canonical_locale,
    canonical_timezone,
    checked_email,
    e164,
    push_token_problem,
    shape_problems,
    telegram_chat_id_problem,
    unique_tokens,
)
from shared.kernel import limits as lim
from shared.kernel.limits import MAX_ATTRIBUTES_BYTES

# The fields a row gives (a bit each): those replace the stored ones, the others are kept.
EMAIL, PHONE, LOCALE, ATTRIBUTES, TIMEZONE, WHATSAPP, TELEGRAM, PUSH_TOKENS = 1, 2, 4, 8, 16, 32, 64, 128
MAX_EXTERNAL_ID_CHARS = 255
# A contact's fields in an import; phone_region is the region of national phone and WhatsApp numbers
# (`DE`), not stored.
FIELDS = ("external_id", "email", "phone", "phone_region", "locale", "timezone", "whatsapp", "telegram_chat_id",
          "push_tokens")
NO_KEY = "a row needs an external_id or an email to be matched to a contact"
_TOKEN_SEPARATORS = re.compile(r"[\s;]+")


def _attributes_type() -> Any:
    """The attributes object as POST /v1/contacts takes it: key count, key length and depth checked
    by msgspec while it decodes."""
    key = Annotated[str, Meta(max_length=lim.MAX_ATTRIBUTE_KEY_CHARS)]
    value: Any = str | int | float | bool | None
    for _ in range(lim.MAX_ATTRIBUTE_DEPTH - 1):
        value = str | int | float | bool | None | list[value] | Annotated[dict[key, value], Meta(max_length=lim.MAX_ATTRIBUTE_KEYS)]
    return Annotated[dict[key, value], Meta(max_length=lim.MAX_ATTRIBUTE_KEYS)], value


Attributes, AttributeValue = _attributes_type()
ATTRIBUTE_VALUE = msgspec.json.Decoder(AttributeValue)  # a CSV column `NAME:json`


AT_PATH = re.compile(r"\s*-\s*at `\$(?:\[\d+\])?\.?([^`]*)`")  # msgspec's "- at `$.attributes`"


def decode_reason(message: str) -> str:
    """msgspec's message about a value, without the path it ends with."""
    return AT_PATH.sub("", message).replace("Expected `object` of length <=", "more keys than")


class Rejection(msgspec.Struct, frozen=True):
    line: int  # where the row starts in the file (the CSV header is line 1)
    field: str  # the first field found wrong, `row` for the row as a whole
    reason: str


class Chunk(msgspec.Struct, kw_only=True):
    """Valid rows as columns (row i of each list is one contact), merged in one transaction."""

    lines: list[int]
    external_ids: list[str | None]
    emails: list[str | None]
    phones: list[str | None]
    locales: list[str | None]
    timezones: list[str | None]
    whatsapps: list[str | None]
    telegram_chat_ids: list[str | None]
    push_tokens: list[list[str] | None]
    attributes: list[str | None]  # a JSON object, or None when not given
    given: list[int]  # per row: the bits of the fields it gives
    rejections: list[Rejection]
    rows_read: int  # valid and rejected
    bytes_read: int  # of the file, through this chunk's last row


class Rows:
    """One chunk's rows before the checks: a column per field some row gives, each value UNSET (not
    given), None or a str (a list of str for NDJSON's push_tokens); `external_id` is None or a str."""

    def __init__(self, lines: list[int], columns: dict[str, list[Any]], attributes: list[str | None],
                 bad: dict[int, tuple[str, str]] | None = None) -> None:
        n = len(lines)
        self.lines, self.attributes, self.bad = lines, attributes, bad if bad is not None else {}
        self.columns = {name: c for name, c in columns.items() if name == "external_id" or c.count(UNSET) < n}
        self.columns.setdefault("external_id", [None] * n)

    def reject(self, i: int, field: str, reason: str) -> None:
        self.bad.setdefault(i, (field, reason))  # the first problem found is the one reported


def _given_at(column: list[Any]) -> list[int] | None:
    """Where the column gives a string, or None when it does at every row."""
    if UNSET not in column and None not in column:
        return None
    return [i for i, v in enumerate(column) if v.__class__ is str]


def _each(column: list[Any], at: list[int] | None) -> Any:
    return enumerate(column) if at is None else ((i, column[i]) for i in at)


def _emails(rows: Rows) -> None:
    if (column := rows.columns.get("email")) is None:
        return
    at = _given_at(column)
    values = column if at is None else [column[i] for i in at]
    if not values:
        return
    if all_fast_emails(values) and (joined := "".join(values)).lower() == joined:
        return  # all valid and already in normal form (no capital in a domain; lower() is C-fast, islower() not)
    for i, value in _each(column, at):
        normal, reason = checked_email(value)
        if reason:
            rows.reject(i, "email", reason)
        else:
            column[i] = normal


def _phones(rows: Rows, field: str) -> None:
    if (column := rows.columns.get(field)) is None:
        return
    regions = rows.columns.get("phone_region") or [None] * len(column)
    at = _given_at(column)
    values = column if at is None else [column[i] for i in at]
    if not values or (all_e164(values) and not shape_problems(values)):
        return  # all in E.164 and possible for their country code
    for i, value in _each(column, at):
        region = regions[i]
        normal, reason = e164(value, region if region.__class__ is str else None)
        if reason:
            rows.reject(i, field, reason)
        else:
            column[i] = normal


def _canonical(rows: Rows, field: str, canonical: Any, reason: str) -> None:
    if (column := rows.columns.get(field)) is None:
        return
    for i, value in _each(column, _given_at(column)):
        normal = canonical(value)
        if normal is None:
            rows.reject(i, field, reason)
        else:
            column[i] = normal


def _telegram(rows: Rows) -> None:
    if (column := rows.columns.get("telegram_chat_id")) is None:
        return
    for i, value in _each(column, _given_at(column)):
        if reason := telegram_chat_id_problem(value):
            rows.reject(i, "telegram_chat_id", reason)


def _push_tokens(rows: Rows) -> None:
    """A CSV cell is a list separated by spaces or semicolons; NDJSON gives a list."""
    if (column := rows.columns.get("push_tokens")) is None:
        return
    for i, value in enumerate(column):
        if value is UNSET or value is None:
            continue
        tokens = [t for t in _TOKEN_SEPARATORS.split(value) if t] if value.__class__ is str else value
        tokens = unique_tokens(tokens)
        if len(tokens) > MAX_PUSH_TOKENS:
            rows.reject(i, "push_tokens", f"at most {MAX_PUSH_TOKENS} device tokens, not {len(tokens)}")
        elif bad := next((t for t in tokens if push_token_problem(t)), None):
            rows.reject(i, "push_tokens", f"{bad[:40]!r}: {push_token_problem(bad)}")
        column[i] = tokens


def _external_ids(rows: Rows) -> None:
    column, emails = rows.columns["external_id"], rows.columns.get("email")
    if None in column:  # a row without an external id is matched by its email
        for i, key in enumerate(column):
            if key is None and (emails is None or emails[i].__class__ is not str):
                rows.reject(i, "external_id", NO_KEY)
    if max(map(len, filter(None, column)), default=0) > MAX_EXTERNAL_ID_CHARS:
        for i, key in enumerate(column):
            if key is not None and len(key) > MAX_EXTERNAL_ID_CHARS:
                rows.reject(i, "external_id", f"must be at most {MAX_EXTERNAL_ID_CHARS} characters")


def _attributes(rows: Rows) -> None:
    column = rows.attributes
    if max(map(len, filter(None, column)), default=0) * 4 > MAX_ATTRIBUTES_BYTES:  # UTF-8: 4 bytes a character at most
        for i, a in enumerate(column):
            if a is not None and len(a) * 4 > MAX_ATTRIBUTES_BYTES and (size := len(a.encode())) > MAX_ATTRIBUTES_BYTES:
                rows.reject(i, "attributes", f"must be at most {MAX_ATTRIBUTES_BYTES:,} bytes as JSON, not {size:,}")


_BITS = (("email", EMAIL), ("phone", PHONE), ("locale", LOCALE), ("timezone", TIMEZONE), ("whatsapp", WHATSAPP),
         ("telegram_chat_id", TELEGRAM), ("push_tokens", PUSH_TOKENS))
_STAGED = ("external_id", "email", "phone", "locale", "timezone", "whatsapp", "telegram_chat_id", "push_tokens")


def checked(rows: Rows, rows_read: int, bytes_read: int) -> Chunk:
    """Check every field of every row; the rows with a problem are left out and reported."""
    _external_ids(rows)
    _emails(rows)
    _phones(rows, "phone")
    _canonical(rows, "locale", canonical_locale, LOCALE_REASON)
    _canonical(rows, "timezone", canonical_timezone, TIMEZONE_REASON)
    _phones(rows, "whatsapp")
    _telegram(rows)
    _push_tokens(rows)
    _attributes(rows)
    n, lines, columns, attributes = len(rows.lines), rows.lines, rows.columns, rows.attributes
    base, partial = 0, []
    for name, bit in _BITS:
        if name not in columns:
            continue
        missing = columns[name].count(UNSET)
        if missing == 0:
            base |= bit
        elif missing < n:
            partial.append((columns[name], bit))
    if None not in attributes:
        base |= ATTRIBUTES
    elif attributes.count(None) < n:
        partial.append(([UNSET if a is None else a for a in attributes], ATTRIBUTES))
    given = [base] * n
    for column, bit in partial:
        for i, value in enumerate(column):
            if value is not UNSET:
                given[i] |= bit
    staged = {}
    for name in _STAGED:
        column = columns.get(name) or [None] * n
        staged[name] = [None if v is UNSET else v for v in column] if UNSET in column else column
    rejections = [Rejection(lines[i], field, reason) for i, (field, reason) in sorted(rows.bad.items())]
    if rows.bad:
        keep = [i for i in range(n) if i not in rows.bad]
        lines, given, attributes = [lines[i] for i in keep], [given[i] for i in keep], [attributes[i] for i in keep]
        staged = {name: [column[i] for i in keep] for name, column in staged.items()}
    return Chunk(
        lines=lines, external_ids=staged["external_id"], emails=staged["email"], phones=staged["phone"],
        locales=staged["locale"], timezones=staged["timezone"], whatsapps=staged["whatsapp"],
        telegram_chat_ids=staged["telegram_chat_id"], push_tokens=staged["push_tokens"], attributes=attributes,
        given=given, rejections=rejections, rows_read=rows_read, bytes_read=bytes_read,
    )
