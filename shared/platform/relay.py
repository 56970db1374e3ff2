"""The relay: publishes every committed event to JetStream exactly once, in commit order.

It tails the store with the gap-safe reader and checkpoints after the server acknowledged a
batch. A crash between publish and checkpoint republishes that batch; the `Nats-Msg-Id` header
(the event id) makes the server drop the copies. For a gap longer than the duplicate window,
start-up first moves the checkpoint up to the last event the stream already holds.
"""
from __future__ import annotations

import asyncio
import uuid

import asyncpg
import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.platform import eventstore
from shared.platform.bus import EventEnvelope, Names, await_acks
from shared.platform.eventstore import RecordedEvent
from shared.platform.logging import get_logger
from shared.platform.projections import Wakeup

log = get_logger(__name__)
CHECKPOINT = "relay"
BATCH = 500


_encode = msgspec.json.Encoder().encode


def envelope_of(event: RecordedEvent) -> EventEnvelope:
    return EventEnvelope(
        id=event.id,
        type=event.type,
        stream=event.stream_name,
        position=event.position,
        global_position=event.global_position,
        tenant_id=event.metadata.get("tenant_id"),
        data=event.data,
        metadata=event.metadata,
        created_at=event.created_at,
    )


def subject_of(names: Names, event: RecordedEvent) -> str:
    tenant = event.metadata.get("tenant_id") or "_"
    return names.event_subject(str(tenant), event.category, event.type)


async def _last_published_id(js: JetStreamContext, names: Names) -> uuid.UUID | None:
    info = await js.stream_info(names.events_stream)
    if not info.state.last_seq:
        return None
    try:
        msg = await js.get_msg(names.events_stream, info.state.last_seq)
    except NotFoundError:
        return None
    msg_id = (msg.headers or {}).get("Nats-Msg-Id")
    try:
        return uuid.UUID(msg_id) if msg_id else None
    except ValueError:
        return None


async def reconcile_checkpoint(pool: asyncpg.Pool, js: JetStreamContext, names: Names) -> None:
    """Skip what the stream already holds: publishing is in commit order, so everything up to
    the stream's last event was published even if the checkpoint write was lost in a crash."""
    last_id = await _last_published_id(js, names)
    if last_id is None:
        return
    async with pool.acquire() as con, con.transaction():
        checkpoint = await eventstore.load_checkpoint(con, CHECKPOINT, for_update=True)
        event = await eventstore.find_event(con, last_id)
        if event is not None and (event.transaction_id, event.global_position) > (
            checkpoint.transaction_id,
            checkpoint.global_position,
        ):
            await eventstore.save_checkpoint(con, CHECKPOINT, event.checkpoint)
            log.info("relay checkpoint moved to the stream's last event", event_id=str(last_id))


async def publish_batch(js: JetStreamContext, names: Names, events: list[RecordedEvent]) -> None:
    # Publishes from one connection are stored in the order sent; await every ack before checkpointing.
    futures = [
        await js.publish_async(
            subject_of(names, e),
            _encode(envelope_of(e)),
            headers={"Nats-Msg-Id": str(e.id), "Crier-Event-Type": e.type},
        )
        for e in events
    ]
    await await_acks(futures)


async def relay_once(pool: asyncpg.Pool, js: JetStreamContext, names: Names) -> int:
    """Publish one batch past the checkpoint; returns how many events it published."""
    async with pool.acquire() as con:
        checkpoint = await eventstore.load_checkpoint(con, CHECKPOINT)
        events = await eventstore.read_committed(con, checkpoint, BATCH)
    if not events:
        return 0
    await publish_batch(js, names, events)
    async with pool.acquire() as con:
        await eventstore.save_checkpoint(con, CHECKPOINT, events[-1].checkpoint)
    return len(events)


async def run_relay(
    pool: asyncpg.Pool, listen_con: asyncpg.Connection, js: JetStreamContext, names: Names, poll_interval: float
) -> None:
    """Relay until cancelled. Run by one replica at a time (see shared.platform.leader)."""
    wakeup = Wakeup(listen_con)
    await wakeup.start()
    await reconcile_checkpoint(pool, js, names)
    while True:
        try:
            while await relay_once(pool, js, names) == BATCH:
                pass
        except (asyncpg.PostgresError, OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
            log.warning("relay batch failed, will retry from the checkpoint", error=str(exc))
        await wakeup.wait(poll_interval)
