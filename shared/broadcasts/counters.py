"""Broadcast counters per run, folded from snapshot and batch-outcome events (async projection).

When the last batch of a snapshotted run is counted, it also finishes the run on the broadcast
stream, in the same transaction as the counters and the checkpoint: exactly once, even on replay
(the decider ignores a finish for a run that already ended).
"""
from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import msgspec

from shared.broadcasts import decider as b
from shared.platform import codec
from shared.platform import commands as service
from shared.platform.eventstore import RecordedEvent
from shared.sending import batch as bt


class Counters(msgspec.Struct, frozen=True):
    total: int = 0
    queued: int = 0
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
            await self._finish_if_done(con, done.broadcast_id, done.run, done.at, event.metadata)
            return
        decoded = codec.from_recorded(event, b.Event)
        broadcast_id = uuid.UUID(event.stream_name.split("-", 1)[1])
        match decoded:
            case b.BroadcastStarted():
                await con.execute(
                    """INSERT INTO broadcast_counters (broadcast_id, run, total) VALUES ($1, $2, $3)
                       ON CONFLICT (broadcast_id, run) DO UPDATE SET total = $3""",
                    broadcast_id, decoded.run, decoded.audience_size,
                )
            case b.AudienceSnapshotted():
                await con.execute(
                    """INSERT INTO broadcast_counters (broadcast_id, run, total, batches, snapshotted)
                       VALUES ($1, $2, $3, $4, true)
                       ON CONFLICT (broadcast_id, run) DO UPDATE SET total = $3, batches = $4, snapshotted = true""",
                    broadcast_id, decoded.run, decoded.recipients, decoded.batches,
                )
                await self._finish_if_done(con, broadcast_id, decoded.run, decoded.at, event.metadata)
            case _:
                pass

    async def _finish_if_done(
        self, con: asyncpg.Connection, broadcast_id: uuid.UUID, run: int, at: datetime, metadata: dict
    ) -> None:
        row = await con.fetchrow(
            "SELECT total, sent, failed, batches, batches_done, snapshotted FROM broadcast_counters "
            "WHERE broadcast_id = $1 AND run = $2",
            broadcast_id, run,
        )
        if not row["snapshotted"] or row["batches"] == 0 or row["batches_done"] < row["batches"]:
            return
        from shared.broadcasts.handlers import DECIDER, INLINE

        command = b.FinishRun(run=run, total=row["total"], sent=row["sent"], failed=row["failed"], at=at)
        meta = {"tenant_id": metadata.get("tenant_id"), "actor": "projector:counters"}
        await service.handle(None, DECIDER, b.stream_name(broadcast_id), command, meta, INLINE, con=con)  # type: ignore[arg-type]

    async def clear(self, con: asyncpg.Connection) -> None:
        await con.execute("TRUNCATE broadcast_counters")


async def counters_of(con: asyncpg.Connection, broadcast_ids: list[uuid.UUID]) -> dict[uuid.UUID, Counters]:
    """Counters summed over a broadcast's runs (a top-up adds to them)."""
    rows = await con.fetch(
        """SELECT broadcast_id, sum(total)::bigint AS total, sum(sent)::bigint AS sent, sum(failed)::bigint AS failed
           FROM broadcast_counters WHERE broadcast_id = ANY($1::uuid[]) GROUP BY broadcast_id""",
        broadcast_ids,
    )
    return {
        r["broadcast_id"]: Counters(r["total"], max(r["total"] - r["sent"] - r["failed"], 0), r["sent"], r["failed"])
        for r in rows
    }


_ACTIVE = frozenset(s.value for s in b.ACTIVE)


def shown(counters: Counters | None, status: str) -> dict[str, int]:
    """Counters as users see them: while a run is active its unsent messages are `queued`; once it
    was cancelled or stopped they are `dropped`."""
    c = counters or Counters()
    unsent = max(c.total - c.sent - c.failed, 0)
    active = status in _ACTIVE
    return {"total": c.total, "queued": unsent if active else 0, "sent": c.sent, "failed": c.failed,
            "dropped": 0 if active else unsent}
