"""Leader election over Postgres advisory locks (shared.platform.leader.run_as_leader), against the real
servers: one replica runs a task at a time, and another one takes over when the leader dies or
loses its lock connection, with the relay delivering every event exactly once throughout."""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import asyncpg

from shared.platform import bus, db, leader, relay
from shared.platform.bus import Names
from tests.test_relay import (  # noqa: F401  (fixtures are used by name)
    Proc,
    append,
    assert_exactly_once,
    committed_events,
    eventually,
    js,
    names,
    nc,
    new_stream,
    pool,
    read_published,
    stream_count,
    victim_args,
    wait_until_relayed,
)

LOCK_HOLDER_SQL = """
    SELECT pid FROM pg_locks
    WHERE locktype = 'advisory' AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1
"""


async def lock_holders(pool: asyncpg.Pool, name: str) -> list[int]:
    key = leader.lock_key(name)
    return [r["pid"] for r in await pool.fetch(LOCK_HOLDER_SQL, key >> 32, key & 0xFFFFFFFF)]


class Tracker:
    """Which replicas' task bodies are running right now, the most at once, and a timeline."""

    def __init__(self) -> None:
        self.active: set[str] = set()
        self.max_active = 0
        self.timeline: list[tuple[float, str, str]] = []
        self.acquired: list[str] = []

    def started(self, who: str) -> None:
        self.active.add(who)
        self.max_active = max(self.max_active, len(self.active))
        self.timeline.append((time.monotonic(), who, "start"))

    def stopped(self, who: str) -> None:
        self.active.discard(who)
        self.timeline.append((time.monotonic(), who, "stop"))

    def last(self, who: str, what: str) -> float | None:
        times = [t for t, w, e in self.timeline if w == who and e == what]
        return times[-1] if times else None


Work = Callable[["Replica", asyncpg.Connection], Awaitable[None]]


async def idle_work(replica: "Replica", con: asyncpg.Connection) -> None:
    await asyncio.Event().wait()


async def relay_work(replica: "Replica", con: asyncpg.Connection) -> None:
    await relay.run_relay(replica.pool, con, replica.js, replica.names, 0.2)


class Replica:
    """One in-process replica: its own pool and NATS connection, competing via run_as_leader."""

    def __init__(self, who: str, settings, tracker: Tracker, work: Work, *, task_name: str = "relay",
                 retry_interval: float = 0.1) -> None:
        self.who, self.settings, self.tracker, self.work = who, settings, tracker, work
        self.task_name, self.retry_interval = task_name, retry_interval
        self.lock_pid: int | None = None
        self.task: asyncio.Task | None = None
        self.pool = self.nc = self.js = None
        self.names = Names(settings.nats_prefix)

    async def start(self) -> "Replica":
        self.pool = await db.create_pool(self.settings.database_url, min_size=1, max_size=4)
        self.nc = await bus.connect(self.settings.nats_url, f"replica-{self.who}")
        self.js = self.nc.jetstream()
        self.task = asyncio.create_task(
            leader.run_as_leader(
                self.settings.database_url, self.task_name, self._body,
                retry_interval=self.retry_interval, on_leader=lambda: self.tracker.acquired.append(self.who),
            ),
            name=f"replica-{self.who}",
        )
        return self

    async def _body(self, con: asyncpg.Connection) -> None:
        self.lock_pid = con.get_server_pid()
        self.tracker.started(self.who)
        try:
            await self.work(self, con)
        finally:
            self.tracker.stopped(self.who)

    @property
    def running(self) -> bool:
        return self.who in self.tracker.active

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.nc is not None:
            await self.nc.close()
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), 5)
            except asyncio.TimeoutError:
                self.pool.terminate()


async def _true_when(predicate: Callable[[], bool]) -> bool:
    return predicate()


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    await eventually(lambda: _true_when(predicate), timeout=timeout, interval=0.01, what=what)


async def test_only_one_replica_runs_the_task_and_a_clean_stop_hands_over(settings, pool):
    tracker = Tracker()
    replicas = [Replica(w, settings, tracker, idle_work) for w in ("a", "b", "c")]
    other_task = Replica("p", settings, Tracker(), idle_work, task_name="projector")
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        await wait_for(lambda: tracker.active, 5.0, "a leader")
        # Every follower retries every 0.1 s: give them ~10 chances to (wrongly) get in.
        await asyncio.sleep(1.0)
        assert tracker.max_active == 1, tracker.timeline
        assert len(tracker.acquired) == 1, tracker.acquired
        [first] = [r for r in replicas if r.running]
        assert await lock_holders(pool, "relay") == [first.lock_pid]

        # Another task name is another lock: it gets a leader of its own meanwhile.
        await other_task.start()
        await wait_for(lambda: other_task.running, 3.0, "the projector leader")
        assert await lock_holders(pool, "projector") == [other_task.lock_pid]

        # A clean shutdown of the leader: its task stops before its lock goes, then one follower leads.
        stop_started = time.monotonic()
        await first.stop()
        assert not first.running
        await wait_for(lambda: tracker.active, 2.0, "a new leader")
        assert time.monotonic() - stop_started < 2.0
        await asyncio.sleep(0.5)
        assert tracker.max_active == 1, tracker.timeline
        assert len(tracker.acquired) == 2 and tracker.acquired[0] == first.who, tracker.acquired
        [second] = [r for r in replicas if r.running]
        assert await lock_holders(pool, "relay") == [second.lock_pid]
    finally:
        await asyncio.gather(*(r.stop() for r in [*replicas, other_task]))
    assert not tracker.active


async def test_terminated_lock_connection_stops_the_task_and_another_replica_takes_over(settings, pool, js, names):
    """pg_terminate_backend on the backend holding the advisory lock: the leader's watchdog stops
    its relay, a follower takes over, and every event is on the stream exactly once."""
    tracker = Tracker()
    # a: watchdog/retry every 1 s, so b (retry every 0.1 s) deterministically wins the lock next.
    a = Replica("a", settings, tracker, relay_work, retry_interval=1.0)
    b = Replica("b", settings, tracker, relay_work, retry_interval=0.1)
    try:
        await a.start()
        await wait_for(lambda: a.running, 5.0, "replica a to lead")
        for tenant in ("tenant-a", "tenant-b"):
            await append(pool, new_stream(), 10, tenant)
        await wait_until_relayed(pool, js, names)
        await b.start()
        await asyncio.sleep(0.3)
        assert not b.running and tracker.max_active == 1

        [holder] = await lock_holders(pool, "relay")
        assert holder == a.lock_pid
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", holder)
        killed_at = time.monotonic()
        for tenant in ("tenant-a", "tenant-c"):
            await append(pool, new_stream(), 10, tenant)

        await wait_for(lambda: b.running, 3.0, "replica b to take over")
        await wait_for(lambda: not a.running, 3.0, "replica a's task to stop")
        took_over = tracker.last("b", "start") - killed_at
        a_stopped = tracker.last("a", "stop") - killed_at
        assert took_over < 1.5, took_over
        assert a_stopped < 2.5, a_stopped  # the watchdog runs every retry_interval (1 s)
        # Both ran only for the moment it took a's watchdog to notice.
        overlap = max(0.0, tracker.last("a", "stop") - tracker.last("b", "start"))
        assert overlap < 2.0, tracker.timeline
        assert await lock_holders(pool, "relay") == [b.lock_pid]

        await wait_until_relayed(pool, js, names)
        # a keeps competing but must not get back in while b holds the lock.
        await asyncio.sleep(1.5)
        assert a.running is False and b.running is True
        assert tracker.acquired == ["a", "b"], tracker.acquired
    finally:
        await asyncio.gather(a.stop(), b.stop())
    committed = await committed_events(pool)
    assert len(committed) == 40
    assert_exactly_once(await read_published(js, names), committed, settings.nats_prefix)


async def test_sigkilled_leader_process_is_replaced_and_no_event_is_lost_or_doubled(
    settings, pool, js, names, tmp_path
):
    """Two relay processes compete for the lock; the leader writes its pid to a table every 100 ms.
    SIGKILL the leader while events keep being appended: the other process takes over within
    seconds, and every event appended before and after the kill is on the stream exactly once."""
    await pool.execute(
        "CREATE TABLE leader_beats (id bigserial PRIMARY KEY, pid int NOT NULL,"
        " at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    args = victim_args(settings, "--mode", "leader", "--retry-interval", "0.2", "--beat-interval", "0.1")
    procs = [Proc(args, tmp_path / f"p{i}.log") for i in (1, 2)]
    stop_appending = asyncio.Event()
    appended = 0

    async def appender() -> None:
        nonlocal appended
        rng = random.Random(7)
        streams = [(new_stream(), f"tenant-{i % 2}") for i in range(5)]
        while not stop_appending.is_set():
            stream, tenant = rng.choice(streams)
            n = rng.randint(1, 2)
            await append(pool, stream, n, tenant)
            appended += n
            await asyncio.sleep(0.02)

    async def beating_pids() -> set[int]:
        return {r["pid"] for r in await pool.fetch("SELECT DISTINCT pid FROM leader_beats")}

    def logs() -> str:
        return "\n".join(f"--- pid {p.pid}\n{p.output()}" for p in procs)

    appending: asyncio.Task | None = None
    try:
        await eventually(
            lambda: _all_ready(procs), timeout=10.0, what="both processes to start"
        )
        await eventually(
            lambda: _beats_at_least(pool, 5), timeout=10.0, what="a leader's heartbeats"
        )
        [leader_pid] = await beating_pids()
        [victim] = [p for p in procs if p.pid == leader_pid]
        [survivor] = [p for p in procs if p.pid != leader_pid]

        appending = asyncio.create_task(appender())
        await eventually(lambda: _count_at_least(js, names, 10), timeout=5.0, what="the leader to relay")
        assert await beating_pids() == {leader_pid}, logs()  # the follower never ran the task

        last_beat_before_kill = await pool.fetchval("SELECT max(id) FROM leader_beats")
        victim.kill()
        killed_at = time.monotonic()

        await eventually(
            lambda: _pid_beats(pool, survivor.pid), timeout=5.0, what="the survivor to take over"
        )
        takeover = time.monotonic() - killed_at
        assert takeover < 3.0, takeover
        await asyncio.sleep(0.5)  # more appends, relayed by the new leader
        stop_appending.set()
        await appending
        await wait_until_relayed(pool, js, names, timeout=10.0)
        assert survivor.alive(), logs()
        assert "victim: leader" in survivor.output()

        before = await pool.fetch("SELECT DISTINCT pid FROM leader_beats WHERE id <= $1", last_beat_before_kill)
        assert {r["pid"] for r in before} == {leader_pid}
        # After that: the survivor, plus at most a beat the leader sent between that query and the
        # kill and one INSERT already on its way to the server when it died.
        stragglers = await pool.fetchval(
            "SELECT count(*) FROM leader_beats WHERE id > $1 AND pid = $2", last_beat_before_kill, leader_pid
        )
        assert stragglers <= 2
    finally:
        stop_appending.set()
        if appending is not None:
            await asyncio.gather(appending, return_exceptions=True)
        for p in procs:
            p.kill()
    assert all(not p.alive() for p in procs)
    committed = await committed_events(pool)
    assert len(committed) == appended
    assert_exactly_once(await read_published(js, names), committed, settings.nats_prefix)


async def _all_ready(procs: list[Proc]) -> bool:
    for p in procs:
        assert p.alive(), p.output()
    return all("victim: ready" in p.output() for p in procs)


async def _beats_at_least(pool: asyncpg.Pool, n: int) -> bool:
    return await pool.fetchval("SELECT count(*) FROM leader_beats") >= n


async def _pid_beats(pool: asyncpg.Pool, pid: int) -> bool:
    return await pool.fetchval("SELECT EXISTS (SELECT 1 FROM leader_beats WHERE pid = $1)", pid)


async def _count_at_least(js, names: Names, n: int) -> bool:
    return await stream_count(js, names) >= n
