"""The API replica's run-once background tasks (relay, projector, scheduler, progress), each under a leader lock."""
from __future__ import annotations

import asyncio

import asyncpg

from api_service.services import Services
from shared.broadcasts.counters import CountersView
from shared.broadcasts.progress import publish_progress
from shared.broadcasts.scheduler import run_scheduler
from shared.platform.leader import run_as_leader
from shared.platform.logging import get_logger
from shared.platform.projections import Projection, run_projector
from shared.platform.relay import run_relay

log = get_logger(__name__)


def async_projections() -> list[Projection]:
    """Projections the projector keeps up to date (inline ones are updated by the handlers)."""
    return [CountersView()]


def start_background_tasks(services: Services) -> list[asyncio.Task]:
    settings = services.settings
    dsn, poll = settings.database_url, settings.poll_interval_s

    async def relay(con: asyncpg.Connection) -> None:
        await run_relay(services.pool, con, services.js, services.names, poll)

    async def projector(con: asyncpg.Connection) -> None:
        await run_projector(services.pool, con, async_projections(), poll)

    async def scheduler(_: asyncpg.Connection) -> None:
        await run_scheduler(services.pool, services.clock)

    async def progress(_: asyncpg.Connection) -> None:
        await publish_progress(services.pool, services.nats, services.names)

    return [
        asyncio.create_task(run_as_leader(dsn, "progress", progress), name="progress"),
        asyncio.create_task(run_as_leader(dsn, "relay", relay), name="relay"),
        asyncio.create_task(run_as_leader(dsn, "projector", projector), name="projector"),
        asyncio.create_task(run_as_leader(dsn, "scheduler", scheduler), name="scheduler"),
    ]


async def stop_background_tasks(tasks: list[asyncio.Task]) -> None:
    if not tasks:  # run_background=False: nothing was started
        return
    for task in tasks:
        task.cancel()
    _, stuck = await asyncio.wait(tasks, timeout=10)
    if stuck:  # never hang a shutdown on a task that ignores its cancel
        log.error("background tasks did not stop", tasks=[t.get_name() for t in stuck])
