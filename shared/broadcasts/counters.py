"""Broadcast counters per run, folded from snapshot and batch-outcome events (an async projection).

A broadcast's counters are its runs' summed (a top-up adds to them), with one correction: a retry
run goes to recipients an earlier run already counted, as failed or unknown. Its row records how
many of each it took over (`retried_failed`, `retried_unknown`, from its events), and the sum
takes them out of the earlier run's figures: its `total` does not add (the recipients were in the
total already) and they no longer count as failed/unknown there, but by the retry's outcome. So a
recipient counts once, by its latest run, without reading the ledger: after a retry that went
through, the broadcast shows them sent. (Counting each recipient by its latest ledger row instead
would be a scan of the ledger on every read of the counters, which the progress feed does four
times a second.)

It only folds. Finishing a run whose batches are all counted is run completion's job
(shared.broadcasts.completion), which the projector calls in the same transaction.

What happened after sending (opens, clicks, receipts, unsubscribes) is not folded from events: it
is counted in `engagement_counters` per run and channel as it comes (shared/tracking), and read
here beside the folded counters, in the same query.
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

# What happened after sending, summed from engagement_counters (written as opens, clicks, receipts
# and unsubscribes come: shared/tracking): `opened`, `clicked` ... count messages, `opens`, `clicks`
# ... every time.
ENGAGEMENT = ("delivered", "read", "opened", "opens", "proxy_opened", "proxy_opens", "clicked", "clicks", "bounced",
              "complained", "unsubscribed")


class Counters(msgspec.Struct, frozen=True, kw_only=True):
    total: int = 0
    sent: int = 0
    failed: int = 0
    unknown: int = 0  # handed to the provider, no answer: may have arrived; not resent unless retried
    suppressed: int = 0  # suppressed after the snapshot, before their batch: not sent
    skipped: int = 0  # a multi-channel run's (recipient, channel) pairs without an address: not in total
    delivered: int = 0
    read: int = 0
    opened: int = 0
    opens: int = 0
    proxy_opened: int = 0
    proxy_opens: int = 0
    clicked: int = 0
    clicks: int = 0
    bounced: int = 0
    complained: int = 0
    unsubscribed: int = 0

    def engaged(self) -> int:
        """All the engagement figures together: they only grow, so this says which of two reads is later."""
        return sum(getattr(self, name) for name in ENGAGEMENT)


class CountersView:
    name = "counters"
    categories = (b.CATEGORY, bt.CATEGORY)

    async def apply(self, con: asyncpg.Connection, event: RecordedEvent) -> None:
        if event.category == bt.CATEGORY:
            done = codec.from_recorded(event, bt.Event)
            await con.execute(
                """INSERT INTO broadcast_counters (broadcast_id, run, sent, failed, unknown, suppressed, batches_done)
                   VALUES ($1, $2, $3, $4, $5, $6, 1)
                   ON CONFLICT (broadcast_id, run) DO UPDATE SET sent = broadcast_counters.sent + $3,
                       failed = broadcast_counters.failed + $4, unknown = broadcast_counters.unknown + $5,
                       suppressed = broadcast_counters.suppressed + $6,
                       batches_done = broadcast_counters.batches_done + 1""",
                done.broadcast_id, done.run, done.sent, done.failed, done.unknown, done.suppressed,
            )
            return
        match codec.from_recorded(event, b.Event):
            case b.BroadcastStarted() as started:
                await con.execute(
                    """INSERT INTO broadcast_counters (broadcast_id, run, total, retried_failed, retried_unknown)
                       VALUES ($1, $2, $3, $4, $5)
                       ON CONFLICT (broadcast_id, run) DO UPDATE SET total = $3, retried_failed = $4,
                           retried_unknown = $5""",
                    b.id_from_stream(event.stream_name), started.run, started.audience_size,
                    started.retried_failed, started.retried_unknown,
                )
            case b.AudienceSnapshotted() as snapshotted:
                # A retry's snapshot has the final split (contacts deleted since it was accepted are
                # left out), so total = retried_failed + retried_unknown still; other runs have 0s.
                await con.execute(
                    """INSERT INTO broadcast_counters (broadcast_id, run, total, batches, snapshotted,
                                                      retried_failed, retried_unknown, skipped)
                       VALUES ($1, $2, $3, $4, true, $5, $6, $7)
                       ON CONFLICT (broadcast_id, run) DO UPDATE SET total = $3, batches = $4, snapshotted = true,
                           retried_failed = $5, retried_unknown = $6, skipped = $7""",
                    b.id_from_stream(event.stream_name), snapshotted.run, snapshotted.recipients, snapshotted.batches,
                    snapshotted.retried_failed, snapshotted.retried_unknown, snapshotted.skipped,
                )
            case _:
                pass

    async def clear(self, con: asyncpg.Connection) -> None:
        await con.execute("TRUNCATE broadcast_counters")


_SENDING = ("total", "sent", "failed", "unknown", "suppressed", "skipped")


def _per_broadcast(selected: str) -> str:
    """A query of each selected broadcast's counters: its runs summed per table (both read by their
    primary key's broadcast_id prefix), joined. `selected` is a condition on broadcast_id."""
    return f"""
WITH sending AS (
    SELECT broadcast_id, sum(total - retried_failed - retried_unknown)::bigint AS total,
           sum(sent)::bigint AS sent, sum(failed - retried_failed)::bigint AS failed,
           sum(unknown - retried_unknown)::bigint AS unknown, sum(suppressed)::bigint AS suppressed,
           sum(skipped)::bigint AS skipped
    FROM broadcast_counters WHERE {selected} GROUP BY broadcast_id
), engagement AS (
    SELECT broadcast_id, {", ".join(f"sum({name})::bigint AS {name}" for name in ENGAGEMENT)}
    FROM engagement_counters WHERE {selected} GROUP BY broadcast_id
)
SELECT broadcast_id, {", ".join(f"coalesce({name}, 0) AS {name}" for name in _SENDING + ENGAGEMENT)}
FROM sending FULL JOIN engagement USING (broadcast_id)
"""


# One query for any number of broadcasts.
_COUNTERS = _per_broadcast("broadcast_id = ANY($1::uuid[])")


async def counters_of(con: asyncpg.Connection, broadcast_ids: list[uuid.UUID]) -> dict[uuid.UUID, Counters]:
    """Counters summed over a broadcast's runs (a top-up adds to them), a retry's recipients taken
    out of the run it retried (see the module's docstring), and the engagement figures summed over
    its runs and channels: one query however many broadcasts."""
    rows = await con.fetch(_COUNTERS, broadcast_ids)
    return {r["broadcast_id"]: Counters(**{name: r[name] for name in _SENDING + ENGAGEMENT}) for r in rows}


async def counters_by_status(con: asyncpg.Connection, broadcasts: str, *args: object) -> dict[str, Counters]:
    """The counters of the broadcasts the query `broadcasts` (with `args`) selects, as `id, status`:
    each broadcast's as counters_of has them, summed per status in Postgres (for any number of
    broadcasts, a row per status). shown() of a status's sum is the sum of its broadcasts' shown():
    their unsent messages are all queued or all dropped, and never fewer than none (no run's folds
    count more outcomes than it has recipients, a retry's included). The ids as an array, as
    counters_of passes them: each table probed by its primary key (measured, a window of 7,500
    broadcasts: 28 ms, against 42 ms for the hash join the planner picks for `IN (SELECT ...)`)."""
    names = _SENDING + ENGAGEMENT
    rows = await con.fetch(
        f"""WITH selected AS MATERIALIZED ({broadcasts})
            SELECT s.status, {", ".join(f"sum(c.{name})::bigint AS {name}" for name in names)}
            FROM ({_per_broadcast("broadcast_id = ANY(ARRAY(SELECT id FROM selected))")}) c
            JOIN selected s ON s.id = c.broadcast_id GROUP BY s.status""", *args)
    return {r["status"]: Counters(**{name: r[name] for name in names}) for r in rows}


def shown(counters: Counters | None, status: str) -> dict[str, int]:
    """Counters as users see them: while a run is active its unsent messages are `queued`; once it
    was cancelled or stopped they are `dropped`. The engagement figures as they are."""
    c = counters or Counters()
    unsent = max(c.total - c.sent - c.failed - c.unknown - c.suppressed, 0)
    active = status in ACTIVE
    return {"total": c.total, "queued": unsent if active else 0, "sent": c.sent, "failed": c.failed,
            "unknown": c.unknown, "suppressed": c.suppressed, "dropped": 0 if active else unsent,
            "skipped": c.skipped, **{name: getattr(c, name) for name in ENGAGEMENT}}
