"""The relay against a real Postgres and a real nats-server: every committed event reaches JetStream
exactly once, in commit order, through crashes between commit, publish and checkpoint."""
from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import msgspec
import pytest
from nats.js.api import StreamConfig

from shared.platform import bus, db, eventstore, relay
from shared.platform.bus import EventEnvelope, Names
from shared.platform.eventstore import (
    ANY_VERSION,
    Checkpoint,
    NewEvent,
    RecordedEvent,
    WrongExpectedVersion,
)

ROOT = Path(__file__).resolve().parent.parent
EVENT_TYPES = ("BroadcastCreated", "BroadcastScheduled", "BroadcastStarted", "BroadcastCompleted")


# ---------------------------------------------------------------------------------------------
# helpers (also used by tests/test_leader.py)


@dataclass
class Published:
    seq: int
    subject: str
    msg_id: str
    event_type_header: str | None
    envelope: EventEnvelope


async def eventually(check, *, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll an async `check` until it returns a truthy value; fail with its last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


def new_stream() -> str:
    return f"broadcast-{uuid.uuid4()}"


def new_events(n: int, tenant: str | None, start: int = 0) -> list[NewEvent]:
    metadata = {"tenant_id": tenant, "actor": "test"} if tenant is not None else {"actor": "test"}
    return [
        NewEvent(type=EVENT_TYPES[(start + i) % len(EVENT_TYPES)], data={"n": start + i}, metadata=metadata)
        for i in range(n)
    ]


async def append(pool: asyncpg.Pool, stream: str, n: int, tenant: str | None = "tenant-a") -> list[RecordedEvent]:
    async with pool.acquire() as con:
        return await eventstore.append(con, stream, new_events(n, tenant), ANY_VERSION)


async def committed_events(pool: asyncpg.Pool) -> list[RecordedEvent]:
    """Every event in the store, in commit order (read directly, not through the reader under test)."""
    rows = await pool.fetch(
        f"SELECT {eventstore._COLUMNS} FROM events ORDER BY transaction_id, global_position"
    )
    return [RecordedEvent(**dict(r)) for r in rows]


async def relay_checkpoint(pool: asyncpg.Pool) -> Checkpoint:
    row = await pool.fetchrow(
        "SELECT transaction_id, global_position FROM checkpoints WHERE name = $1", relay.CHECKPOINT
    )
    return Checkpoint(row["transaction_id"], row["global_position"]) if row else Checkpoint()


async def stream_count(js, names: Names) -> int:
    return (await js.stream_info(names.events_stream)).state.messages


async def read_published(js, names: Names) -> list[Published]:
    """The whole events stream, message by message, in stream order."""
    info = await js.stream_info(names.events_stream)
    out: list[Published] = []
    if not info.state.messages:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(names.events_stream, seq)
        headers = msg.headers or {}
        out.append(
            Published(
                seq=msg.seq,
                subject=msg.subject,
                msg_id=headers.get("Nats-Msg-Id"),
                event_type_header=headers.get("Crier-Event-Type"),
                envelope=msgspec.json.decode(msg.data, type=EventEnvelope),
            )
        )
    return out


async def wait_until_relayed(pool, js, names: Names, *, timeout: float = 10.0, task: asyncio.Task | None = None):
    """Until the relay checkpoint reached the last committed event and the stream holds at least
    as many messages as there are events. After that an idle relay publishes nothing more."""
    events = await committed_events(pool)
    last = events[-1].checkpoint if events else Checkpoint()

    state: dict = {}

    async def settled() -> bool:
        if task is not None and task.done():
            task.result()  # surface the relay's crash
            raise AssertionError("the relay task returned")
        cp, n = await relay_checkpoint(pool), await stream_count(js, names)
        state.update(checkpoint=cp, target=last, messages=n, events=len(events))
        return cp == last and n >= len(events)

    try:
        await eventually(settled, timeout=timeout, what="the relay to publish every event")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {state}") from None


def expected_subject(prefix: str, event: RecordedEvent) -> str:
    tenant = event.metadata.get("tenant_id") or "_"
    return f"{prefix}.crier.events.{tenant}.{event.stream_name.split('-', 1)[0]}.{event.type}"


def assert_exactly_once(published: list[Published], committed: list[RecordedEvent], prefix: str) -> None:
    ids = [p.msg_id for p in published]
    dupes = {i: c for i, c in collections.Counter(ids).items() if c > 1}
    assert not dupes, f"published more than once: {dupes}"
    committed_ids = [str(e.id) for e in committed]
    assert set(ids) == set(committed_ids), (
        f"missing: {set(committed_ids) - set(ids)}, unexpected: {set(ids) - set(committed_ids)}"
    )
    # Global commit order: the stream holds the events in (transaction_id, global_position) order.
    assert ids == committed_ids, "stream order differs from commit order"

    by_id = {str(e.id): e for e in committed}
    last_position: dict[str, int] = {}
    for p in published:
        event = by_id[p.msg_id]
        assert p.subject == expected_subject(prefix, event)
        assert p.event_type_header == event.type
        assert p.envelope == relay.envelope_of(event)
        assert p.envelope.id == event.id and p.envelope.tenant_id == event.metadata.get("tenant_id")
        # per stream: positions 1, 2, 3, ... in stream order, no gap, no repeat
        assert p.envelope.position == last_position.get(event.stream_name, 0) + 1, (
            f"{event.stream_name}: position {p.envelope.position} after {last_position.get(event.stream_name)}"
        )
        last_position[event.stream_name] = p.envelope.position


@asynccontextmanager
async def running_relay(dsn: str, pool, js, names: Names, poll_interval: float = 0.2):
    """run_relay as a task with its own LISTEN connection, as a leader would run it."""
    listen = await db.connect(dsn)
    task = asyncio.create_task(relay.run_relay(pool, listen, js, names, poll_interval), name="relay-under-test")
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await listen.close()


async def relay_until_idle(pool, js, names: Names) -> None:
    """relay_once in a loop, without reconcile_checkpoint: only Nats-Msg-Id dedupe prevents copies."""
    for _ in range(1000):
        if await relay.relay_once(pool, js, names) == 0:
            return
    raise AssertionError("relay_once never went idle")


class Proc:
    """A child Python process that is always SIGKILLed and reaped, whatever happens in the test."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def victim_args(settings, *extra: str) -> list[str]:
    return [
        "-m", "tests.relay_victim",
        "--db", settings.database_url,
        "--nats", settings.nats_url,
        "--prefix", settings.nats_prefix,
        *extra,
    ]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
async def pool(settings):
    p = await db.create_pool(settings.database_url, min_size=1, max_size=12)
    yield p
    try:
        await asyncio.wait_for(p.close(), 5)
    except asyncio.TimeoutError:
        p.terminate()


@pytest.fixture
async def nc(settings):
    conn = await bus.connect(settings.nats_url, "test-relay")
    yield conn
    await conn.close()


@pytest.fixture
async def js(nc):
    return nc.jetstream()


@pytest.fixture
async def names(js, settings) -> Names:
    return await bus.ensure_streams(js, settings)


# ---------------------------------------------------------------------------------------------
# tests


async def test_every_committed_event_arrives_once_in_commit_order(settings, pool, js, names):
    # A backlog before the relay starts: several streams and tenants, one event without a tenant,
    # and more than one relay batch in total.
    streams = {new_stream(): tenant for tenant in ("tenant-a", "tenant-b", "tenant-c") for _ in range(2)}
    for round_ in range(3):
        for stream, tenant in streams.items():
            await append(pool, stream, 1 + round_, tenant)
    big = new_stream()
    await append(pool, big, relay.BATCH + 37, "tenant-a")
    no_tenant = new_stream()
    await append(pool, no_tenant, 2, None)

    async with running_relay(settings.database_url, pool, js, names) as task:
        await wait_until_relayed(pool, js, names, task=task)
        # and the tail: appended while the relay runs
        for stream, tenant in streams.items():
            await append(pool, stream, 2, tenant)
        await wait_until_relayed(pool, js, names, task=task)

    committed = await committed_events(pool)
    assert len(committed) == 6 * (1 + 2 + 3) + relay.BATCH + 37 + 2 + 6 * 2
    published = await read_published(js, names)
    assert_exactly_once(published, committed, settings.nats_prefix)
    # the subject layout, spelled out once
    first = next(p for p in published if p.envelope.stream == big)
    assert first.subject == f"{settings.nats_prefix}.crier.events.tenant-a.broadcast.BroadcastCreated"
    untenanted = [p for p in published if p.envelope.stream == no_tenant]
    assert [p.subject.split(".")[3] for p in untenanted] == ["_", "_"]
    assert all(p.envelope.tenant_id is None for p in untenanted)


async def test_relay_wakes_on_notify_not_on_poll(settings, pool, js, names):
    """With a 30 s poll interval, a new commit is published within a moment: NOTIFY woke the relay."""
    stream = new_stream()
    async with running_relay(settings.database_url, pool, js, names, poll_interval=30.0) as task:
        await asyncio.sleep(0.2)  # let it start, reconcile and go idle
        for i in range(3):
            await append(pool, stream, 1)
            await wait_until_relayed(pool, js, names, timeout=3.0, task=task)
    assert_exactly_once(await read_published(js, names), await committed_events(pool), settings.nats_prefix)


async def test_a_late_commit_is_not_skipped_and_holds_back_later_ones(settings, pool, js, names):
    """Transaction A takes a lower global_position but commits after B: the relay neither skips A
    nor publishes B before A, so the stream is in commit order and complete."""
    stream_a, stream_b = new_stream(), new_stream()
    async with running_relay(settings.database_url, pool, js, names) as task:
        con_a = await db.connect(settings.database_url)
        try:
            tx_a = con_a.transaction()
            await tx_a.start()
            [a] = await eventstore.append(con_a, stream_a, new_events(1, "tenant-a"), ANY_VERSION)
            [b] = await append(pool, stream_b, 1)  # commits now, behind A's open transaction
            assert a.global_position < b.global_position and a.transaction_id < b.transaction_id
            # B's NOTIFY woke the relay and it polled a few times: nothing may pass the open A.
            await asyncio.sleep(0.6)
            assert await stream_count(js, names) == 0
            await tx_a.commit()
        finally:
            await con_a.close()
        await wait_until_relayed(pool, js, names, task=task)
    published = await read_published(js, names)
    assert [p.msg_id for p in published] == [str(a.id), str(b.id)]
    assert_exactly_once(published, await committed_events(pool), settings.nats_prefix)


async def test_concurrent_out_of_order_commits_all_arrive_once(settings, pool, js, names):
    """Writers commit concurrently, holding their transactions open for random times (so global
    positions commit out of order), while the relay tails the store."""
    rng = random.Random(20240611)
    streams = [(new_stream(), f"tenant-{i % 3}") for i in range(6)]
    seeds = [rng.random() for _ in range(6)]
    commits: list[int] = []  # transaction ids in the order their commits returned

    async def writer(seed: float) -> int:
        r = random.Random(seed)
        written = 0
        async with pool.acquire() as con:
            for _ in range(10):
                stream, tenant = r.choice(streams)
                n = r.randint(1, 3)
                while True:  # like the command handler: expected version, retry on a concurrent writer
                    try:
                        async with con.transaction():
                            version = await eventstore.stream_version(con, stream)
                            recorded = await eventstore.append(con, stream, new_events(n, tenant, version), version)
                            await asyncio.sleep(r.uniform(0, 0.04))  # commit late
                        commits.append(recorded[0].transaction_id)
                        break
                    except WrongExpectedVersion:
                        await asyncio.sleep(r.uniform(0, 0.005))
                written += n
                await asyncio.sleep(r.uniform(0, 0.01))
        return written

    async with running_relay(settings.database_url, pool, js, names) as task:
        written = sum(await asyncio.gather(*(writer(s) for s in seeds)))
        await wait_until_relayed(pool, js, names, task=task)

    committed = await committed_events(pool)
    assert len(committed) == written
    # the writers really did commit out of transaction-id (and global_position) order
    assert commits != sorted(commits)
    assert_exactly_once(await read_published(js, names), committed, settings.nats_prefix)


@pytest.mark.parametrize("restart", ["relay_once", "run_relay"])
async def test_published_but_checkpoint_not_saved(settings, pool, js, names, restart):
    """The relay died right after a batch was acknowledged, before its checkpoint was written.
    relay_once alone republishes the batch and the Nats-Msg-Id dedupe drops the copies;
    run_relay first moves the checkpoint up to the stream's last event (reconcile_checkpoint)."""
    for tenant in ("tenant-a", "tenant-b"):
        for _ in range(3):
            await append(pool, new_stream(), 5, tenant)
    async with pool.acquire() as con:
        batch = await eventstore.read_committed(con, await eventstore.load_checkpoint(con, relay.CHECKPOINT))
    assert len(batch) == 30
    await relay.publish_batch(js, names, batch[:20])  # acked ... and then the process "died"
    assert await relay_checkpoint(pool) == Checkpoint()
    assert await stream_count(js, names) == 20
    await append(pool, new_stream(), 4, "tenant-c")  # committed while no relay ran

    if restart == "relay_once":
        await relay_until_idle(pool, js, names)
        await wait_until_relayed(pool, js, names, timeout=1.0)
    else:
        async with running_relay(settings.database_url, pool, js, names) as task:
            await wait_until_relayed(pool, js, names, task=task)
    assert_exactly_once(await read_published(js, names), await committed_events(pool), settings.nats_prefix)


async def test_checkpoint_lost_for_longer_than_the_duplicate_window(settings, pool, js):
    """The server forgot the Nats-Msg-Ids by the time the relay restarts; reconcile_checkpoint
    must still keep the already-published events from being published again."""
    tiny = msgspec.structs.replace(settings, nats_duplicate_window_s=1.0)
    names = await bus.ensure_streams(js, tiny)
    info = await js.stream_info(names.events_stream)
    assert info.config.duplicate_window == pytest.approx(1.0)

    # A probe stream with the same window proves when the server has forgotten an id.
    probe = f"{settings.nats_prefix}_PROBE"
    await js.add_stream(StreamConfig(name=probe, subjects=[f"{settings.nats_prefix}.probe"], duplicate_window=1.0))

    for tenant in ("tenant-a", "tenant-b"):
        await append(pool, new_stream(), 6, tenant)
        await append(pool, new_stream(), 6, tenant)
    async with pool.acquire() as con:
        batch = await eventstore.read_committed(con, Checkpoint())
    await relay.publish_batch(js, names, batch[:15])  # published, checkpoint never saved
    probe_id = str(uuid.uuid4())
    await js.publish(f"{settings.nats_prefix}.probe", b"x", headers={"Nats-Msg-Id": probe_id})
    assert (await js.publish(f"{settings.nats_prefix}.probe", b"x", headers={"Nats-Msg-Id": probe_id})).duplicate

    async def window_expired():
        ack = await js.publish(f"{settings.nats_prefix}.probe", b"x", headers={"Nats-Msg-Id": probe_id})
        return not ack.duplicate

    await eventually(window_expired, timeout=8.0, interval=0.1, what="the duplicate window to pass")
    await append(pool, new_stream(), 3, "tenant-c")

    # reconcile_checkpoint alone moves the checkpoint to the stream's last event
    await relay.reconcile_checkpoint(pool, js, names)
    assert await relay_checkpoint(pool) == batch[14].checkpoint

    async with pool.acquire() as con:  # lose it again: a fresh relay must reconcile by itself
        await eventstore.save_checkpoint(con, relay.CHECKPOINT, Checkpoint())
    async with running_relay(settings.database_url, pool, js, names) as task:
        await wait_until_relayed(pool, js, names, task=task)
        await append(pool, new_stream(), 2, "tenant-a")  # and it keeps going past the reconciled point
        await wait_until_relayed(pool, js, names, task=task)
    assert_exactly_once(await read_published(js, names), await committed_events(pool), settings.nats_prefix)


@pytest.mark.parametrize("restart", ["relay_once", "run_relay"])
async def test_relay_process_sigkilled_between_publish_and_checkpoint(settings, pool, js, names, tmp_path, restart):
    """A real relay process (batches of 10) lets 15 publishes through, then stalls on the 16th and
    is SIGKILLed: batch 1 is checkpointed, 5 events of batch 2 are on the stream but not in the
    checkpoint, the rest are committed but unpublished. A fresh relay then delivers all exactly once."""
    for tenant in ("tenant-a", "tenant-b"):
        for _ in range(4):
            await append(pool, new_stream(), 5, tenant)
    committed = await committed_events(pool)
    assert len(committed) == 40

    victim = Proc(victim_args(settings, "--mode", "relay", "--batch", "10", "--hang-after", "15"), tmp_path / "v.log")
    try:
        await eventually(lambda: _count_is(js, names, 15), timeout=10.0, what="15 published messages")
        await eventually(
            lambda: _output_has(victim, "hanging after 15"), timeout=5.0, what="the victim to stall"
        )
        assert victim.alive(), victim.output()
        victim.kill()
    finally:
        victim.kill()
    assert victim.popen.returncode == -signal.SIGKILL

    assert await stream_count(js, names) == 15
    assert await relay_checkpoint(pool) == committed[9].checkpoint  # batch 2 never checkpointed
    for tenant in ("tenant-a", "tenant-c"):
        await append(pool, new_stream(), 5, tenant)  # committed while the relay is dead

    if restart == "relay_once":
        await relay_until_idle(pool, js, names)  # republishes events 11-15: dedupe drops them
        await wait_until_relayed(pool, js, names, timeout=1.0)
    else:
        async with running_relay(settings.database_url, pool, js, names) as task:
            await wait_until_relayed(pool, js, names, task=task)
    committed = await committed_events(pool)
    assert len(committed) == 50
    assert_exactly_once(await read_published(js, names), committed, settings.nats_prefix)


async def _count_is(js, names: Names, n: int):
    count = await stream_count(js, names)
    assert count <= n, f"the victim published {count} > {n}"
    return count == n


async def _output_has(proc: Proc, text: str) -> bool:
    return text in proc.output()


class DroppingProxy:
    """A TCP proxy in front of nats-server that can silently drop what the client sends (a network
    that eats packets) and cut every connection, so acks of in-flight publishes are lost."""

    def __init__(self, url: str) -> None:
        host_port = url.split("://", 1)[-1]
        self._host, port = host_port.rsplit(":", 1)
        self._port = int(port)
        self.drop = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self.url = ""

    async def start(self) -> "DroppingProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(self._host, self._port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, server_w}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
            try:
                while data := await src.read(65536):
                    if upstream and self.drop:
                        continue
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(client_r, server_w, True), pump(server_r, client_w, False))

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_relay_recovers_when_acks_are_lost_in_a_reconnect(settings, pool, js, names):
    """The network eats a batch of publishes, then the connection drops and NATS reconnects.
    The relay must notice the missing acks, retry from its checkpoint and deliver everything."""
    proxy = await DroppingProxy(settings.nats_url).start()
    relay_nc = await bus.connect(proxy.url, "relay-behind-proxy")
    try:
        relay_js = relay_nc.jetstream()
        async with running_relay(settings.database_url, pool, relay_js, names) as task:
            await append(pool, new_stream(), 5)
            await wait_until_relayed(pool, js, names, task=task)

            proxy.drop = True
            await append(pool, new_stream(), 20)
            await eventually(
                lambda: _true(relay_js.publish_async_pending() == 20), timeout=5.0, what="20 unacked publishes"
            )
            proxy.drop = False
            proxy.cut()
            await eventually(lambda: _true(relay_nc.is_connected and relay_nc.stats["reconnects"] >= 1),
                             timeout=5.0, what="the relay's NATS connection to come back")
            await append(pool, new_stream(), 5)
            await wait_until_relayed(pool, js, names, timeout=8.0, task=task)
        assert_exactly_once(await read_published(js, names), await committed_events(pool), settings.nats_prefix)
    finally:
        await relay_nc.close()
        await proxy.close()


async def _true(value: bool) -> bool:
    return value


async def test_an_event_too_large_for_nats_is_set_aside_and_the_relay_goes_on(settings, pool, js, names, nc):
    """An event whose envelope is over the server's max_payload (appended straight to the store, past
    the API's limits) used to be retried forever, and every later event of every tenant waited behind
    it. Now it is recorded in parked_events and the relay publishes the next events."""
    assert nc.max_payload == 1024 * 1024  # nats-server's default
    big_stream, small_stream = new_stream(), new_stream()
    async with pool.acquire() as con:
        [big] = await eventstore.append(con, big_stream, [NewEvent(
            type="BroadcastCreated", data={"html": "x" * (nc.max_payload + 100)},
            metadata={"tenant_id": "tenant-a", "actor": "test"},
        )], ANY_VERSION)
    [small] = await append(pool, small_stream, 1, "tenant-b")

    async with running_relay(settings.database_url, pool, js, names) as task:
        async def past(event: RecordedEvent) -> bool:
            if task.done():
                task.result()  # surface the relay's crash
                raise AssertionError("the relay task returned")
            return await relay_checkpoint(pool) == event.checkpoint

        await eventually(lambda: past(small), timeout=10.0, what="the relay checkpoint to pass both events")
        [later] = await append(pool, small_stream, 1, "tenant-b")  # and it keeps going
        await eventually(lambda: past(later), timeout=10.0, what="the relay to take a later event")

    published = await read_published(js, names)
    assert [p.envelope.stream for p in published] == [small_stream, small_stream]
    assert str(big.id) not in {p.msg_id for p in published}
    parked = await pool.fetch("SELECT * FROM parked_events")
    assert len(parked) == 1
    row = parked[0]
    assert (row["event_id"], row["global_position"], row["stream_name"], row["type"], row["tenant_id"]) == (
        big.id, big.global_position, big_stream, "BroadcastCreated", "tenant-a"
    )
    assert row["size_bytes"] > nc.max_payload and "max_payload" in row["reason"] and row["parked_at"] is not None
    assert js.publish_async_pending() == 0  # nothing left hanging in nats-py


async def test_a_batch_with_a_parked_event_is_checkpointed_once_and_parked_once(settings, pool, js, names, nc):
    """relay_once on a backlog of normal events around a too-large one: the batch is published in
    order without it, and a republish after a lost checkpoint records it once."""
    stream = new_stream()
    await append(pool, stream, 3, "tenant-a")
    async with pool.acquire() as con:
        [big] = await eventstore.append(con, new_stream(), [NewEvent(
            type="BroadcastEdited", data={"blob": "y" * nc.max_payload}, metadata={"tenant_id": "tenant-b"},
        )], ANY_VERSION)
    await append(pool, stream, 3, "tenant-a")
    assert await relay.relay_once(pool, js, names) == 7
    async with pool.acquire() as con:  # the checkpoint is lost: the batch goes again
        await eventstore.save_checkpoint(con, relay.CHECKPOINT, Checkpoint())
    await relay_until_idle(pool, js, names)

    committed = [e for e in await committed_events(pool) if e.id != big.id]
    assert_exactly_once(await read_published(js, names), committed, settings.nats_prefix)
    assert await pool.fetchval("SELECT count(*) FROM parked_events WHERE event_id = $1", big.id) == 1
    assert await relay_checkpoint(pool) == (await committed_events(pool))[-1].checkpoint
