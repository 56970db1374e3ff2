"""The relay: publishes every committed event to JetStream exactly once, in commit order.

It tails the store with the gap-safe reader and checkpoints after the server acknowledged a
batch. A crash between publish and checkpoint republishes that batch; the `Nats-Msg-Id` header
(the event id) makes the server drop the copies. For a gap longer than the duplicate window,
start-up first moves the checkpoint up to the last event the stream already holds.

An event nats-server would never take (its envelope over the server's max_payload, 1 MiB by
default) is set aside rather than retried forever, which held up every later event of every
tenant: it is recorded in `parked_events`, logged at error level, and the checkpoint moves past it
in the same transaction. Only that: a connection problem or a lost ack is retried from the
checkpoint as before. The projections read the store in Postgres, not NATS, so a parked event is
still folded into the views; only subscribers of the event stream miss it. The API's input limits
(shared/kernel/limits.py) keep events this large from being appended in the first place.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

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
# nats-server counts the headers against max_payload too, and nats-py checks only the payload: an
# event this close to the limit is set aside as well (ours are under 200 bytes: Nats-Msg-Id and the type).
HEADER_ROOM = 1024


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


@dataclass(frozen=True, slots=True)
class TooLarge:
    """An event the server would refuse whatever happens: set aside, not retried."""

    event: RecordedEvent
    size: int
    reason: str


def _max_payload(js: JetStreamContext) -> int:
    # The limit the server announced on connect (nats-py keeps it on the connection it wraps).
    return js._nc.max_payload  # noqa: SLF001


async def publish_batch(js: JetStreamContext, names: Names, events: list[RecordedEvent]) -> list[TooLarge]:
    """Publish the events and wait for every ack; returns those too large to publish (not sent).

    Publishes from one connection are stored in the order sent; await every ack before checkpointing.
    The size check is one comparison per event, and is made before publish_async: when nats-py
    raises MaxPayloadError there it has already taken one of its pending-publish slots and never
    gives it back, so leaning on the exception would wear the relay down to a stall."""
    limit = _max_payload(js) - HEADER_ROOM
    futures = []
    too_large: list[TooLarge] = []
    for e in events:
        payload = _encode(envelope_of(e))
        if len(payload) > limit:
            too_large.append(TooLarge(e, len(payload), f"envelope of {len(payload):,} bytes over the server's "
                                                       f"max_payload of {limit + HEADER_ROOM:,} (less {HEADER_ROOM} for headers)"))
            continue
        try:
            futures.append(await js.publish_async(
                subject_of(names, e), payload, headers={"Nats-Msg-Id": str(e.id), "Crier-Event-Type": e.type}
            ))
        except nats.errors.MaxPayloadError as exc:  # the server's limit changed under us: same outcome
            too_large.append(TooLarge(e, len(payload), f"{exc} ({len(payload):,} bytes)"))
    await await_acks(futures)
    return too_large


async def park(con: asyncpg.Connection, parked: list[TooLarge]) -> None:
    """Record events set aside (a republish after a crash records each once)."""
    await con.executemany(
        """INSERT INTO parked_events (event_id, global_position, transaction_id, stream_name, type, tenant_id,
                                      size_bytes, reason)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_id) DO NOTHING""",
        [(p.event.id, p.event.global_position, p.event.transaction_id, p.event.stream_name, p.event.type,
          _tenant(p.event), p.size, p.reason) for p in parked],
    )


def _tenant(event: RecordedEvent) -> str | None:
    tenant = event.metadata.get("tenant_id")
    return None if tenant is None else str(tenant)


async def relay_once(pool: asyncpg.Pool, js: JetStreamContext, names: Names) -> int:
    """Publish one batch past the checkpoint; returns how many events it took (published or set aside)."""
    async with pool.acquire() as con:
        checkpoint = await eventstore.load_checkpoint(con, CHECKPOINT)
        events = await eventstore.read_committed(con, checkpoint, BATCH)
    if not events:
        return 0
    too_large = await publish_batch(js, names, events)
    async with pool.acquire() as con:
        if too_large:
            async with con.transaction():  # the record and the checkpoint past it, together
                await park(con, too_large)
                await eventstore.save_checkpoint(con, CHECKPOINT, events[-1].checkpoint)
            for p in too_large:
                log.error(
                    "relay set an event aside: too large for NATS, never published (see parked_events)",
                    event_id=str(p.event.id), global_position=p.event.global_position, stream=p.event.stream_name,
                    type=p.event.type, tenant_id=_tenant(p.event), size_bytes=p.size, reason=p.reason,
                )
        else:
            await eventstore.save_checkpoint(con, CHECKPOINT, events[-1].checkpoint)
    return len(events)


async def parked_count(con: asyncpg.Connection) -> int:
    return await con.fetchval("SELECT count(*) FROM parked_events")


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
