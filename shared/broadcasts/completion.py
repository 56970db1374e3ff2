"""Run completion: once every batch of a snapshotted run has an outcome, the run is finished on
its broadcast stream (completed, partially failed or failed, with the ledger's counts: a run with
unknown outcomes is partially failed, never completed, see the decider's `_finish`).

The projector calls this after folding a batch of events into the counters, in the same
transaction as the counters and their checkpoint: a run finishes exactly once, even on a replay
(the decider ignores a finish for a run that already ended), and the counters view only folds.
It runs wherever the projector runs, under its leader lock, in the API or a sender.
"""
from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from shared.broadcasts import decider as b
from shared.broadcasts.handlers import DECIDER, INLINE
from shared.platform import codec, commands
from shared.platform.eventstore import RecordedEvent
from shared.sending import batch as bt

ACTOR = "projector:run-completion"


class _Touched:
    """A run some of the folded events counted for, and the latest of their times."""

    def __init__(self, tenant_id: str | None, at: datetime) -> None:
        self.tenant_id, self.at = tenant_id, at


def _runs_touched(events: list[RecordedEvent]) -> dict[tuple[uuid.UUID, int], _Touched]:
    touched: dict[tuple[uuid.UUID, int], _Touched] = {}
    for event in events:
        if event.type == "BatchCompleted":
            done = codec.from_recorded(event, bt.Event)
            key, at = (done.broadcast_id, done.run), done.at
        elif event.type == "AudienceSnapshotted" and event.category == b.CATEGORY:
            snapshotted = codec.from_recorded(event, b.Event)
            key, at = (b.id_from_stream(event.stream_name), snapshotted.run), snapshotted.at
        else:
            continue
        touched[key] = _Touched(event.metadata.get("tenant_id"), at)
    return touched


async def finish_done_runs(con: asyncpg.Connection, events: list[RecordedEvent]) -> None:
    """Finish every run these events counted for whose batches all have an outcome now."""
    for (broadcast_id, run), touched in _runs_touched(events).items():
        row = await con.fetchrow(
            """SELECT total, sent, failed, unknown FROM broadcast_counters
               WHERE broadcast_id = $1 AND run = $2 AND snapshotted AND batches > 0 AND batches_done >= batches""",
            broadcast_id, run,
        )
        if row is None:
            continue
        # The run's own figures (a retry run's are its retried recipients' new outcomes).
        command = b.FinishRun(run=run, total=row["total"], sent=row["sent"], failed=row["failed"],
                              unknown=row["unknown"], at=touched.at)
        metadata = {"tenant_id": touched.tenant_id, "actor": ACTOR}
        await commands.handle_in(con, DECIDER, b.stream_name(broadcast_id), command, metadata, INLINE)
