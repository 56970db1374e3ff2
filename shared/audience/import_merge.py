"""One chunk of an import merged into contacts (a Postgres adapter), in the caller's transaction.

The chunk's rows are COPied (binary) into a temporary table, then set-based statements merge them:
rows with an external id upsert by it; rows without one are matched by email (case-insensitive),
against the contacts as they stood before the chunk and the chunk's rows with an external id.
Within a chunk, rows of one contact apply in order (merged here first: the last given value of each
field wins, attributes merge key by key); a contact whose fields would not change is not written.

Locks are taken in one order, so two imports touching the same contacts never deadlock with each
other nor with POST /v1/contacts (which upserts in external id order): contacts matched by external
id are updated (each locked as the update reaches it) and new ones inserted, both in external id
order; a contact that would not change is neither written nor locked. Contacts matched by email
alone have no external id, which no other bulk writer touches: they are updated in id order under a
per-tenant advisory lock, taken before any row lock, and so are contacts created without an
external id, so two imports cannot both create the contact of one new email address. A key that
another import inserted meanwhile is a unique violation: the caller runs the chunk again.
"""
from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec

from shared.audience.import_checks import (
    ATTRIBUTES,
    EMAIL,
    LOCALE,
    PHONE,
    PUSH_TOKENS,
    TELEGRAM,
    TIMEZONE,
    WHATSAPP,
    Chunk,
    Rejection,
)
from shared.kernel.limits import MAX_ATTRIBUTES_BYTES, MAX_STORED_ATTRIBUTES_BYTES


class Merged(msgspec.Struct):
    created: int
    updated: int
    unchanged: int
    rejections: list[Rejection]  # rows the merge refused (attributes grown past the stored limit)


_STAGING = """CREATE TEMP TABLE import_rows (
    ord int, external_id text, contact_id bigint, email text, phone text, locale text, timezone text,
    whatsapp text, telegram_chat_id text, push_tokens text[], attributes text, given int
) ON COMMIT DROP"""
_SCALARS = ((EMAIL, "email"), (PHONE, "phone"), (LOCALE, "locale"), (TIMEZONE, "timezone"), (WHATSAPP, "whatsapp"),
            (TELEGRAM, "telegram_chat_id"))


def _given(bit: int, mask: int | None) -> str | None:
    """SQL: whether row s gives the field; None when no row does. `mask`: the fields every row gives
    when they all give the same (the SQL then has no test per row), else None."""
    if mask is None:
        return f"s.given & {bit} <> 0"
    return "true" if mask & bit else None


def _changes(mask: int | None) -> tuple[str, str]:
    """SQL: the SET list of an update by row s, and the test that it changes contact c."""
    sets, differs = [], []
    fields = [(bit, col, f"s.{col}", f"s.{col} IS DISTINCT FROM c.{col}") for bit, col in _SCALARS]
    fields.append((PUSH_TOKENS, "push_tokens", "coalesce(s.push_tokens, '{}')", "coalesce(s.push_tokens, '{}') <> c.push_tokens"))
    fields.append((ATTRIBUTES, "attributes", "c.attributes || s.attrs", "c.attributes || s.attrs <> c.attributes"))
    for bit, col, value, differ in fields:
        if (given := _given(bit, mask)) is None:
            continue
        sets.append(f"{col} = {value}" if given == "true" else f"{col} = CASE WHEN {given} THEN {value} ELSE c.{col} END")
        differs.append(differ if given == "true" else f"({given} AND {differ})")
    return ", ".join([*sets, "updated_at = now()"]), " OR ".join(differs) or "false"


# For the merge's transaction only (SET LOCAL), as the sender's planner does: right after a bulk
# import the statistics say the tenant has a few hundred contacts, and a hash join over all of them
# (once per chunk: quadratic over the import) looked cheaper than one index probe per row.
_PROBES_ONLY = ("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; "
                "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off")


def _merge_sql(by: str, with_list: bool, mask: int | None) -> str:
    """Update the matched contacts that change, in key order (one index probe per row), and insert
    the others. `by`: "external_id" (rows with one), or "email" (rows without: by contact id).

    The update locks the rows it changes as it goes, in the order it walks the probed rows: key
    order. Unchanged rows are not locked (a lock writes the row), except with a list: KEY SHARE,
    as shared.audience.lists does, so a contact deleted meanwhile cannot keep its membership."""
    if by == "external_id":
        rows, order = "external_id IS NOT NULL", "external_id"
        # A range that is one key, in index order with LIMIT 1: only the unique index gives that order,
        # so it is the index used whatever the statistics say. (With the plain equality, a table that
        # was empty when the chunk was planned got the smaller (tenant_id, id) index, and each probe
        # walked all of the tenant's entries, the other part's inserts too: 25 s for 25,000 rows.)
        probe = ("c.tenant_id = $1 AND c.external_id >= s.external_id AND c.external_id <= s.external_id "
                 "ORDER BY c.external_id LIMIT 1")
    else:
        rows, order = "external_id IS NULL", "contact_id, ord"
        probe = "c.id = s.contact_id AND c.tenant_id = $1"
    sets, differs = _changes(mask)
    too_big = f"octet_length(c.attributes::text) > {MAX_STORED_ATTRIBUTES_BYTES}"
    if (attributes := _given(ATTRIBUTES, mask)) is None:
        too_big = "false"
    elif attributes != "true":
        too_big = f"{attributes} AND {too_big}"
    members = """, members AS (
            INSERT INTO list_members (list_id, contact_id)
            SELECT $2, id FROM (SELECT contact AS id FROM probed WHERE contact IS NOT NULL
                                UNION ALL SELECT id FROM created) m
            ORDER BY id ON CONFLICT DO NOTHING RETURNING 1
        )""" if with_list else ""
    return f"""
        WITH probed AS (
            SELECT s.*, m.id AS contact, m.differs
            FROM (SELECT *, attributes::jsonb AS attrs FROM import_rows WHERE {rows} ORDER BY {order} OFFSET 0) s
            LEFT JOIN LATERAL (SELECT c.id, {differs} AS differs FROM contacts c
                               WHERE {probe}{" FOR KEY SHARE OF c" if with_list else ""}) m ON true
        ), changed AS (
            -- the test again, on the row as it is now: another transaction may have changed it since
            UPDATE contacts c SET {sets}
            FROM probed s
            WHERE s.differs AND c.id = s.contact AND ({differs})
            -- only a merge into stored attributes can pass the stored limit: a row's own are at most
            -- {MAX_ATTRIBUTES_BYTES:,} bytes as JSON, which Postgres prints in under 1.5 times that
            RETURNING s.ord, {too_big} AS too_big
        ), created AS (
            INSERT INTO contacts (tenant_id, external_id, email, phone, locale, timezone, whatsapp, telegram_chat_id,
                                  push_tokens, attributes)
            SELECT $1, s.external_id, s.email, s.phone, s.locale, s.timezone, s.whatsapp, s.telegram_chat_id,
                   coalesce(s.push_tokens, '{{}}'), coalesce(s.attrs, '{{}}')
            FROM probed s WHERE s.contact IS NULL
            ORDER BY {order}
            RETURNING id
        ){members}
        SELECT (SELECT count(contact) FROM probed) AS matched, (SELECT count(*) FROM changed) AS updated,
               (SELECT count(*) FROM created) AS created,
               (SELECT array_agg(ord) FROM changed WHERE too_big) AS too_big"""


class _TooBig(Exception):
    def __init__(self, ords: list[int]) -> None:
        self.ords = ords


class Staged:
    """Rows of a chunk as the columns COPY takes, the lines each row stands for, and what the chunk
    reported (counted with the first part when a chunk is merged in parts)."""

    def __init__(self, columns: dict[str, list[Any]], rows_read: int, bytes_read: int,
                 rejections: list[Rejection]) -> None:
        self.columns = columns
        self.rows_read, self.bytes_read, self.rejections = rows_read, bytes_read, rejections
        self.groups: dict[int, list[int]] = {}  # row -> the lines merged into it, where rows were

    @classmethod
    def of(cls, chunk: Chunk) -> Staged:
        columns: dict[str, list[Any]] = {
            "line": chunk.lines, "external_id": chunk.external_ids, "contact_id": [None] * len(chunk.lines),
            "email": chunk.emails, "phone": chunk.phones, "locale": chunk.locales, "timezone": chunk.timezones,
            "whatsapp": chunk.whatsapps, "telegram_chat_id": chunk.telegram_chat_ids, "push_tokens": chunk.push_tokens,
            "attributes": chunk.attributes, "given": chunk.given,
        }
        return cls(columns, chunk.rows_read, chunk.bytes_read, list(chunk.rejections))

    @property
    def by_email(self) -> bool:
        """Whether some rows have no external id (matched by email, under the tenant's lock)."""
        return None in self.columns["external_id"]

    def split(self, parts: int) -> list[Staged]:
        """Consecutive parts of the rows, each merged in a transaction of its own; the caller has
        merged the rows of one contact already, so no two parts touch one contact."""
        n = len(self)
        size = -(-n // parts)
        out = []
        for k, at in enumerate(range(0, n, size)):
            part = Staged({name: column[at : at + size] for name, column in self.columns.items()},
                          self.rows_read if k == 0 else 0, self.bytes_read, self.rejections if k == 0 else [])
            part.groups = {i - at: lines for i, lines in self.groups.items() if at <= i < at + size}
            out.append(part)
        return out or [self]

    def __len__(self) -> int:
        return len(self.columns["line"])

    @property
    def merged_away(self) -> int:
        return sum(len(lines) - 1 for lines in self.groups.values())

    def reject(self, ords: list[int], reason: str) -> None:
        """Refuse rows (with the rows merged into them) by their attributes; the caller drops them."""
        for ord in sorted(ords):
            lines = self.groups.pop(ord, None) or [self.columns["line"][ord]]
            self.rejections.extend(Rejection(line, "attributes", reason) for line in lines)

    def keep(self, rows: list[int]) -> None:
        self.groups = {k: self.groups[i] for k, i in enumerate(rows) if i in self.groups}
        self.columns = {name: [column[i] for i in rows] for name, column in self.columns.items()}

    @property
    def mask(self) -> int | None:
        """The fields every row gives, when they all give the same ones."""
        given = self.columns["given"]
        return given[0] if given and given.count(given[0]) == len(given) else None

    def records(self) -> tuple[list[str], list[tuple[Any, ...]]]:
        """COPY's columns (those some row gives; `given` only when rows differ) and rows; `ord` numbers them."""
        n, uniform = len(self), self.mask is not None
        names = [name for name, column in self.columns.items()
                 if name != "line" and not (name == "given" and uniform) and column.count(None) < n]
        return ["ord", *names], list(zip(range(n), *(self.columns[name] for name in names)))


async def _resolve_emails(con: asyncpg.Connection, tenant_id: uuid.UUID, staged: Staged) -> None:
    """Rows without an external id: matched by email to the contact that has it (the oldest, if several
    do), else to a row of the chunk with an external id and that email; else they create one."""
    cols = staged.columns
    keyless = [i for i, key in enumerate(cols["external_id"]) if key is None]
    await con.execute("SELECT pg_advisory_xact_lock(hashtextextended('crier:import-by-email:' || $1::uuid::text, 0))",
                      tenant_id)
    # One probe of (tenant_id, lower(email)) per address: a range in that index's order, which only it
    # gives, so it is the index used whatever the statistics say (see _merge_sql).
    rows = await con.fetch(
        """SELECT DISTINCT ON (w.email) w.email, c.id, c.external_id
           FROM unnest($2::text[]) AS w(email)
           CROSS JOIN LATERAL (
               SELECT c.id, c.external_id FROM contacts c
               WHERE c.tenant_id = $1 AND c.email IS NOT NULL
                 AND lower(c.email) >= lower(w.email) AND lower(c.email) <= lower(w.email)
               ORDER BY lower(c.email) OFFSET 0) c
           ORDER BY w.email, c.id""",
        tenant_id, list({cols["email"][i] for i in keyless}),
    )
    found = {r["email"]: (r["id"], r["external_id"]) for r in rows}
    in_chunk: dict[str, str] = {}
    for key, email in zip(cols["external_id"], cols["email"]):
        if key is not None and email is not None:
            in_chunk.setdefault(email.lower(), key)
    for i in keyless:
        email = cols["email"][i]
        if email in found:
            contact_id, key = found[email]
            if key is not None:
                cols["external_id"][i] = key
            else:
                cols["contact_id"][i] = contact_id
        elif email.lower() in in_chunk:
            cols["external_id"][i] = in_chunk[email.lower()]


_BITS = {"email": EMAIL, "phone": PHONE, "locale": LOCALE, "timezone": TIMEZONE, "whatsapp": WHATSAPP,
         "telegram_chat_id": TELEGRAM, "push_tokens": PUSH_TOKENS}


def _deduplicate(staged: Staged) -> None:
    """Rows of one contact merged into the first, in order: the last given value of each field wins,
    attributes merge key by key."""
    cols = staged.columns
    n = len(staged)
    if None not in cols["external_id"] and len(set(cols["external_id"])) == n:
        return  # the common case, told in C: every row has its own external id
    keys = [("x", key) if key is not None else ("i", cid) if cid is not None else ("@", email.lower())
            for key, cid, email in zip(cols["external_id"], cols["contact_id"], cols["email"])]
    if len(set(keys)) == n:
        return
    first: dict[Any, int] = {}
    decode, encode = msgspec.json.decode, msgspec.json.encode
    too_big = []
    for i, key in enumerate(keys):
        at = first.setdefault(key, i)
        if at == i:
            continue
        given = cols["given"][i]
        for name, bit in _BITS.items():
            if given & bit:
                cols[name][at] = cols[name][i]
        if given & ATTRIBUTES:
            mine = cols["attributes"][at]
            cols["attributes"][at] = text = encode({**(decode(mine) if mine else {}), **decode(cols["attributes"][i])}).decode()
            if len(text.encode()) > MAX_ATTRIBUTES_BYTES and at not in too_big:
                too_big.append(at)
        cols["given"][at] |= given
        staged.groups.setdefault(at, [cols["line"][at]]).append(cols["line"][i])
    staged.reject(too_big, f"merged with the rows of the same contact before it, over {MAX_ATTRIBUTES_BYTES:,} "
                  "bytes as JSON")
    staged.keep(sorted(set(first.values()) - set(too_big)))


def staged_parts(chunk: Chunk, parts: int) -> list[Staged]:
    """The chunk as parts to merge at once, in transactions of their own (on as many connections):
    rows of one contact merged first, so no two parts touch one contact. A chunk with rows matched
    by email stays whole: which contact such a row is can only be told under the tenant's lock."""
    staged = Staged.of(chunk)
    if staged.by_email or parts == 1:
        return [staged]
    _deduplicate(staged)
    return staged.split(parts)


async def merge_chunk(con: asyncpg.Connection, tenant_id: uuid.UUID, list_id: uuid.UUID | None, staged: Staged) -> Merged:
    """Merge the rows into the tenant's contacts (and the list), in the caller's transaction. The
    rejections returned are the chunk's own (for its first part) and those of the merge."""
    refused = sorted(staged.rejections, key=lambda r: r.line)
    if not len(staged):
        return Merged(0, 0, 0, refused)
    groups = staged.groups
    staged = Staged({name: list(column) for name, column in staged.columns.items()},  # a retry starts afresh
                    staged.rows_read, staged.bytes_read, [])
    staged.groups = dict(groups)
    await con.execute("SET LOCAL work_mem = '64MB'")  # the chunk's sorts in memory
    await con.execute(_PROBES_ONLY)
    if staged.by_email:
        await _resolve_emails(con, tenant_id, staged)
    _deduplicate(staged)
    await con.execute(_STAGING)
    names, records = staged.records()
    await con.copy_records_to_table("import_rows", records=records, columns=names)
    statements = [_merge_sql("external_id", list_id is not None, staged.mask)]
    if staged.by_email:  # still, after matching: new addresses, or contacts that have no external id
        statements.append(_merge_sql("email", list_id is not None, staged.mask))
    args = (tenant_id, list_id) if list_id is not None else (tenant_id,)
    while True:
        try:
            async with con.transaction():  # a savepoint: undone when a merge grows attributes too large
                totals = [0, 0, 0]
                for sql in statements:
                    done = await con.fetchrow(sql, *args)
                    if done["too_big"]:
                        raise _TooBig(done["too_big"])
                    totals = [totals[0] + done["matched"], totals[1] + done["updated"], totals[2] + done["created"]]
            break
        except _TooBig as e:
            await con.execute("DELETE FROM import_rows WHERE ord = ANY($1::int[])", e.ords)
            staged.reject(e.ords, f"merged into the stored attributes they would be over "
                          f"{MAX_STORED_ATTRIBUTES_BYTES:,} bytes as JSON")
    matched, updated, created = totals
    # Rows merged into an earlier row of the same contact count as updates of it.
    refused = sorted(refused + staged.rejections, key=lambda r: r.line)
    return Merged(created, updated + staged.merged_away, matched - updated, refused)
