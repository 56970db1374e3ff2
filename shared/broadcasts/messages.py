"""The per-recipient message records of a broadcast: the ledger, plus the recipients of batches
that have not reached them yet (status `queued`, or `dropped` once the run was cancelled or
stopped), so every recipient has a record from the start."""
from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import msgspec

from shared.broadcasts.status import ACTIVE, sql_list


class MessageRecord(msgspec.Struct, frozen=True, kw_only=True):
    run: int
    contact_id: int
    channel: str
    address: str
    status: str
    attempts: int
    error: str | None
    provider_message_id: str | None
    sent_at: datetime | None


_RECORDS = f"""
    SELECT run, contact_id, channel, address, status, attempts::int, error, provider_message_id, sent_at
    FROM messages WHERE broadcast_id = $1
    UNION ALL
    SELECT bt.run, q.contact_id, coalesce(bt.channel, b.channel), q.address,
           CASE WHEN bt.status <> 'dropped' AND b.run = bt.run AND b.status IN {sql_list(ACTIVE)}
                THEN 'queued' ELSE 'dropped' END,
           0, NULL, NULL, NULL
    FROM batches bt
    JOIN broadcasts b ON b.id = bt.broadcast_id
    CROSS JOIN LATERAL unnest(bt.contact_ids, bt.addresses) AS q(contact_id, address)
    WHERE bt.broadcast_id = $1 AND bt.status <> 'done'
      AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.broadcast_id = $1 AND m.run = bt.run
                      AND m.contact_id = q.contact_id AND m.channel = coalesce(bt.channel, b.channel))
"""


async def page(
    con: asyncpg.Connection, broadcast_id: uuid.UUID, status: str | None, limit: int, offset: int
) -> tuple[list[MessageRecord], int]:
    where = "WHERE ($2::text IS NULL OR status = $2)"
    total = await con.fetchval(f"SELECT count(*) FROM ({_RECORDS}) r {where}", broadcast_id, status)
    rows = await con.fetch(
        f"SELECT * FROM ({_RECORDS}) r {where} ORDER BY run, contact_id, channel LIMIT $3 OFFSET $4",
        broadcast_id, status, limit, offset,
    )
    return [MessageRecord(**dict(r)) for r in rows], total
