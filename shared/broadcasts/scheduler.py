"""The scheduler: starts scheduled broadcasts when due, each occurrence exactly once.

It runs under a leader lock in the API service, but correctness does not depend on the lock: the
FireOccurrence command names the occurrence it fires, and the decider (with the event store's
expected-version check) turns every second attempt at the same occurrence into a no-op. So
several schedulers racing, or one retrying after a crash, still start one run per occurrence.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import asyncpg

from shared.broadcasts import handlers
from shared.broadcasts.status import Status
from shared.platform.logging import get_logger

log = get_logger(__name__)


async def tick(pool: asyncpg.Pool, now: datetime, limit: int = 100) -> int:
    """Fire every broadcast due at `now`; returns how many runs this call started (or skipped)."""
    async with pool.acquire() as con:
        due = await con.fetch(
            f"""SELECT id, scheduled_at FROM broadcasts
               WHERE status = '{Status.SCHEDULED.value}' AND NOT deleted AND scheduled_at <= $1
               ORDER BY scheduled_at LIMIT $2""",
            now, limit,
        )
    fired = 0
    for row in due:
        try:
            if await handlers.fire(pool, row["id"], row["scheduled_at"], now):
                fired += 1
                log.info("occurrence fired", broadcast_id=str(row["id"]), occurrence_at=row["scheduled_at"].isoformat())
        except Exception as exc:  # one broken broadcast must not hold up the others
            log.error("firing failed, will retry", broadcast_id=str(row["id"]), error=repr(exc))
    return fired


async def run_scheduler(pool: asyncpg.Pool, clock: Callable[[], datetime], interval_s: float = 1.0) -> None:
    """Tick until cancelled."""
    while True:
        try:
            await tick(pool, clock())
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("scheduler tick failed, will retry", error=str(exc))
        await asyncio.sleep(interval_s)
