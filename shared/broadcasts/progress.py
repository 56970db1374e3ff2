"""Live progress of broadcasts: the status and counters, pushed as they change.

Two outlets share one snapshot format: the SSE endpoint `GET /v1/broadcasts/{id}/progress`
(polls while a client listens) and the NATS subject `<prefix>crier.progress.<tenant>.broadcast.<id>`
(core NATS, not stored: a live feed, the durable record is the event stream), published by one
API replica under a leader lock. Both send at most a few updates a second.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import msgspec
from nats.aio.client import Client as NATS

from shared.broadcasts.counters import counters_of, shown
from shared.broadcasts.status import ACTIVE, sql_list
from shared.platform.bus import Names
from shared.platform.logging import get_logger

log = get_logger(__name__)
INTERVAL_S = 0.25


async def snapshots(con: asyncpg.Connection, rows: list[asyncpg.Record]) -> dict[uuid.UUID, dict[str, Any]]:
    counters = await counters_of(con, [r["id"] for r in rows])
    return {
        r["id"]: {"broadcast_id": str(r["id"]), "status": r["status"], "run": r["run"],
                  "counters": shown(counters.get(r["id"]), r["status"])}
        for r in rows
    }


async def snapshot(con: asyncpg.Connection, tenant_id: uuid.UUID, broadcast_id: uuid.UUID) -> dict[str, Any] | None:
    rows = await con.fetch(
        "SELECT id, status, run FROM broadcasts WHERE id = $1 AND tenant_id = $2 AND NOT deleted",
        broadcast_id, tenant_id,
    )
    return (await snapshots(con, rows)).get(broadcast_id)


async def publish_progress(pool: asyncpg.Pool, nc: NATS, names: Names) -> None:
    """Publish every change of a broadcast with a run under way, and the state it ends in, until cancelled."""
    last: dict[uuid.UUID, dict[str, Any]] = {}
    while True:
        try:
            async with pool.acquire() as con:
                rows = await con.fetch(
                    f"""SELECT id, tenant_id, status, run FROM broadcasts
                       WHERE NOT deleted AND (status IN {sql_list(ACTIVE)} OR id = ANY($1::uuid[]))""",
                    list(last),
                )
                current = await snapshots(con, rows)
            tenants = {r["id"]: r["tenant_id"] for r in rows}
            for broadcast_id, snap in current.items():
                if last.get(broadcast_id) != snap:
                    subject = names.progress_subject(str(tenants[broadcast_id]), str(broadcast_id))
                    await nc.publish(subject, msgspec.json.encode(snap))
            # A run under way is in an ACTIVE status; leaving it ends the run (finished, cancelled,
            # stopped to draft, or a recurring broadcast rescheduled). Its last update went out just
            # now: stop watching it.
            last = {k: v for k, v in current.items() if v["status"] in ACTIVE}
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("progress publishing failed, will retry", error=str(exc))
        await asyncio.sleep(INTERVAL_S)
