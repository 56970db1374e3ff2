"""The run-once background tasks (relay, projector with run completion and the progress feed, scheduler,
housekeeping),
each under a leader lock: any API or sender process may run them, one of each runs at a time, and
another process takes over within seconds when that one dies. At least one process of the
deployment must run them (CRIER_RUN_BACKGROUND, true by default everywhere)."""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from datetime import datetime

import asyncpg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from shared.audience import contact_versions
from shared.broadcasts.completion import finish_done_runs
from shared.broadcasts.counters import CountersView
from shared.broadcasts.progress import ProgressFeed
from shared.broadcasts.scheduler import run_scheduler
from shared.platform.bus import Names
from shared.platform.leader import run_as_leader
from shared.platform.logging import get_logger
from shared.platform.projections import AfterFold, Projection, run_projector
from shared.platform.relay import run_relay
from shared.platform.settings import Settings
from shared.tracking import early_receipts
from shared.tracking.early_receipts import EARLY_RECEIPTS_EVERY_S

log = get_logger(__name__)

SWEEP_EVERY_S = 3600.0  # what the sweep drops is days old: once an hour is plenty


def async_projections() -> list[tuple[Projection, AfterFold | None]]:
    """Projections the projector keeps up to date, each with what runs after it folds (inline
    ones are updated by the command handlers)."""
    return [(CountersView(), finish_done_runs)]


def start_background_tasks(
    settings: Settings, pool: asyncpg.Pool, nc: NATS, js: JetStreamContext, names: Names,
    clock: Callable[[], datetime],
) -> list[asyncio.Task]:
    dsn, poll = settings.database_url, settings.poll_interval_s

    async def relay(con: asyncpg.Connection) -> None:
        await run_relay(pool, con, js, names, poll)

    async def projector(con: asyncpg.Connection) -> None:
        # The progress feed publishes what the projector folds, so it runs beside it, with its lock.
        feed = ProgressFeed(pool, nc, names)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(feed.run(), name="progress-feed")
            await run_projector(pool, con, async_projections(), poll, committed=feed.committed)

    async def scheduler(_: asyncpg.Connection) -> None:
        # Housekeeping rides on the scheduler's lock: a lock of its own would cost every process
        # another connection competing for it.
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(run_housekeeping(pool), name="housekeeping")
            await run_scheduler(pool, clock)

    return [
        asyncio.create_task(run_as_leader(dsn, "relay", relay), name="relay"),
        asyncio.create_task(run_as_leader(dsn, "projector", projector), name="projector"),
        asyncio.create_task(run_as_leader(dsn, "scheduler", scheduler), name="scheduler"),
    ]


async def run_housekeeping(
    pool: asyncpg.Pool, *, every_s: float = EARLY_RECEIPTS_EVERY_S, sweep_every_s: float = SWEEP_EVERY_S,
) -> None:
    """Until cancelled: apply held receipts again every `every_s`, and drop what is kept for a time
    only (contacts' former data) every `sweep_every_s`."""
    swept_at = -math.inf
    while True:
        try:
            async with pool.acquire() as con:
                retried = await early_receipts.apply_again(con)
                if retried.applied or retried.expired:
                    log.info("held receipts applied again", applied=retried.applied, expired=retried.expired)
                if time.monotonic() - swept_at >= sweep_every_s:
                    if dropped := await contact_versions.sweep(con):
                        log.info("contact versions past their retention dropped", dropped=dropped)
                    swept_at = time.monotonic()
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("housekeeping failed, will retry", error=str(exc))
        await asyncio.sleep(every_s)


async def stop_background_tasks(tasks: list[asyncio.Task]) -> None:
    if not tasks:  # run_background=False: nothing was started
        return
    for task in tasks:
        task.cancel()
    _, stuck = await asyncio.wait(tasks, timeout=10)
    if stuck:  # never hang a shutdown on a task that ignores its cancel
        log.error("background tasks did not stop", tasks=[t.get_name() for t in stuck])
