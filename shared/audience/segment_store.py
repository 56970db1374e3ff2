"""Segments (a Postgres adapter): save them checked, read them, and compile one for a run or a preview.

Every function takes the tenant: another tenant's segment (or list) is as absent as a missing one.
Saves of a tenant's segments take one advisory lock, so that two concurrent saves cannot each add
half of a cycle; the lists and segments a segment names are kept in segment_refs, so that deleting
one in use is refused (017_segments.sql).
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
from msgspec import UNSET, UnsetType

from shared.audience.contacts import ContactRow
from shared.audience.segments import (
    LIST,
    MAX_SEGMENT_NESTING,
    Rule,
    SqlArgs,
    check_references,
    compile_rule,
    parse_rules,
    referenced,
)
from shared.kernel.errors import Conflict, Invalid

# A preview counts over all of a tenant's contacts: bounded in time whatever the rules (the rules'
# own bounds keep a million contacts well under a second; this is the backstop).
PREVIEW_TIMEOUT_MS = 30_000


class SegmentRow(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    name: str
    rules: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class SegmentInUse(Conflict):
    """Other segments use this one (member_of): deleting it would change what they select (409)."""

    def __init__(self, users: list[uuid.UUID]) -> None:
        super().__init__("segment_in_use", f"segment is used by {len(users)} other segment(s); change them first",
                         segments=[str(u) for u in users])


_SEGMENT = "id, name, rules, created_at, updated_at"


def _json(value: Any) -> Any:
    """A jsonb column's value, from a connection with the pool's jsonb codec (decoded) or without (text)."""
    return msgspec.json.decode(value) if isinstance(value, str) else value


def _row(record: asyncpg.Record) -> SegmentRow:
    return SegmentRow(**{**dict(record), "rules": _json(record["rules"])})


async def _lock(con: asyncpg.Connection, tenant_id: uuid.UUID) -> None:
    await con.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"segments:{tenant_id}")


async def _targets(
    con: asyncpg.Connection, tenant_id: uuid.UUID, roots: Iterable[Rule], override: dict[uuid.UUID, Rule] | None = None
) -> dict[uuid.UUID, Any]:
    """What every member_of reachable from `roots` names, as compile_rule's resolve wants it: LIST
    for a list of the tenant's, a segment's rule, or absent. Segments in `override` are taken as
    given (the one being saved). Read breadth first, one query per level, as deep as compiling may go."""
    overrides = override or {}
    targets: dict[uuid.UUID, Any] = {}
    frontier = {m.id for r in roots for m in referenced(r)}
    # Level n+1 is where compiling finds nesting too deep, so it must be resolved too.
    for _ in range(MAX_SEGMENT_NESTING + 1):
        frontier -= targets.keys()
        if not frontier:
            break
        found: dict[uuid.UUID, Any] = {i: overrides[i] for i in frontier if i in overrides}
        rows = await con.fetch(
            """SELECT id, rules, false AS is_list FROM segments WHERE tenant_id = $1 AND id = ANY($2::uuid[])
               UNION ALL SELECT id, NULL, true FROM lists WHERE tenant_id = $1 AND id = ANY($2::uuid[])""",
            tenant_id, [i for i in frontier if i not in overrides],
        )
        for r in rows:
            found[r["id"]] = LIST if r["is_list"] else parse_rules(_json(r["rules"]))
        targets.update(found)
        frontier = {m.id for rule in found.values() if rule != LIST for m in referenced(rule)}
    return targets


async def segment_condition(
    con: asyncpg.Connection, tenant_id: uuid.UUID, segment_id: uuid.UUID, alias: str, args: SqlArgs, now: datetime,
    *, fenced: bool = True,
) -> str | None:
    """The tenant's segment as a boolean SQL condition over the contacts row `alias` (its values
    added to `args`, relative times against `now`), the segments it uses inlined; None if the
    segment is not the tenant's. The caller keeps to the tenant's contacts (`c.tenant_id = $1`).
    `fenced`: see segments.compile_rule."""
    raw = await con.fetchval("SELECT rules FROM segments WHERE id = $1 AND tenant_id = $2", segment_id, tenant_id)
    if raw is None:
        return None
    rule = parse_rules(_json(raw))
    targets = await _targets(con, tenant_id, [rule])
    return compile_rule(rule, alias, args, now, targets.get, segment_id=segment_id, fenced=fenced)


async def _check(con: asyncpg.Connection, tenant_id: uuid.UUID, segment_id: uuid.UUID, rule: Rule) -> dict[uuid.UUID, Any]:
    """Invalid unless `rule` may be segment `segment_id`'s: what it names is the tenant's, and it and
    every segment using it (directly or not) still compile within the bounds and without a cycle.
    Returns what the rule's member_of name (see _targets)."""
    targets = await _targets(con, tenant_id, [rule], {segment_id: rule})
    check_references(rule, targets.get, segment_id)
    users = await con.fetch(
        """WITH RECURSIVE users(id, depth) AS (
               SELECT segment_id, 1 FROM segment_refs WHERE ref_segment_id = $2
               UNION SELECT r.segment_id, u.depth + 1 FROM segment_refs r JOIN users u ON r.ref_segment_id = u.id
               WHERE u.depth <= $3)
           SELECT s.id, s.rules FROM segments s WHERE s.tenant_id = $1 AND s.id IN (SELECT id FROM users)""",
        tenant_id, segment_id, MAX_SEGMENT_NESTING,
    )
    for user in users:
        user_rule = parse_rules(_json(user["rules"]))
        user_targets = await _targets(con, tenant_id, [user_rule], {segment_id: rule})
        try:
            check_references(user_rule, user_targets.get, user["id"])
        except Invalid as e:
            raise Invalid("rules", f"segment {user['id']} uses this one, and would not be valid: {e.reason}") from None
    return targets


async def _write_refs(con: asyncpg.Connection, segment_id: uuid.UUID, rule: Rule, targets: dict[uuid.UUID, Any]) -> None:
    ids = list(dict.fromkeys(m.id for m in referenced(rule)))
    await con.execute("DELETE FROM segment_refs WHERE segment_id = $1", segment_id)
    await con.execute(
        """INSERT INTO segment_refs (segment_id, list_id, ref_segment_id)
           SELECT $1, CASE WHEN l THEN i END, CASE WHEN NOT l THEN i END FROM unnest($2::uuid[], $3::bool[]) AS t(i, l)""",
        segment_id, ids, [targets.get(i) == LIST for i in ids],
    )


async def create_segment(
    con: asyncpg.Connection, tenant_id: uuid.UUID, name: str, rules: dict[str, Any], *, idempotency_key: str | None = None
) -> tuple[SegmentRow, bool]:
    """Create a segment; returns it and whether it is new (False: the idempotency key was used before).
    Invalid (a 422 naming the field) when the rules are not valid or name what is not the tenant's."""
    rule = parse_rules(rules)
    segment_id = uuid.uuid4()
    async with con.transaction():
        if idempotency_key is not None and (row := await con.fetchrow(
            f"SELECT {_SEGMENT} FROM segments WHERE tenant_id = $1 AND idempotency_key = $2", tenant_id, idempotency_key,
        )):
            return _row(row), False
        await _lock(con, tenant_id)
        targets = await _check(con, tenant_id, segment_id, rule)
        row = await con.fetchrow(
            f"""INSERT INTO segments (id, tenant_id, name, rules, idempotency_key) VALUES ($1, $2, $3, $4::text::jsonb, $5)
                ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                RETURNING {_SEGMENT}""",
            segment_id, tenant_id, name, msgspec.json.encode(rules).decode(), idempotency_key,
        )
        if row is None:  # the same key, committed by a concurrent request after the look above
            row = await con.fetchrow(
                f"SELECT {_SEGMENT} FROM segments WHERE tenant_id = $1 AND idempotency_key = $2", tenant_id, idempotency_key
            )
            return _row(row), False
        await _write_refs(con, segment_id, rule, targets)
    return _row(row), True


async def update_segment(
    con: asyncpg.Connection, tenant_id: uuid.UUID, segment_id: uuid.UUID, *,
    name: str | UnsetType = UNSET, rules: dict[str, Any] | UnsetType = UNSET,
) -> SegmentRow | None:
    """Change the name and/or the rules; None if the segment is not the tenant's. Nothing given
    changes nothing (updated_at included)."""
    if name is UNSET and rules is UNSET:
        return await get_segment(con, tenant_id, segment_id)
    rule = parse_rules(rules) if rules is not UNSET else None
    async with con.transaction():
        await _lock(con, tenant_id)
        if await con.fetchval("SELECT true FROM segments WHERE id = $1 AND tenant_id = $2 FOR UPDATE", segment_id, tenant_id) is None:
            return None
        if rule is not None:
            await _write_refs(con, segment_id, rule, await _check(con, tenant_id, segment_id, rule))
        row = await con.fetchrow(
            f"""UPDATE segments SET name = coalesce($3, name), rules = coalesce($4::text::jsonb, rules), updated_at = now()
                WHERE id = $1 AND tenant_id = $2 RETURNING {_SEGMENT}""",
            segment_id, tenant_id, None if name is UNSET else name,
            None if rules is UNSET else msgspec.json.encode(rules).decode(),
        )
    return _row(row)


async def get_segment(con: asyncpg.Connection, tenant_id: uuid.UUID, segment_id: uuid.UUID) -> SegmentRow | None:
    row = await con.fetchrow(f"SELECT {_SEGMENT} FROM segments WHERE id = $1 AND tenant_id = $2", segment_id, tenant_id)
    return _row(row) if row else None


async def page_segments(
    con: asyncpg.Connection, tenant_id: uuid.UUID, limit: int, offset: int
) -> tuple[list[SegmentRow], int]:
    total = await con.fetchval("SELECT count(*) FROM segments WHERE tenant_id = $1", tenant_id)
    rows = await con.fetch(
        f"SELECT {_SEGMENT} FROM segments WHERE tenant_id = $1 ORDER BY created_at DESC, id LIMIT $2 OFFSET $3",
        tenant_id, limit, offset,
    )
    return [_row(r) for r in rows], total


async def delete_segment(con: asyncpg.Connection, tenant_id: uuid.UUID, segment_id: uuid.UUID) -> bool:
    """Delete a segment; False if it is not the tenant's, SegmentInUse if another segment uses it."""
    async with con.transaction():
        await _lock(con, tenant_id)
        users = await con.fetch(
            """SELECT DISTINCT r.segment_id FROM segment_refs r JOIN segments s ON s.id = r.segment_id
               WHERE r.ref_segment_id = $1 AND s.tenant_id = $2 ORDER BY 1""",
            segment_id, tenant_id,
        )
        if users:
            raise SegmentInUse([u[0] for u in users])
        status = await con.execute("DELETE FROM segments WHERE id = $1 AND tenant_id = $2", segment_id, tenant_id)
    return status == "DELETE 1"


async def segments_using_list(con: asyncpg.Connection, tenant_id: uuid.UUID, list_id: uuid.UUID) -> list[uuid.UUID]:
    """The tenant's segments whose rules name the list (a delete of it is refused). Takes the tenant's
    segment lock, so that no segment starts using the list before the caller's transaction ends."""
    await _lock(con, tenant_id)
    rows = await con.fetch(
        """SELECT DISTINCT r.segment_id FROM segment_refs r JOIN segments s ON s.id = r.segment_id
           WHERE r.list_id = $1 AND s.tenant_id = $2 ORDER BY 1""",
        list_id, tenant_id,
    )
    return [r[0] for r in rows]


_CONTACT = ", ".join(f"c.{f}" for f in ContactRow.__struct_fields__)


async def count_and_preview(
    con: asyncpg.Connection, tenant_id: uuid.UUID, segment_id: uuid.UUID, now: datetime, limit: int = 10
) -> tuple[int, list[ContactRow]] | None:
    """How many of the tenant's contacts the segment selects now, and the first `limit` by id; None
    if the segment is not the tenant's. One snapshot for both, bounded by PREVIEW_TIMEOUT_MS
    (asyncpg.QueryCanceledError past it). Lists are joined, not probed per contact, with nested
    loops off so that a misestimate cannot make a join re-read a list per contact (compile_rule)."""
    async with con.transaction(isolation="repeatable_read", readonly=True):
        await con.execute(f"SET LOCAL statement_timeout = {int(PREVIEW_TIMEOUT_MS)}; SET LOCAL enable_nestloop = off")
        args = SqlArgs([tenant_id])
        condition = await segment_condition(con, tenant_id, segment_id, "c", args, now, fenced=False)
        if condition is None:
            return None
        where = f"c.tenant_id = $1 AND {condition}"
        count_sql = f"SELECT count(*) FROM contacts c WHERE {where}"
        rows = await con.fetch(
            f"SELECT {_CONTACT} FROM contacts c WHERE {where} ORDER BY c.id LIMIT {args.add(limit, 'int')}", *args.values
        )
        # Fewer than `limit`: that walk saw every match, and a count would walk them all again. `fetch`,
        # not `fetchval`: asyncpg runs that with a row limit, and Postgres never runs such a portal in
        # parallel (a third slower over a million contacts, measured).
        count = len(rows) if len(rows) < limit else (await con.fetch(count_sql, *args.values[:-1]))[0][0]
    return count, [ContactRow(**dict(r)) for r in rows]
