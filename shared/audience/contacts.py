"""Contacts (a Postgres adapter): set-based upserts by external id, tenant-scoped reads, filters,
changes and erasure.

Every function takes the tenant: another tenant's contact is as absent as a missing one.
"""
from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import lru_cache
from typing import Any

import asyncpg
import msgspec
from msgspec import UNSET, UnsetType

from shared.audience.erasure import erase_contact
from shared.audience.segments import SqlArgs
from shared.kernel.errors import AlreadyExists, Invalid, NotFound
from shared.kernel.limits import MAX_STORED_ATTRIBUTES_BYTES

# The fields a row of an upsert gives: those replace the stored ones, the others are kept.
EMAIL, PHONE, LOCALE, ATTRIBUTES = 1, 2, 4, 8
TIMEZONE, WHATSAPP, TELEGRAM_CHAT_ID, PUSH_TOKENS = 16, 32, 64, 128
# The fields that are columns of their own: (bit, column, ContactBatch attribute), in row order.
COLUMNS = (
    (EMAIL, "email", "emails"), (PHONE, "phone", "phones"), (LOCALE, "locale", "locales"),
    (TIMEZONE, "timezone", "timezones"), (WHATSAPP, "whatsapp", "whatsapps"),
    (TELEGRAM_CHAT_ID, "telegram_chat_id", "telegram_chat_ids"), (PUSH_TOKENS, "push_tokens", "push_tokens"),
)
FIELDS = sum(bit for bit, _, _ in COLUMNS)
# GET /v1/contacts?segment_id= counts and reads the segment's contacts: bounded in time like a preview.
SEGMENT_TIMEOUT_MS = 30_000


class ContactBatch(msgspec.Struct):
    """Contacts to upsert, already validated, as columns (row i of each list is one contact)."""

    external_ids: list[str | None]
    emails: list[str | None]
    phones: list[str | None]
    locales: list[str | None]
    attributes_json: str  # a JSON array: row i's attributes object, or null when not given
    given: list[int]  # per row: the bits (EMAIL | PHONE | ...) of the fields it gives
    # The channel fields; None is a column of nulls (as when no row gives the field).
    timezones: list[str | None] | None = None
    whatsapps: list[str | None] | None = None
    telegram_chat_ids: list[str | None] | None = None
    push_tokens: list[list[str] | None] | None = None  # null: none (an empty list)


class AttributesTooLarge(Invalid):
    """Merged key by key into the stored ones, these contacts' attributes would pass
    MAX_STORED_ATTRIBUTES_BYTES: a job carries a recipient's attributes, and one must always fit."""

    def __init__(self, external_ids: list[str]) -> None:
        self.external_ids = external_ids
        super().__init__(
            "attributes",
            f"merged key by key into the stored attributes they would be over {MAX_STORED_ATTRIBUTES_BYTES:,} bytes"
            " as JSON",
        )


class ExternalIdTaken(AlreadyExists):
    """Another contact of the tenant already has this external id (it is the upsert key)."""

    def __init__(self, external_id: str, holder: int | None) -> None:
        self.external_id, self.holder = external_id, holder
        super().__init__(f"external_id {external_id!r} is already another contact's")


class Upserted(msgspec.Struct, frozen=True):
    ids: list[int]  # the contact id of each row, in request order
    created: int
    updated: int


class ContactRow(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    external_id: str | None
    email: str | None
    phone: str | None
    whatsapp: str | None
    telegram_chat_id: str | None
    push_tokens: list[str]
    locale: str | None
    timezone: str | None
    attributes: dict[str, Any]
    created_at: datetime
    updated_at: datetime


# A row as a list: external id, attributes, given, then the COLUMNS' values.
_KEY, _ATTRIBUTES, _GIVEN, _VALUES = 0, 1, 2, 3


def _rows(batch: ContactBatch) -> list[list[Any]]:
    attributes = msgspec.json.decode(batch.attributes_json)
    nulls = [None] * len(batch.external_ids)
    values = [getattr(batch, name) or nulls for _, _, name in COLUMNS]
    return [list(r) for r in zip(batch.external_ids, attributes, batch.given, *values)]


def _batch(rows: list[list[Any]]) -> ContactBatch:
    columns = [list(c) for c in zip(*rows)] if rows else [[] for _ in range(_VALUES + len(COLUMNS))]
    values = {name: column for (_, _, name), column in zip(COLUMNS, columns[_VALUES:])}
    return ContactBatch(
        external_ids=columns[_KEY], attributes_json=msgspec.json.encode(columns[_ATTRIBUTES]).decode(),
        given=columns[_GIVEN], **values,
    )


def _deduplicated(batch: ContactBatch) -> tuple[ContactBatch, list[int]]:
    """Rows of one external id merged, as if sent one after the other; and where each row went."""
    rows: list[list[Any]] = []
    where: list[int] = []
    seen: dict[str, int] = {}
    for row in _rows(batch):
        key = row[_KEY]
        at = seen.get(key) if key is not None else None
        if at is None:
            if key is not None:
                seen[key] = len(rows)
            where.append(len(rows))
            rows.append(row)
            continue
        first, given = rows[at], row[_GIVEN]
        for i, (bit, _, _) in enumerate(COLUMNS, _VALUES):
            if given & bit:
                first[i] = row[i]
        if given & ATTRIBUTES:
            first[_ATTRIBUTES] = {**(first[_ATTRIBUTES] or {}), **row[_ATTRIBUTES]}
        first[_GIVEN] |= given
        where.append(at)
    return _batch(rows), where


def _element(column: str) -> tuple[str, str]:
    """How one column travels (a function over a JSON array) and how its element is inserted."""
    if column == "push_tokens":  # a JSON array of strings per row, or null
        return ("jsonb_array_elements({}::text::jsonb)",
                "CASE WHEN jsonb_typeof(t.push_tokens) = 'array' "
                "THEN ARRAY(SELECT jsonb_array_elements_text(t.push_tokens)) ELSE '{}'::text[] END")
    return "json_array_elements_text({}::text::json)", f"t.{column}"


@lru_cache(maxsize=256)
def _upsert_sql(given: int, present: tuple[str, ...], merged_in_request: bool = False) -> str:
    """The upsert of rows whose external ids the tenant has, giving the fields `given`; the columns
    `present` hold a value in some row (a column of nulls is left out: its default is the same)."""
    # A field given by the rows replaces the stored one: EXCLUDED holds the column's default when
    # the column is not inserted, which clears it (null, or no push tokens).
    sets = "".join(f"{col} = EXCLUDED.{col}, " for bit, col, _ in COLUMNS if given & bit)
    # Each column travels as one JSON array: asyncpg encodes a text[] element by element (and
    # checks each for nesting), which cost more than all the rest of the request's Python.
    sources = ", ".join(_element(col)[0].format(f"${i}") for i, col in enumerate(present, 3))
    inserted = "".join(f"{_element(col)[1]}, " for col in present)
    names = "".join(f"{col}, " for col in present)
    attributes = f"${3 + len(present)}"
    # Rows go in external id order so that two imports touching the same contacts lock them in the
    # same order (no deadlock); rows without an external id never conflict and keep request order.
    return f"""
        WITH written AS (
            INSERT INTO contacts AS c (tenant_id, external_id, {names}attributes)
            SELECT $1, t.external_id, {inserted}coalesce(nullif(t.attributes, 'null'), '{{}}')
            FROM ROWS FROM (json_array_elements_text($2::text::json), {sources}{', ' if sources else ''}
                            jsonb_array_elements({attributes}::text::jsonb))
                 WITH ORDINALITY AS t(external_id, {names}attributes, ord)
            ORDER BY t.external_id, t.ord
            ON CONFLICT (tenant_id, external_id) DO UPDATE
            SET {sets}attributes = c.attributes || EXCLUDED.attributes, updated_at = now()
            RETURNING c.id, c.external_id, (c.xmax = 0) AS inserted,
                      -- merged attributes past the stored limit (one recipient must fit in a job): only an
                      -- update or rows merged in this request can get there; printing every row's jsonb
                      -- would cost ~6 ms per 10,000 rows (measured)
                      CASE WHEN NOT (c.xmax = 0) OR {str(merged_in_request).lower()}
                           THEN octet_length(c.attributes::text) > {MAX_STORED_ATTRIBUTES_BYTES} END AS too_big
        )
        SELECT array_agg(id) AS ids, array_agg(external_id) AS keys, count(*) FILTER (WHERE inserted) AS created,
               array_agg(external_id) FILTER (WHERE too_big) AS too_big
        FROM written"""


async def upsert_contacts(con: asyncpg.Connection, tenant_id: uuid.UUID, batch: ContactBatch) -> Upserted:
    """Create or update contacts by external id, all or nothing.

    A row with an external id the tenant already has updates that contact: the fields given replace
    the stored ones (null clears), fields not given are kept, and `attributes` are merged key by key.
    Rows without an external id always create. Rows of one external id apply in order.
    """
    external_ids = batch.external_ids
    keys = len(external_ids) - external_ids.count(None)
    where: list[int] | None = None
    if len(set(external_ids)) - (keys < len(external_ids)) < keys:
        batch, where = _deduplicated(batch)
    # One statement per combination of fields given by rows with a key: almost always exactly one.
    # Rows without a key never conflict, so they go with any of them.
    masks = {g & FIELDS for g, key in zip(batch.given, batch.external_ids) if key is not None} or {0}
    if len(masks) == 1:
        groups = [(masks.pop(), batch)]
    else:
        rows = _rows(batch)
        groups = [(m, _batch([r for r in rows if r[_KEY] is not None and r[_GIVEN] & FIELDS == m])) for m in masks]
        groups.append((0, _batch([r for r in rows if r[_KEY] is None])))
    by_key: dict[str, int] = {}
    unkeyed: list[int] = []
    created = 0
    encode = msgspec.json.encode
    async with con.transaction():
        for given, group in groups:
            n = len(group.external_ids)
            if not n:
                continue
            # Only the columns some row has a value for: an import of emails sends no other column.
            present = [(col, values) for _, col, name in COLUMNS
                       if (values := getattr(group, name)) is not None and values.count(None) < n]
            done = await con.fetchrow(
                _upsert_sql(given, tuple(col for col, _ in present), where is not None), tenant_id,
                encode(group.external_ids).decode(), *(encode(values).decode() for _, values in present),
                group.attributes_json,
            )
            if done["too_big"]:  # merges grew them past the limit: roll the whole request back
                raise AttributesTooLarge(done["too_big"])
            by_key.update(zip(done["keys"], done["ids"]))
            if None in by_key:
                del by_key[None]  # type: ignore[arg-type]
                unkeyed.extend(i for k, i in zip(done["keys"], done["ids"]) if k is None)
            created += done["created"]
    # Identity values are drawn in insertion order, which is request order for rows without a key.
    fresh = iter(sorted(unkeyed))
    ids = [by_key[key] if key is not None else next(fresh) for key in batch.external_ids]
    if where is not None:
        ids = [ids[i] for i in where]
    return Upserted(ids, created, len(batch.external_ids) - created)


async def invalid_attributes_at(con: asyncpg.Connection, attributes_json: str) -> list[int]:
    """Rows whose attributes Postgres will not take as jsonb (after an upsert failed on one)."""
    # json (unlike jsonb) only checks the syntax, so it splits the array that jsonb refused.
    rows = await con.fetch(
        """SELECT i - 1 AS i FROM json_array_elements($1::text::json) WITH ORDINALITY AS a(e, i)
           WHERE NOT pg_input_is_valid(e::text, 'jsonb') ORDER BY i""",
        attributes_json,
    )
    return [r["i"] for r in rows]


_CONTACT = (
    "id, external_id, email, phone, whatsapp, telegram_chat_id, push_tokens, locale, timezone, attributes, "
    "created_at, updated_at"
)


async def get_contact(con: asyncpg.Connection, tenant_id: uuid.UUID, contact_id: int) -> ContactRow | None:
    row = await con.fetchrow(f"SELECT {_CONTACT} FROM contacts WHERE id = $1 AND tenant_id = $2", contact_id, tenant_id)
    return ContactRow(**dict(row)) if row else None


async def page_contacts(
    con: asyncpg.Connection, tenant_id: uuid.UUID, limit: int, offset: int, *,
    external_id: str | None = None, email: str | None = None, list_id: uuid.UUID | None = None,
    updated_since: datetime | None = None, condition: Callable[[SqlArgs], Awaitable[str]] | None = None,
) -> tuple[list[ContactRow], int]:
    """A page in id order of the tenant's contacts that pass every filter given: `email` matches
    case-insensitively, `list_id` keeps the list's members, `updated_since` those changed at or
    after it, and `condition` builds one more, over contacts row `c` with the statement's args (a
    segment's: segment_store.segment_condition, which imports this module, so the caller joins
    the two). NotFound when the list is not the tenant's; with a condition,
    asyncpg.QueryCanceledError past SEGMENT_TIMEOUT_MS."""
    # Only the filters given, so each query shape gets its own plan. Every one keeps tenant_id = $1,
    # so Postgres reads the tenant's contacts only: by the upsert key (external_id), by
    # contacts_tenant_email, by the list's members, or along contacts_tenant_id.
    args = SqlArgs([tenant_id])
    where = ["c.tenant_id = $1"]
    if external_id is not None:
        where.append(f"c.external_id = {args.add(external_id, 'text')}")
    if email is not None:  # the index is partial: the second condition lets Postgres use it
        where.append(f"lower(c.email) = lower({args.add(email, 'text')}) AND c.email IS NOT NULL")
    if list_id is not None:
        if not await con.fetchval("SELECT true FROM lists WHERE id = $1 AND tenant_id = $2", list_id, tenant_id):
            raise NotFound("list not found")
        where.append(
            f"EXISTS (SELECT 1 FROM list_members m WHERE m.list_id = {args.add(list_id, 'uuid')} AND m.contact_id = c.id)"
        )
    if updated_since is not None:
        where.append(f"c.updated_at >= {args.add(updated_since, 'timestamptz')}")
    async with con.transaction(isolation="repeatable_read", readonly=True):  # the total and the page agree
        if condition is not None:
            # Last: a segment's conditions are the costly ones; bounded in time like a segment's preview.
            await con.execute(f"SET LOCAL statement_timeout = {int(SEGMENT_TIMEOUT_MS)}")
            where.append(f"({await condition(args)})")
        sql = " AND ".join(where)
        total = await con.fetchval(f"SELECT count(*) FROM contacts c WHERE {sql}", *args.values)
        rows = await con.fetch(
            f"""SELECT {_CONTACT} FROM contacts c WHERE {sql}
                ORDER BY c.id LIMIT {args.add(limit, 'int')} OFFSET {args.add(offset, 'bigint')}""",
            *args.values,
        )
    return [ContactRow(**dict(r)) for r in rows], total


class ContactChanges(msgspec.Struct, frozen=True, kw_only=True):
    """What a PATCH changes: `values`, the columns given (external_id among them; None clears one),
    and `attributes`, a JSON merge patch of the stored attributes (None: clear them all; UNSET: keep)."""

    values: dict[str, Any]
    attributes: dict[str, Any] | None | UnsetType = UNSET


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7396 JSON merge patch of an object: a key given replaces the stored value, an object is
    merged into a stored object the same way, a null removes the key; keys not given are kept."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict):
            stored = merged.get(key)
            merged[key] = merge_patch(stored if isinstance(stored, dict) else {}, value)
        else:
            merged[key] = value
    return merged


async def patch_contact(
    con: asyncpg.Connection, tenant_id: uuid.UUID, contact_id: int, changes: ContactChanges
) -> ContactRow | None:
    """Change some fields of a contact: None if it is not the tenant's; ExternalIdTaken if the new
    external id is another contact's; AttributesTooLarge if the merged attributes would be too large."""
    values = dict(changes.values)
    try:
        async with con.transaction():
            # Locked, so that a concurrent PATCH merges into these attributes, not beside them.
            stored = await con.fetchrow(
                "SELECT attributes FROM contacts WHERE id = $1 AND tenant_id = $2 FOR NO KEY UPDATE", contact_id, tenant_id
            )
            if stored is None:
                return None
            if isinstance(changes.attributes, dict):
                values["attributes"] = merge_patch(stored["attributes"], changes.attributes)
            elif changes.attributes is None:
                values["attributes"] = {}
            if not values:
                return await get_contact(con, tenant_id, contact_id)
            sets = ", ".join(f"{column} = ${i}" for i, column in enumerate(values, 3))
            row = await con.fetchrow(
                f"""UPDATE contacts SET {sets}, updated_at = now() WHERE id = $1 AND tenant_id = $2
                    RETURNING {_CONTACT}, octet_length(attributes::text) > {MAX_STORED_ATTRIBUTES_BYTES} AS too_big""",
                contact_id, tenant_id, *values.values(),
            )
            contact = dict(row)
            if contact.pop("too_big"):  # measured as the upsert does, on the stored jsonb's text
                raise AttributesTooLarge([contact["external_id"]])
    except asyncpg.UniqueViolationError as e:  # contacts_tenant_external_id, the only unique key besides id
        holder = await con.fetchval(
            "SELECT id FROM contacts WHERE tenant_id = $1 AND external_id = $2", tenant_id, values["external_id"]
        )
        raise ExternalIdTaken(values["external_id"], holder) from e
    return ContactRow(**contact)


async def delete_contact(con: asyncpg.Connection, tenant_id: uuid.UUID, contact_id: int) -> bool:
    """Delete a contact: it is erased (shared/audience/erasure.py), its memberships go with it."""
    return await erase_contact(con, tenant_id, contact_id) is not None
