"""The dispatcher: hands the planner's batches to JetStream, a fair window at a time.

JetStream's job queue is first come, first served. Had the planner published a whole run at once,
a ten-recipient broadcast would wait behind every job of a million-recipient one. Instead the
queue is kept a fraction of a second of work long (the QueueGauge reads the workers' consumer),
each run and tenant has a bounded window of jobs in flight, and shared.sending.window decides who
gets the next jobs: the least loaded tenant first. The dispatcher tops the queue up whenever
something may have changed: a batch finished (its BatchCompleted is appended, and the event store
notifies), the planner wrote batches (it notifies), a run was paused, resumed or cancelled (an
event again), or a paced run's due time came. It is one loop for every run: pacing is a due time per run, not a task asleep per broadcast,
so a pause, a cancel or another broadcast never waits on a sleeping planner.

One replica runs it at a time (a leader lock, as the relay). `runs.published` is how far it got:
batches below it were handed to JetStream. A crash between publishing and recording publishes
them again under the same Nats-Msg-Id, and the server drops the copies.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import datetime
from itertools import chain, zip_longest

import asyncpg
import nats.errors
from nats.js import JetStreamContext

from sender_service.planner import publish_jobs
from shared.broadcasts.status import RUNNING, Status, sql_list
from shared.channels import accounts
from shared.platform import eventstore
from shared.platform.bus import WORKERS_CONSUMER, Names
from shared.platform.clock import utc_now
from shared.platform.logging import get_logger
from shared.platform.projections import Wakeup
from shared.sending import snapshot, window
from shared.sending.jobs import Job

log = get_logger(__name__)
RUNS_PER_ROUND = 1000  # runs looked at per wake-up (the oldest first); the rest get the next round

# Runs with batches left to hand out, whether they go on, are paused or were called off, and how
# many of their published batches are unfinished. `settled_below` keeps the count a short range
# scan: batches below it all have an outcome.
_CANDIDATES = f"""
    SELECT r.broadcast_id, r.run, r.tenant_id, r.channel, r.provider_id, r.provider_ids, r.multichannel, r.published, r.batches,
           r.next_due_at,
           r.settled_below AS was_settled_below, coalesce(f.lowest, r.published) AS settled_below, f.in_flight,
           coalesce(b.run = r.run AND NOT b.deleted AND b.status IN {sql_list(RUNNING)}, false) AS goes_on,
           coalesce(b.run = r.run AND NOT b.deleted AND b.status = '{Status.PAUSED.value}', false) AS paused
    FROM runs r
    LEFT JOIN broadcasts b ON b.id = r.broadcast_id
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE bt.status IN ('queued', 'sending')) AS in_flight,
               min(bt.seq) FILTER (WHERE bt.status IN ('queued', 'sending', 'held')) AS lowest
        FROM batches bt
        WHERE bt.broadcast_id = r.broadcast_id AND bt.run = r.run AND bt.seq >= r.settled_below
          AND bt.seq < r.published
    ) f
    WHERE r.published < r.batches
    ORDER BY r.started_at
    LIMIT $1"""

_RECORD = """
    UPDATE runs r SET published = greatest(r.published, u.published), settled_below = u.settled_below,
                      next_due_at = coalesce(u.next_due_at, r.next_due_at)
    FROM unnest($1::uuid[], $2::int[], $3::int[], $4::int[], $5::timestamptz[])
         AS u(broadcast_id, run, published, settled_below, next_due_at)
    WHERE r.broadcast_id = u.broadcast_id AND r.run = u.run"""

# A called-off run (cancelled, stopped, reset, deleted): what was never handed out is dropped.
_DROP_UNPUBLISHED = """
    WITH dropped AS (
        UPDATE batches SET status = 'dropped', completed_at = now()
        WHERE broadcast_id = $1 AND run = $2 AND status = 'queued'
          AND seq >= (SELECT published FROM runs WHERE broadcast_id = $1 AND run = $2))
    UPDATE runs SET published = batches WHERE broadcast_id = $1 AND run = $2"""


class QueueGauge:
    """How many new jobs the queue may take now: the workers' consumer says how many jobs wait
    undelivered and how many workers wait for one; the rate workers take jobs at is measured
    over the last second."""

    def __init__(self, js: JetStreamContext, names: Names, backlog_s: float) -> None:
        self.js, self.names, self.backlog_s = js, names, backlog_s
        self._delivered: deque[tuple[float, int]] = deque()

    async def budget(self) -> int:
        info = await self.js.consumer_info(self.names.jobs_stream, WORKERS_CONSUMER)
        now, delivered = time.monotonic(), info.delivered.consumer_seq
        self._delivered.append((now, delivered))
        while len(self._delivered) > 2 and now - self._delivered[1][0] > 1.0:
            self._delivered.popleft()
        since, before = self._delivered[0]
        rate = (delivered - before) / (now - since) if now > since else 0.0
        return window.queue_budget(rate, info.num_pending or 0, info.num_waiting or 0, self.backlog_s)


class FixedBudget:
    """A budget that does not look at the queue (tests that publish a whole run at once)."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs

    async def budget(self) -> int:
        return self.jobs


class Dispatcher:
    def __init__(
        self, pool: asyncpg.Pool, js: JetStreamContext, names: Names, gauge: QueueGauge | FixedBudget,
        run_window: int, tenant_window: int, clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.pool, self.js, self.names, self.gauge, self.clock = pool, js, names, gauge, clock
        self.run_window, self.tenant_window = run_window, tenant_window

    async def dispatch_once(self) -> datetime | None:
        """Top every run's window up; returns when a paced run is due next (None: none waits)."""
        now = self.clock()
        async with self.pool.acquire() as con:
            rows = await con.fetch(_CANDIDATES, RUNS_PER_ROUND)
            if not rows:
                return None
            delays = await accounts.batch_delays(con, list({r["provider_id"] for r in rows if r["provider_id"]}))
        for r in rows:
            if not r["goes_on"] and not r["paused"]:
                await self._drop_unpublished(r["broadcast_id"], r["run"])
        live = {(r["broadcast_id"], r["run"]): r for r in rows if r["goes_on"] or r["paused"]}
        delay_of = {key: delays.get(r["provider_id"], 0) for key, r in live.items()}
        shares = window.shares(
            [window.RunWindow(key=key, tenant_id=r["tenant_id"], in_flight=r["in_flight"],
                              unpublished=r["batches"] - r["published"], paused=r["paused"], delay_ms=delay_of[key],
                              next_due_at=r["next_due_at"])
             for key, r in live.items()],
            now, await self.gauge.budget(), self.run_window, self.tenant_window,
        )
        # Interleaved, so that within this top-up no run's jobs queue behind another's.
        per_run = [await self._jobs(live[key], n) for key, n in shares.batches.items()]
        await publish_jobs(self.js, self.names, [j for j in chain(*zip_longest(*per_run)) if j is not None])
        await self._record(live, shares.batches, delay_of, now)
        return shares.next_due_at

    async def _jobs(self, run: asyncpg.Record, n: int) -> list[Job]:
        """The run's next `n` jobs. A multi-channel run's batches each say their channel and provider."""
        first = run["published"]
        routes: dict[int, asyncpg.Record] = {}
        if run["multichannel"]:
            async with self.pool.acquire() as con:
                routes = {r["seq"]: r for r in await con.fetch(
                    """SELECT seq, channel, provider_id FROM batches
                       WHERE broadcast_id = $1 AND run = $2 AND seq >= $3 AND seq < $4""",
                    run["broadcast_id"], run["run"], first, first + n)}
        jobs = []
        for seq in range(first, first + n):
            route = routes.get(seq)
            channel = route["channel"] if route else run["channel"]
            jobs.append(Job(tenant_id=run["tenant_id"], broadcast_id=run["broadcast_id"], run=run["run"], seq=seq,
                            channel=channel, provider_id=route["provider_id"] if route else run["provider_id"],
                            pool=tuple(run["provider_ids"]) if channel == run["channel"] else ()))
        return jobs

    async def _record(
        self, live: dict[window.RunKey, asyncpg.Record], granted: dict[window.RunKey, int],
        delay_of: dict[window.RunKey, int], now: datetime,
    ) -> None:
        changed = [
            (key, r["published"] + granted.get(key, 0), r["settled_below"],
             window.next_due(now, delay_of[key]) if granted.get(key) else None)
            for key, r in live.items()
            if granted.get(key) or r["settled_below"] != r["was_settled_below"]
        ]
        if not changed:
            return
        async with self.pool.acquire() as con:
            await con.execute(
                _RECORD, [k[0] for k, *_ in changed], [k[1] for k, *_ in changed], [c[1] for c in changed],
                [c[2] for c in changed], [c[3] for c in changed],
            )

    async def _drop_unpublished(self, broadcast_id: uuid.UUID, run: int) -> None:
        async with self.pool.acquire() as con, con.transaction():
            await snapshot.lock_run(con, broadcast_id, run)  # not while a snapshot chunk is being written
            await con.execute(_DROP_UNPUBLISHED, broadcast_id, run)
        log.info("unpublished batches of a called-off run dropped", broadcast_id=str(broadcast_id), run=run)


async def run_dispatcher(
    pool: asyncpg.Pool, listen_con: asyncpg.Connection, js: JetStreamContext, names: Names, backlog_s: float,
    run_window: int, tenant_window: int, poll_interval_s: float, clock: Callable[[], datetime] = utc_now,
) -> None:
    """Dispatch until cancelled, woken by appended events and written batches (polling as the
    fallback) and by the next paced run's due time. Run by one replica at a time."""
    # A short settle: a window drains in tens of milliseconds under load, and a top-up is cheap.
    wakeup = Wakeup(listen_con, settle_s=0.01, channels=(eventstore.NOTIFY_CHANNEL, snapshot.DISPATCH_CHANNEL))
    await wakeup.start()
    dispatcher = Dispatcher(pool, js, names, QueueGauge(js, names, backlog_s), run_window, tenant_window, clock)
    while True:
        timeout = poll_interval_s
        try:
            due = await dispatcher.dispatch_once()
            if due is not None:
                timeout = min(timeout, max((due - clock()).total_seconds(), 0.001))
        except (asyncpg.PostgresError, OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
            log.warning("dispatch failed, will retry", error=repr(exc))
        await wakeup.wait(timeout)
