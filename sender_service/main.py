"""The sender service entrypoint: connects, sets up streams and consumers, runs planner and workers."""
from __future__ import annotations

import asyncio
import signal

from sender_service.dispatcher import run_dispatcher
from sender_service.job_context import JobContextLoader
from sender_service.planner import Planner, consume_starts
from sender_service.worker import JobProcessor, consume
from shared.background import start_background_tasks, stop_background_tasks
from shared.platform import bus, db
from shared.platform.clock import utc_now
from shared.platform.leader import run_as_leader
from shared.platform.logging import get_logger
from shared.platform.settings import Settings

log = get_logger(__name__)


async def run_sender(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGINT/SIGTERM when run as a process)."""
    stop = stop or _stop_on_signals()
    await db.migrate(settings.database_url)
    connections = settings.sender_concurrency + settings.planner_concurrency + 4  # + dispatcher and background
    pool = await db.create_pool(settings.database_url, max_size=connections)
    nc = await bus.connect(settings.nats_url, name="crier-sender")
    js = nc.jetstream(publish_async_max_pending=4000)
    names = await bus.ensure_streams(js, settings)
    await bus.ensure_sender_consumers(js, names, settings.job_ack_wait_s)
    processor = JobProcessor(pool, JobContextLoader(
        allow_private_networks=settings.allow_private_networks, public_url=settings.public_base_url),
                             keep_alive_s=settings.job_ack_wait_s / 4)

    async def dispatcher(con) -> None:  # the leader lock's connection is its LISTEN connection
        await run_dispatcher(pool, con, js, names, settings.send_backlog_s, settings.send_window_jobs,
                             settings.send_window_jobs_per_tenant, settings.poll_interval_s)

    planner = Planner(pool, js, names)
    tasks = [
        asyncio.create_task(consume_starts(js, names, planner, stop, settings.planner_concurrency,
                                     settings.job_ack_wait_s / 4), name="planner"),
        asyncio.create_task(consume(js, names, processor, stop, settings.sender_concurrency), name="workers"),
    ]
    # One dispatcher per deployment, in whichever sender holds its lock (another takes over if it dies).
    dispatching = asyncio.create_task(run_as_leader(settings.database_url, "dispatcher", dispatcher), name="dispatcher")
    # The relay, projector, scheduler and progress feed run somewhere under leader locks: here too,
    # so a deployment whose API replicas run without them still completes its runs.
    background = (start_background_tasks(settings, pool, nc, js, names, utc_now)
                  if settings.run_background else [])
    log.info("sender ready", concurrency=settings.sender_concurrency)
    try:
        await stop.wait()
    finally:
        await stop_background_tasks([*background, dispatching])
        # Let in-flight jobs finish (their fetch loops end at `stop`); unacked ones are redelivered anyway.
        await asyncio.wait(tasks, timeout=15)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bus.close(nc)
        await pool.close()
        log.info("sender stopped")


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
