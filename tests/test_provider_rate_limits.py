"""Send rates per provider account (shared/channels/ratelimit.py) on the real Postgres: the GCRA
arithmetic as literal tables (on a clock the test sets), then takers on the database clock from
several tasks, connections and OS processes, whose planned send times never put more than the limit
into any span of the window."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import types
import uuid
from pathlib import Path

import asyncpg
import pytest

from shared.channels import ratelimit
from shared.channels.ratelimit import (
    COLD_AFTER_S,
    DEFAULT_RATE_LIMITS,
    MAX_MISSES,
    SEND_JITTER_NS,
    AccountLimiter,
    RateLimited,
    Window,
    max_batch,
    parse_windows,
    windows_of,
)
from shared.platform import db

NS, MS = 1_000_000_000, 1_000_000
T0 = 1_800_000_000 * NS  # the clock of the literal tables: any instant will do
REPO = Path(__file__).resolve().parent.parent


def most_in_any_span(starts: list[tuple[int, int]], span_ns: int) -> int:
    """The most sends planned inside any half-open span of `span_ns` ((start_ns, n) pairs)."""
    times = sorted(t for t, n in starts for _ in range(n))
    most, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - span_ns:
            first += 1
        most = max(most, last - first + 1)
    return most


async def tats(con: asyncpg.Connection, provider: uuid.UUID) -> dict[str, int]:
    rows = await con.fetch("SELECT per, tat FROM provider_rate_limits WHERE provider_id = $1", provider)
    return {r["per"]: r["tat"] for r in rows}


async def run_table(con: asyncpg.Connection, windows: list[Window], table: list[tuple[int, int, float]]) -> uuid.UUID:
    """Each row: at (ms after T0), n, the planned start the take must answer (ms after T0)."""
    limiter, provider = AccountLimiter(), uuid.uuid4()
    got = []
    for at_ms, n, _ in table:
        r = await limiter.reserve(con, provider, windows, n, at_ns=T0 + at_ms * MS)
        got.append((at_ms, n, (r.start_ns - T0) / MS))
    assert got == [(at, n, float(start)) for at, n, start in table]
    return provider


def test_windows_come_from_the_config_else_the_kind_and_are_validated():
    assert windows_of("telegram_bot", {}) == [Window(limit=30, per="second")]
    assert windows_of("whatsapp_cloud", None) == [Window(limit=80, per="second")]
    assert windows_of("twilio", {"account_sid": "AC1"}) == [Window(limit=1, per="second")]
    assert windows_of("fcm", {}) == [Window(limit=600_000, per="minute")]
    assert windows_of("smtp", {}) == windows_of("webhook", {}) == windows_of("null", {}) == []
    assert windows_of("twilio", {"rate_limits": [{"limit": 100, "per": "second"}, {"limit": 10**6, "per": "day"}]}) \
        == [Window(limit=100, per="second"), Window(limit=10**6, per="day")]
    assert windows_of("telegram_bot", {"rate_limits": []}) == []  # explicitly none
    windows_of("twilio", {}).clear()  # a copy: the defaults stay
    assert DEFAULT_RATE_LIMITS["twilio"] == [Window(limit=1, per="second")]
    for bad in ([{"limit": 1, "per": "week"}], [{"limit": 0, "per": "second"}], [{"limit": 10**9 + 1, "per": "day"}],
                [{"limit": 5, "per": "second", "burst": 6}],
                [{"limit": 5, "per": "second"}, {"limit": 6, "per": "second"}],
                [{"limit": 1, "per": p} for p in ("second", "minute", "hour", "day", "second")], [{"per": "day"}], {}):
        with pytest.raises(ValueError, match="rate_limits"):
            parse_windows(bad)
    # the default burst: limit // 20, at least 1; the interval makes room for it
    assert [w.at_once for w in (Window(limit=30, per="second"), Window(limit=80, per="second"),
                                Window(limit=600_000, per="minute"))] == [1, 4, 30_000]
    assert Window(limit=80, per="second").interval_ns == 13_636_364  # (1 s + J = 50 ms) / 77, rounded up
    assert Window(limit=5, per="day", burst=5).interval_ns == 86_400_050_000_000  # a day and J
    assert max_batch([Window(limit=80, per="second"), Window(limit=600_000, per="minute")]) == 4
    assert max_batch([]) is None


async def test_gcra_a_burst_then_the_steady_pace(db_url):
    con = await db.connect(db_url)
    # 10 per second, 3 at once: T = (1 s + J) / (10 - 3 + 1) = 1050 ms / 8 = 131.25 ms, tolerance 262.5 ms
    provider = await run_table(con, [Window(limit=10, per="second", burst=3)], [
        (0, 1, 0), (0, 1, 0), (0, 1, 0),  # the burst
        (0, 1, 131.25), (0, 1, 262.5), (0, 1, 393.75),  # queued behind it, one per T
        (2000, 1, 2000),  # idle long enough: the burst is back
        (2000, 3, 2131.25),  # 3 at once, but one went at 2000: the third of the burst waits a T
        (2100, 1, 2262.5),
        (2100, 2, 2525),
    ])
    assert await tats(con, provider) == {"second": T0 + 2_918_750_000}
    # 4 per second, one at a time: evenly (1 s + J) / 4 = 262.5 ms apart, from whenever the takes come
    await run_table(con, [Window(limit=4, per="second", burst=1)], [
        (0, 1, 0), (0, 1, 262.5), (0, 1, 525), (0, 1, 787.5), (1000, 1, 1050), (1100, 1, 1312.5), (3000, 1, 3000),
    ])
    await con.close()


async def test_gcra_two_windows_the_slower_binds(db_url):
    con = await db.connect(db_url)
    # 10 per second one at a time (T = 1.05 s / 10 = 105 ms) and 12 per minute, 3 at once (T = 60.05 s / 10
    # = 6.005 s, tolerance 12.01 s): the second window paces the first three, then the minute's
    windows = [Window(limit=10, per="second", burst=1), Window(limit=12, per="minute", burst=3)]
    provider = await run_table(con, windows, [
        (0, 1, 0), (0, 1, 105), (0, 1, 210),
        (0, 1, 6005), (0, 1, 12010), (0, 1, 18015),
        (60000, 1, 60000), (60000, 1, 60105), (60000, 1, 60210), (60000, 1, 66005),  # a minute later: the same again
    ])
    assert await tats(con, provider) == {"second": T0 + 66110 * MS, "minute": T0 + 84020 * MS}
    await con.close()


async def test_sends_that_may_go_late_are_counted_that_much_later(db_url):
    con = await db.connect(db_url)
    limiter = AccountLimiter()

    async def table(windows: list[Window], rows: list[tuple[int, int, int, float]]) -> uuid.UUID:
        """Each row: at (ms after T0), n, late (ms), the planned start the take must answer (ms after T0)."""
        provider, got = uuid.uuid4(), []
        for at_ms, n, late_ms, _ in rows:
            r = await limiter.reserve(con, provider, windows, n, late_ns=late_ms * MS, at_ns=T0 + at_ms * MS)
            got.append((at_ms, n, late_ms, (r.start_ns - T0) / MS))
        assert got == [(at, n, late, float(start)) for at, n, late, start in rows]
        return provider

    # 10 per second one at a time (T = 105 ms): a send that may go 150 ms late goes at once, and
    # the next ones are planned 150 ms further on
    await table([Window(limit=10, per="second", burst=1)], [
        (0, 1, 150, 0), (0, 1, 0, 255), (0, 1, 0, 360),
        (2000, 1, 150, 2000), (2000, 1, 0, 2255),
    ])
    # 10 per second, 3 at once (T = 131.25 ms, tolerance 262.5 ms): a late batch of 2 counts 75 ms
    # more per send, which eats into the burst; one while the account is busy also starts 75 ms later
    provider = await table([Window(limit=10, per="second", burst=3)], [
        (0, 2, 150, 0), (0, 1, 0, 150), (0, 1, 0, 281.25),
        (0, 2, 150, 618.75),
    ])
    assert await tats(con, provider) == {"second": T0 + 1_087_500_000}
    with pytest.raises(ValueError, match="late_ns"):
        await limiter.reserve(con, provider, [Window(limit=10, per="second")], late_ns=-1)
    await con.close()


class _Recorder:
    """Not a database: answers every take "reserved, `wait_ms` from now" and keeps the intervals it
    was given; `stalls` (seconds) block this process's event loop just after the answers, one each."""

    def __init__(self, wait_ms: int = 0, stalls: list[float] | None = None) -> None:
        self.intervals: list[int] = []
        self.wait_ms, self.stalls = wait_ms, list(stalls or [])

    async def fetchrow(self, sql: str, provider: uuid.UUID, pers: list[str], intervals: list[int], *rest: object):
        self.intervals.append(intervals[0] if intervals else None)
        await asyncio.sleep(0)  # takes started together are all in flight at once
        if self.stalls:
            asyncio.get_running_loop().call_soon(time.sleep, self.stalls.pop(0))
        return {"now_ns": 0, "start_ns": self.wait_ms * MS, "reserved": True}

    async def execute(self, sql: str, *args: object) -> None:  # a hold-off, recorded nowhere
        pass


async def test_a_process_counts_its_first_sends_on_an_account_late(monkeypatch):
    db_, limiter, provider = _Recorder(), AccountLimiter(), uuid.uuid4()
    window = [Window(limit=20, per="second")]  # T = 1.05 s / 20 = 52.5 ms; C = 150 ms
    # The first takes, all started before one is answered, are cold (any of them may be the one
    # that opens the connection); then warm; another account is cold; a batch shares C out
    await asyncio.gather(*(limiter.take(db_, provider, window) for _ in range(3)))
    await limiter.take(db_, provider, window)
    await limiter.take(db_, uuid.uuid4(), window)
    await limiter.take(db_, uuid.uuid4(), [Window(limit=80, per="second")], 4)  # T = 13,636,364 ns, 4 at once
    assert db_.intervals == [202_500_000] * 3 + [52_500_000, 202_500_000, 13_636_364 + 37_500_000]
    # COLD_AFTER_S after its latest planned send on it, the process is cold on the account again
    later = time.monotonic() + COLD_AFTER_S
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(monotonic=lambda: later))
    await limiter.take(db_, provider, window)
    assert db_.intervals[-1] == 202_500_000


async def test_a_process_that_wakes_too_late_for_its_slot_leaves_it_empty_and_takes_another():
    window = [Window(limit=20, per="second")]
    # Stalled 80 ms (a busy event loop) while it slept 30 ms for its slot: 50 ms late, past MISSED_NS
    # (20 ms): it takes another slot, and keeps that one
    db_ = _Recorder(wait_ms=30, stalls=[0.08])
    slept = await AccountLimiter().acquire(db_, uuid.uuid4(), window)
    assert len(db_.intervals) == 2 and slept == 0.06
    # stalled at every slot: after MAX_MISSES slots given back, the sends go (late)
    db_ = _Recorder(wait_ms=30, stalls=[0.08] * 10)
    await AccountLimiter().acquire(db_, uuid.uuid4(), window)
    assert len(db_.intervals) == MAX_MISSES + 1
    # a small delay is kept (it is within the jitter allowance); so is any with no window to crowd
    db_ = _Recorder(wait_ms=30, stalls=[0.01])
    await AccountLimiter().acquire(db_, uuid.uuid4(), window)
    assert len(db_.intervals) == 1
    limiter, held, db_ = AccountLimiter(), uuid.uuid4(), _Recorder(wait_ms=30, stalls=[0.08])
    await limiter.hold_off(db_, held, 60)  # a provider without windows, held off by this process: asked
    await limiter.acquire(db_, held, [])
    assert db_.intervals == [None]


async def test_an_exhausted_day_window_is_rate_limited_and_reserves_nothing(db_url):
    con = await db.connect(db_url)
    limiter, provider = AccountLimiter(max_wait_s=60), uuid.uuid4()
    windows = [Window(limit=10, per="second"), Window(limit=5, per="day", burst=5)]
    for _ in range(5):
        await limiter.reserve(con, provider, windows, at_ns=T0)
    before = await tats(con, provider)
    # the sixth send of the day: a day and J after the first (5 at once, then one a day and J)
    with pytest.raises(RateLimited) as refused:
        await limiter.reserve(con, provider, windows, at_ns=T0 + 1000 * MS)
    assert refused.value.retry_after_s == 86399.05
    assert await tats(con, provider) == before  # neither window moved: all or nothing
    # on the database clock, through take(): the same (the second window spaces the five 105 ms apart)
    other = uuid.uuid4()
    starts = [(await limiter.reserve(con, other, windows)).start_ns for _ in range(5)]
    assert [s - starts[0] for s in starts] == [0, 105 * MS, 210 * MS, 315 * MS, 420 * MS]
    before = await tats(con, other)
    with pytest.raises(RateLimited) as refused:
        await limiter.take(con, other, windows)
    assert 86399 < refused.value.retry_after_s <= 86400.05
    assert await tats(con, other) == before
    await con.close()


@pytest.mark.parametrize("window", [Window(limit=50, per="second"), Window(limit=40, per="second", burst=10)],
                         ids=["default-burst", "burst-10"])
async def test_concurrent_takers_on_several_connections_never_exceed_the_limit_in_any_second(db_url, window):
    pool = await db.create_pool(db_url, min_size=6, max_size=6)
    cons = [await db.connect(db_url) for _ in range(4)]
    provider, planned = uuid.uuid4(), []
    limiters = [AccountLimiter(), AccountLimiter()]  # two "processes"' limiters

    async def taker(k: int) -> None:
        where = pool if k % 3 else cons[k // 3]  # 8 through the pool, 4 on a connection of their own
        for i in range(20):
            n = min(1 + (k + i) % 3, window.at_once)
            r = await limiters[k % 2].reserve(where, provider, [window], n)
            planned.append((r.start_ns, n, r.now_ns))

    await asyncio.gather(*(taker(k) for k in range(12)))
    sends = sum(n for _, n, _ in planned)
    # never more than the limit in a second, even with each send up to J later than planned
    assert most_in_any_span([(s, n) for s, n, _ in planned], NS + SEND_JITTER_NS) <= window.limit
    steady = (window.limit - window.at_once + 1) / 1.05  # sends per second after the first burst: (L - B + 1) / (P + J)
    span = (max(s for s, _, _ in planned) - min(now for _, _, now in planned)) / NS
    assert span <= (sends - window.at_once) / steady * 1.02 + 0.5  # no slot left empty: as tight as the window allows
    await pool.close()
    for con in cons:
        await con.close()


async def test_a_hold_off_delays_every_taker_until_it_ends(db_url):
    cons = [await db.connect(db_url) for _ in range(4)]
    provider, windows = uuid.uuid4(), [Window(limit=20, per="second")]
    got_429, other = AccountLimiter(), AccountLimiter()  # the process that got the 429, and another
    await got_429.hold_off(cons[0], provider, 1.5)
    await got_429.hold_off(cons[0], provider, 0.2)  # a shorter one later does not shorten it
    blocked_until = await cons[0].fetchval("SELECT blocked_until FROM provider_holds WHERE provider_id = $1", provider)

    async def taker(con: asyncpg.Connection) -> list[tuple[int, int]]:
        return [((await other.reserve(con, provider, windows)).start_ns, 1) for _ in range(10)]

    planned = [p for ps in await asyncio.gather(*(taker(c) for c in cons)) for p in ps]
    assert min(s for s, _ in planned) >= blocked_until
    assert most_in_any_span(planned, NS + SEND_JITTER_NS) <= 20
    # a provider without windows is asked about only by the process that recorded the hold
    assert await other.take(cons[1], provider, []) == 0.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    slept = await got_429.acquire(cons[1], provider, [])
    assert 0.5 < slept <= 1.5 and loop.time() - started >= slept - 0.01
    # a hold-off longer than max_wait_s: handed back, not slept through
    await other.hold_off(cons[2], provider, 120)
    with pytest.raises(RateLimited) as refused:
        await other.take(cons[2], provider, windows)
    assert 119 < refused.value.retry_after_s <= 120
    for con in cons:
        await con.close()


async def test_no_windows_and_no_hold_off_cost_no_query_and_bad_takes_are_refused(db_url):
    limiter = AccountLimiter()
    nothing = object()  # not a connection: any query would fail
    assert await limiter.take(nothing, uuid.uuid4(), windows_of("smtp", {}), 500) == 0.0
    assert await limiter.acquire(nothing, uuid.uuid4(), []) == 0.0
    con = await db.connect(db_url)
    windows = [Window(limit=80, per="second")]  # 4 at once
    with pytest.raises(ValueError, match="split the batch"):
        await limiter.take(con, uuid.uuid4(), windows, 5)
    async with con.transaction():
        with pytest.raises(ValueError, match="outside a transaction"):
            await limiter.take(con, uuid.uuid4(), windows)
    assert await limiter.take(con, uuid.uuid4(), windows, 4) == 0.0
    await con.close()


# One sender process: 4 tasks each reserving then sleeping until its send, as a worker would.
_TAKER = """
import asyncio, json, sys, uuid
from shared.channels.ratelimit import AccountLimiter, Window
from shared.platform import db

async def main(url, provider, count):
    pool = await db.create_pool(url, min_size=4, max_size=4)
    limiter, windows, planned = AccountLimiter(), [Window(limit=20, per="second")], []
    print("ready", flush=True)
    sys.stdin.readline()

    async def worker():
        for _ in range(count // 4):
            r = await limiter.reserve(pool, provider, windows)
            planned.append((r.now_ns, r.start_ns))
            await asyncio.sleep(r.wait_s)

    await asyncio.gather(*(worker() for _ in range(4)))
    await pool.close()
    print(json.dumps(planned), flush=True)

asyncio.run(main(sys.argv[1], uuid.UUID(sys.argv[2]), int(sys.argv[3])))
"""


async def test_two_sender_processes_together_keep_to_20_per_second(db_url):
    provider = uuid.uuid4()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    pipe = asyncio.subprocess.PIPE
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", _TAKER, db_url, str(provider), "100",
                                                  cwd=REPO, env=env, stdin=pipe, stdout=pipe)
             for _ in range(2)]
    try:
        for p in procs:  # both connected before either takes
            assert (await asyncio.wait_for(p.stdout.readline(), 60)).strip() == b"ready"
        for p in procs:
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    per_process = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [len(planned) for planned in per_process] == [100, 100]
    planned = [(start, 1) for ps in per_process for _, start in ps]
    assert most_in_any_span(planned, NS + SEND_JITTER_NS) <= 20  # each send may go up to J late
    first_asked = min(now for ps in per_process for now, _ in ps)
    last_start = max(start for start, _ in planned)
    assert (last_start - first_asked) / NS <= 200 / 20 * 1.1  # 10 s of sends at 20/s (10.45 s with J), plus 10%
    a, b = ([start for _, start in ps] for ps in per_process)
    assert min(a) < max(b) and min(b) < max(a)  # they took turns, not one after the other
