"""Static lists of contacts (a Postgres adapter): lists, memberships, and the members in id order.

Every function takes the tenant: another tenant's list (or contact) is as absent as a missing one.
A list's member_count is kept by triggers on list_members (004_contacts_lists.sql).
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec


class ListRow(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    name: str
    member_count: int
    created_at: datetime


class UnknownContacts(Exception):
    """Some of the contacts named in a membership change are not the tenant's."""

    def __init__(self, field: str, unknown: list[Any]) -> None:
        self.field, self.unknown = field, unknown
        super().__init__(f"{field}: {len(unknown)} unknown")


_LIST = "id, name, member_count, created_at"


async def create_list(
    con: asyncpg.Connection, tenant_id: uuid.UUID, name: str, *, idempotency_key: str | None = None
) -> tuple[ListRow, bool]:
    """Create a list; returns it and whether it is new (False: the idempotency key was used before)."""
    row = await con.fetchrow(
        f"""INSERT INTO lists (id, tenant_id, name, idempotency_key) VALUES ($1, $2, $3, $4)
            ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING {_LIST}""",
        uuid.uuid4(), tenant_id, name, idempotency_key,
    )
    if row is not None:
        return ListRow(**dict(row)), True
    row = await con.fetchrow(
        f"SELECT {_LIST} FROM lists WHERE tenant_id = $1 AND idempotency_key = $2", tenant_id, idempotency_key
    )
    return ListRow(**dict(row)), False


async def get_list(con: asyncpg.Connection, tenant_id: uuid.UUID, list_id: uuid.UUID) -> ListRow | None:
    row = await con.fetchrow(f"SELECT {_LIST} FROM lists WHERE id = $1 AND tenant_id = $2", list_id, tenant_id)
    return ListRow(**dict(row)) if row else None


async def page_lists(
    con: asyncpg.Connection, tenant_id: uuid.UUID, limit: int, offset: int
) -> tuple[list[ListRow], int]:
    total = await con.fetchval("SELECT count(*) FROM lists WHERE tenant_id = $1", tenant_id)
    rows = await con.fetch(
        f"SELECT {_LIST} FROM lists WHERE tenant_id = $1 ORDER BY created_at DESC, id LIMIT $2 OFFSET $3",
        tenant_id, limit, offset,
    )
    return [ListRow(**dict(r)) for r in rows], total


async def delete_list(con: asyncpg.Connection, tenant_id: uuid.UUID, list_id: uuid.UUID) -> bool:
    """Delete a list and its memberships (the contacts stay)."""
    status = await con.execute("DELETE FROM lists WHERE id = $1 AND tenant_id = $2", list_id, tenant_id)
    return status == "DELETE 1"


def _found_sql(by_external_id: bool, lock: bool) -> str:
    # KEY SHARE (what a foreign key check takes): a concurrent delete of one of these contacts waits
    # for this transaction, then its trigger removes the membership made here.
    key = "c.external_id = ANY($3::text[])" if by_external_id else "c.id = ANY($3::bigint[])"
    return f"SELECT c.id FROM contacts c WHERE c.tenant_id = $2 AND {key}{' FOR KEY SHARE' if lock else ''}"


async def _unknown(con: asyncpg.Connection, tenant_id: uuid.UUID, wanted: list[Any], by_external_id: bool) -> list[Any]:
    column, kind = ("external_id", "text") if by_external_id else ("id", "bigint")
    rows = await con.fetch(
        f"""SELECT w.key FROM unnest($2::{kind}[]) WITH ORDINALITY AS w(key, ord)
            WHERE NOT EXISTS (SELECT 1 FROM contacts c WHERE c.tenant_id = $1 AND c.{column} = w.key)
            ORDER BY w.ord""",
        tenant_id, wanted,
    )
    return list(dict.fromkeys(r["key"] for r in rows))


async def change_members(
    con: asyncpg.Connection, tenant_id: uuid.UUID, list_id: uuid.UUID, *, add: bool,
    contact_ids: Sequence[int] | None = None, external_ids: Sequence[str] | None = None,
) -> tuple[int, int] | None:
    """Add (or remove) contacts to (from) a list, all or nothing; returns (changed, member_count).

    None if the list is not the tenant's; UnknownContacts if any contact is not. Adding a member
    again or removing a non-member changes nothing and is not an error.
    """
    by_external_id = external_ids is not None
    wanted = list(external_ids if by_external_id else contact_ids or [])
    field = "external_ids" if by_external_id else "contact_ids"
    change = (
        """INSERT INTO list_members (list_id, contact_id) SELECT $1, id FROM found ORDER BY id
           ON CONFLICT DO NOTHING RETURNING 1"""
        if add
        else "DELETE FROM list_members WHERE list_id = $1 AND contact_id IN (SELECT id FROM found) RETURNING 1"
    )
    async with con.transaction():
        # KEY SHARE: a concurrent delete of the list waits for this change instead of racing it.
        if await con.fetchval("SELECT true FROM lists WHERE id = $1 AND tenant_id = $2 FOR KEY SHARE", list_id, tenant_id) is None:
            return None
        counts = await con.fetchrow(
            f"""WITH found AS ({_found_sql(by_external_id, add)}), changed AS ({change})
                SELECT (SELECT count(*) FROM found) AS found, (SELECT count(*) FROM changed) AS changed""",
            list_id, tenant_id, wanted,
        )
        if counts["found"] < len(set(wanted)):
            raise UnknownContacts(field, await _unknown(con, tenant_id, wanted, by_external_id))
        member_count = await con.fetchval("SELECT member_count FROM lists WHERE id = $1", list_id)
    return counts["changed"], member_count
