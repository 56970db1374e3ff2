"""Run-once background tasks: a Postgres advisory lock elects one replica to run each task.

The lock lives on a connection of its own. When the leader dies its connection drops and the
lock is released, so a waiting replica takes over within one retry interval. When the leader
loses its lock connection (without dying) a watchdog stops its task, so two never run for long;
every task is also safe to overlap briefly (dedupe ids, row locks on checkpoints).
"""
from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable

import asyncpg

from shared.platform import db
from shared.platform.logging import get_logger

log = get_logger(__name__)

# The task gets the lock connection, which also serves as its LISTEN connection.
LeaderTask = Callable[[asyncpg.Connection], Awaitable[None]]


def lock_key(name: str) -> int:
    return (0x43726965 << 32) | zlib.crc32(name.encode())


async def _watch(con: asyncpg.Connection, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        async with asyncio.timeout(max(interval, 1.0) * 2):  # not wait_for: see Wakeup.wait
            await con.fetchval("SELECT 1")


async def run_as_leader(
    dsn: str, name: str, task: LeaderTask, *, retry_interval: float = 1.0, on_leader: Callable[[], None] | None = None
) -> None:
    """Compete for leadership of `name` forever (until cancelled), running `task` while leader."""
    key = lock_key(name)
    while True:
        con: asyncpg.Connection | None = None
        try:
            con = await db.connect(dsn)
            if await con.fetchval("SELECT pg_try_advisory_lock($1)", key):
                log.info("leadership acquired", task=name)
                if on_leader:
                    on_leader()
                await _run_while_locked(con, name, task, retry_interval)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a lost connection or a crashed task: compete again
            log.warning("leader task stopped", task=name, error=repr(exc))
        finally:
            if con is not None:
                con.terminate()  # drops the lock with the session
        await asyncio.sleep(retry_interval)


async def _run_while_locked(con: asyncpg.Connection, name: str, task: LeaderTask, interval: float) -> None:
    work = asyncio.create_task(task(con), name=f"leader:{name}")
    watchdog = asyncio.create_task(_watch(con, interval), name=f"leader-watch:{name}")
    try:
        done, _ = await asyncio.wait({work, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        for finished in done:
            finished.result()  # re-raise what stopped it
    finally:
        for t in (work, watchdog):
            t.cancel()
        await asyncio.gather(work, watchdog, return_exceptions=True)
