"""The NATS JetStream adapter: connection, stream names, subjects, the event envelope every
subscriber reads, and idempotent stream set-up."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared.platform.logging import get_logger
from shared.platform.settings import Settings

log = get_logger(__name__)


class Names:
    """Stream names and subjects, all under the deployment's prefix (tests use one each)."""

    def __init__(self, prefix: str = "") -> None:
        self._stream = f"{prefix}_" if prefix else ""
        self._subject = f"{prefix}." if prefix else ""

    @property
    def events_stream(self) -> str:
        return f"{self._stream}CRIER_EVENTS"

    @property
    def jobs_stream(self) -> str:
        return f"{self._stream}CRIER_JOBS"

    def event_subject(self, tenant: str, category: str, event_type: str) -> str:
        return f"{self._subject}crier.events.{tenant}.{category}.{event_type}"

    def events_filter(self, tenant: str = "*", category: str = "*", event_type: str = "*") -> str:
        return f"{self._subject}crier.events.{tenant}.{category}.{event_type}"

    @property
    def events_all(self) -> str:
        return f"{self._subject}crier.events.>"

    def progress_subject(self, tenant: str, broadcast_id: str) -> str:
        """Live progress of one broadcast (core NATS, not stored in a stream)."""
        return f"{self._subject}crier.progress.{tenant}.broadcast.{broadcast_id}"

    def job_subject(self, channel: str) -> str:
        return f"{self._subject}crier.jobs.{channel}"

    @property
    def jobs_all(self) -> str:
        return f"{self._subject}crier.jobs.>"


class EventEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """What outside subscribers receive on crier.events.<tenant>.<category>.<Type> (docs/events.md)."""

    id: uuid.UUID
    type: str
    stream: str
    position: int
    global_position: int
    tenant_id: str | None
    data: dict[str, Any]
    metadata: dict[str, Any]
    created_at: datetime


ACK_TIMEOUT_S = 5.0


async def await_acks(futures: list[asyncio.Future], timeout: float = ACK_TIMEOUT_S) -> None:
    """Wait for publish acks, but not forever: nats-py never fails them when the connection drops,
    so an unbounded wait would stall the publisher (and keep its leader lock) until a restart.
    A timeout raises asyncio.TimeoutError; the caller republishes and Nats-Msg-Id drops the copies."""
    try:
        await asyncio.wait_for(asyncio.gather(*futures), timeout)
    finally:
        for future in futures:
            if not future.done():
                future.cancel()


async def connect(url: str, name: str) -> NATS:
    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,  # ride out a NATS restart instead of dying
        reconnect_time_wait=0.5,
        pending_size=64 * 1024 * 1024,
    )


async def close(nc: NATS, timeout_s: float = 5.0) -> None:
    """Flush what was published, then close. Not `drain()`: by now the consumer tasks have ended,
    and nats-py's drain of their pull subscriptions ran into its 30 s drain timeout on every
    shutdown (seen in `crier bench`); unacked jobs are redelivered anyway."""
    try:
        await nc.flush(timeout_s)
    except Exception as exc:  # a dead connection has nothing left to flush
        log.warning("nats flush on close failed", error=repr(exc))
    await nc.close()


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("stream created", stream=config.name)
        return
    await js.update_stream(config)


async def ensure_streams(js: JetStreamContext, settings: Settings) -> Names:
    """Create or update Crier's streams; safe to run from every replica at every start."""
    names = Names(settings.nats_prefix)
    await _ensure_stream(
        js,
        StreamConfig(
            name=names.events_stream,
            subjects=[names.events_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=7 * 24 * 3600,
            duplicate_window=settings.nats_duplicate_window_s,
        ),
    )
    await _ensure_stream(
        js,
        StreamConfig(
            name=names.jobs_stream,
            subjects=[names.jobs_all],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            duplicate_window=settings.nats_duplicate_window_s,
        ),
    )
    return names


async def pull_each(
    js: JetStreamContext, durable: str, stream: str, handle: Callable[[Msg], Awaitable[None]],
    stop: asyncio.Event, concurrency: int,
) -> None:
    """Hand the messages of a shared durable pull consumer to `handle`, one at a time in each of
    `concurrency` tasks, until `stop` is set. Each task binds its own subscription: concurrent
    fetches on one subscription share its inbox and may take each other's messages."""

    async def loop() -> None:
        sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch=1, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                await handle(msg)

    await asyncio.gather(*(loop() for _ in range(concurrency)))


class KeepAlive:
    """While a message is being worked on, tell JetStream so every `every_s` (`in_progress`), from a
    task of its own: a slow provider call or a wait for Postgres does not get the message handed to
    another consumer, while a process that dies or freezes has it redelivered within the ack wait."""

    def __init__(self, msg: Msg, every_s: float) -> None:
        self.msg, self.every_s = msg, every_s
        self._task: asyncio.Task | None = None

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.msg.in_progress()
            except Exception as exc:  # NATS away: the next beat tries again (the ack wait is the bound)
                log.debug("in_progress failed", error=repr(exc))

    async def __aenter__(self) -> "KeepAlive":
        self._task = asyncio.create_task(self._beat(), name="keep-alive")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


PLANNER_CONSUMER = "planner"
WORKERS_CONSUMER = "workers"


async def ensure_sender_consumers(js: JetStreamContext, names: Names, ack_wait_s: float = 6.0) -> None:
    """The durable pull consumers shared by every sender replica (created or updated idempotently).

    A short ack wait, kept up by KeepAlive while a message is worked on: a sender that dies or
    freezes has its planning and its jobs taken over by another within `ack_wait_s`."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    await js.add_consumer(
        names.events_stream,
        ConsumerConfig(
            durable_name=PLANNER_CONSUMER,
            # Every broadcast event: the planner acts on BroadcastStarted and BroadcastResumed.
            filter_subject=names.events_filter(category="broadcast"),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_deliver=-1,
        ),
    )
    await js.add_consumer(
        names.jobs_stream,
        ConsumerConfig(
            durable_name=WORKERS_CONSUMER,
            filter_subject=names.jobs_all,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,  # a late ack is harmless (the ledger decides)
            max_deliver=-1,  # never drop a job: a failing one is retried with nak(delay)
            max_ack_pending=1000,
        ),
    )
