"""Broadcast counters per run, folded from snapshot and batch-outcome events (an async projection).

It only folds. Finishing a run whose batches are all counted is run completion's job
(shared.broadcasts.completion), which the projector calls in the same transaction.
"""
from __future__ import annotations

import uuid

import asyncpg
import msgspec

from shared.broadcasts import decider as b
from shared.broadcasts.status import ACTIVE
from shared.platform import codec
from shared.platform.eventstore import RecordedEvent
from shared.sending import batch as bt


class Counters(msgspec.Struct, frozen=True):
    total: int = 0
    sent: int = 0
    failed: int = 0


class CountersView:
    name = "counters"
    categories = (b.CATEGORY, bt.CATEGORY)

    async def apply(self, con: asyncpg.Connection, event: RecordedEvent) -> None:
        if event.category == bt.CATEGORY:
            done = codec.from_recorded(event, bt.Event)
            await con.execute(
                """INSERT INTO broadcast_counters (broadcast_id, run, sent, failed, batches_done)
                   VALUES ($1, $2, $3, $4, 1)
                   ON CONFLICT (broadcast_id, run) DO UPDATE SET sent = broadcast_counters.sent + $3,
                       failed = broadcast_counters.failed + $4, batches_done = broadcast_counters.batches_done + 1""",
                done.broadcast_id, done.run, done.sent, done.failed,
            )
            return
        match codec.from_recorded(event, b.Event):
            case b.BroadcastStarted() as started:
                await con.execute(
                    """INSERT INTO broadcast_counters (broadcast_id, run, total) VALUES ($1, $2, $3)
                       ON CONFLICT (broadcast_id, run) DO UPDATE SET total = $3""",
                    b.id_from_stream(event.stream_name), started.run, started.audience_size,
                )
            case b.AudienceSnapshotted() as snapshotted:
                await con.execute(
                    """INSERT INTO broadcast_counters (broadcast_id, run, total, batches, snapshotted)
                       VALUES ($1, $2, $3, $4, true)
                       ON CONFLICT (broadcast_id, run) DO UPDATE SET total = $3, batches = $4, snapshotted = true""",
                    b.id_from_stream(event.stream_name), snapshotted.run, snapshotted.recipients, snapshotted.batches,
                )
            case _:
                pass

    async def clear(self, con: asyncpg.Connection) -> None:
        await con.execute("TRUNCATE broadcast_counters")


async def counters_of(con: asyncpg.Connection, broadcast_ids: list[uuid.UUID]) -> dict[uuid.UUID, Counters]:
    """Counters summed over a broadcast's runs (a top-up adds to them)."""
    rows = await con.fetch(
        """SELECT broadcast_id, sum(total)::bigint AS total, sum(sent)::bigint AS sent, sum(failed)::bigint AS failed
           FROM broadcast_counters WHERE broadcast_id = ANY($1::uuid[]) GROUP BY broadcast_id""",
        broadcast_ids,
    )
    return {r["broadcast_id"]: Counters(r["total"], r["sent"], r["failed"]) for r in rows}


def shown(counters: Counters | None, status: str) -> dict[str, int]:
    """Counters as users see them: while a run is active its unsent messages are `queued`; once it
    was cancelled or stopped they are `dropped`."""
    c = counters or Counters()
    unsent = max(c.total - c.sent - c.failed, 0)
    active = status in ACTIVE
    return {"total": c.total, "queued": unsent if active else 0, "sent": c.sent, "failed": c.failed,
            "dropped": 0 if active else unsent}
