"""Projections: read models folded from the event log, each writing its view and its checkpoint
in one transaction so a replay never counts an event twice, and rebuildable from zero."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import asyncpg

from shared.platform import eventstore
from shared.platform.eventstore import Checkpoint, RecordedEvent
from shared.platform.logging import get_logger

log = get_logger(__name__)


class Projection(Protocol):
    name: str
    # Stream categories this projection reads; None reads every event.
    categories: tuple[str, ...] | None

    async def apply(self, con: asyncpg.Connection, event: RecordedEvent) -> None: ...

    async def clear(self, con: asyncpg.Connection) -> None:
        """Empty the view before a rebuild."""


# What runs after a projection folded a batch of events, in the same transaction (run completion).
AfterFold = Callable[[asyncpg.Connection, list[RecordedEvent]], Awaitable[None]]
# What hears of a batch of events once it is committed (the progress feed): after the commit, so
# whoever it tells reads the new state; synchronous, so it only notes them and never holds up the fold.
AfterCommit = Callable[[list[RecordedEvent]], None]


async def catch_up(
    pool: asyncpg.Pool, projection: Projection, batch_size: int = 500, then: AfterFold | None = None,
    committed: AfterCommit | None = None,
) -> int:
    """Apply every committed event past the projection's checkpoint; returns how many were applied.

    `then` sees each batch of applied events before the transaction commits, so what it writes
    commits with the view and the checkpoint, or not at all; `committed` sees it once committed."""
    applied = 0
    while True:
        async with pool.acquire() as con, con.transaction():
            # FOR UPDATE: a second runner (leader hand-over) waits here and then sees the new checkpoint.
            checkpoint = await eventstore.load_checkpoint(con, projection.name, for_update=True)
            events = await eventstore.read_committed(con, checkpoint, batch_size, projection.categories)
            for event in events:
                await projection.apply(con, event)
            if events:
                if then is not None:
                    await then(con, events)
                await eventstore.save_checkpoint(con, projection.name, events[-1].checkpoint)
        if events and committed is not None:
            committed(events)
        applied += len(events)
        if len(events) < batch_size:
            return applied


async def rebuild(pool: asyncpg.Pool, projection: Projection) -> int:
    """Clear the view, reset the checkpoint to zero and replay the whole log into it. What runs
    after the projection folds (run completion) is not replayed: its events are in the log already."""
    async with pool.acquire() as con, con.transaction():
        await eventstore.load_checkpoint(con, projection.name, for_update=True)
        await projection.clear(con)
        await eventstore.save_checkpoint(con, projection.name, Checkpoint())
    return await catch_up(pool, projection)


class Wakeup:
    """LISTENs for appends so tailing readers react in milliseconds, with polling as the fallback.

    After a notification it lets `settle_s` pass before the reader reads: under load every batch a
    worker finishes notifies, and reading each on its own cost a round of queries per event (2,000
    for a 1M send). Waiting 50 ms lets the reader take them ten or more at a time."""

    def __init__(
        self, con: asyncpg.Connection, settle_s: float = 0.05, channels: tuple[str, ...] = (eventstore.NOTIFY_CHANNEL,)
    ) -> None:
        self._con, self._settle_s, self._channels = con, settle_s, channels
        self._event = asyncio.Event()

    async def start(self) -> None:
        for channel in self._channels:
            await self._con.add_listener(channel, self._notified)

    def _notified(self, *_: object) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that arrives as the
        # event fires (CPython gh-86296), and a relay that ignores its cancel hangs the shutdown.
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            pass
        else:
            await asyncio.sleep(self._settle_s)
        self._event.clear()  # what was notified so far is committed: the next read sees it


async def run_projector(
    pool: asyncpg.Pool,
    listen_con: asyncpg.Connection,
    projections: list[tuple[Projection, AfterFold | None]],
    poll_interval: float,
    committed: AfterCommit | None = None,
) -> None:
    """Keep every projection caught up (each with what runs after it folds) until cancelled;
    `committed` hears of every batch any of them committed."""
    wakeup = Wakeup(listen_con)
    await wakeup.start()
    while True:
        for projection, then in projections:
            try:
                await catch_up(pool, projection, then=then, committed=committed)
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("projection failed, will retry", projection=projection.name, error=str(exc))
        # A commit whose transaction was still below the horizon needs another look shortly.
        await wakeup.wait(poll_interval)
