"""Contract tests of the Postgres event store and projections, against a real Postgres."""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field

import asyncpg
import pytest

from shared.platform import db, eventstore, projections
from shared.platform.eventstore import (
    ANY_VERSION,
    NO_STREAM,
    Checkpoint,
    NewEvent,
    RecordedEvent,
    WrongExpectedVersion,
)

# ---------------------------------------------------------------------------------------------
# helpers


def new_stream(category: str = "broadcast") -> str:
    return f"{category}-{uuid.uuid4()}"


def new_events(n: int, tag: str = "") -> list[NewEvent]:
    return [
        NewEvent(
            type=f"Thing{i}Happened",
            data={"n": i, "tag": tag, "nested": {"list": [1, "two", None], "ok": True}},
            metadata={"tenant_id": "tenant-a", "correlation_id": str(uuid.uuid4())},
        )
        for i in range(n)
    ]


async def all_events(pool: asyncpg.Pool) -> list[RecordedEvent]:
    """Every event in the table, in commit order, read directly rather than through the reader under test."""
    rows = await pool.fetch(
        f"SELECT {eventstore._COLUMNS} FROM events ORDER BY transaction_id, global_position"
    )
    return [RecordedEvent(**dict(r)) for r in rows]


async def event_ids(pool: asyncpg.Pool) -> set[uuid.UUID]:
    return {r["id"] for r in await pool.fetch("SELECT id FROM events")}


async def seen_ids(pool: asyncpg.Pool) -> list[uuid.UUID]:
    return [r["event_id"] for r in await pool.fetch("SELECT event_id FROM seen")]


class SeenProjection:
    """Records every applied event id in `seen`; the primary key makes a double apply fail loudly."""

    def __init__(self, name: str = "seen", categories: tuple[str, ...] | None = None) -> None:
        self.name, self.categories = name, categories
        self.applied: list[RecordedEvent] = []  # in apply order, across catch_ups and rebuilds

    async def apply(self, con: asyncpg.Connection, event: RecordedEvent) -> None:
        await con.execute(
            "INSERT INTO seen (event_id, transaction_id, global_position) VALUES ($1, $2, $3)",
            event.id,
            event.transaction_id,
            event.global_position,
        )
        self.applied.append(event)

    async def clear(self, con: asyncpg.Connection) -> None:
        await con.execute("TRUNCATE seen")


@pytest.fixture
async def pool(db_url):
    # Big enough for the ~50 concurrent writers, the long transaction and both readers at once.
    p = await db.create_pool(db_url, min_size=2, max_size=80)
    await p.execute(
        "CREATE TABLE seen (event_id uuid PRIMARY KEY, transaction_id xid8 NOT NULL, global_position bigint NOT NULL)"
    )
    yield p
    await p.close()


@pytest.fixture
async def two_connections(db_url):
    a, b = await db.connect(db_url), await db.connect(db_url)
    yield a, b
    await a.close()
    await b.close()


# ---------------------------------------------------------------------------------------------
# 1. append and read_stream


async def test_append_then_read_stream_round_trips_everything(pool):
    stream = new_stream()
    sent = new_events(3, tag="first")
    async with pool.acquire() as con:
        returned = await eventstore.append(con, stream, sent, NO_STREAM)
        read = await eventstore.read_stream(con, stream)

    assert read == returned
    assert [e.position for e in read] == [1, 2, 3]
    assert [e.id for e in read] == [e.id for e in sent]
    assert [e.type for e in read] == [e.type for e in sent]
    assert [e.data for e in read] == [e.data for e in sent]
    assert [e.metadata for e in read] == [e.metadata for e in sent]
    assert all(e.stream_name == stream and e.category == "broadcast" for e in read)
    # One transaction: one transaction_id, and global positions increasing in stream order.
    assert len({e.transaction_id for e in read}) == 1
    assert [e.global_position for e in read] == sorted(e.global_position for e in read)
    assert await eventstore.stream_version(pool, stream) == 3


async def test_append_with_any_version_goes_to_the_end_and_read_stream_pages(pool):
    stream = new_stream()
    async with pool.acquire() as con:
        await eventstore.append(con, stream, new_events(2), NO_STREAM)
        more = await eventstore.append(con, stream, new_events(2, tag="more"), ANY_VERSION)
        assert [e.position for e in more] == [3, 4]
        # ANY_VERSION on a stream that does not exist yet starts it at 1.
        fresh = new_stream()
        assert [e.position for e in await eventstore.append(con, fresh, new_events(1), ANY_VERSION)] == [1]

        assert [e.position for e in await eventstore.read_stream(con, stream)] == [1, 2, 3, 4]
        assert [e.id for e in await eventstore.read_stream(con, stream, after_position=2)] == [e.id for e in more]
        assert await eventstore.read_stream(con, new_stream()) == []
        assert await eventstore.append(con, stream, [], 99) == []  # nothing to append: no version check


async def test_append_in_a_rolled_back_transaction_leaves_nothing(pool):
    stream = new_stream()
    with pytest.raises(RuntimeError):
        async with pool.acquire() as con, con.transaction():
            await eventstore.append(con, stream, new_events(2), NO_STREAM)
            raise RuntimeError("abort")
    assert await eventstore.read_stream(pool, stream) == []


# ---------------------------------------------------------------------------------------------
# 2. expected-version conflicts


@pytest.mark.parametrize("expected", [NO_STREAM, 1, 3])
async def test_wrong_expected_version_raises_and_writes_nothing(pool, expected):
    stream = new_stream()
    async with pool.acquire() as con:
        before = await eventstore.append(con, stream, new_events(2), NO_STREAM)
        with pytest.raises(WrongExpectedVersion) as info:
            await eventstore.append(con, stream, new_events(1, tag="stale"), expected)
    # NO_STREAM is checked by the unique (stream, position) alone, without reading the version first
    actual = None if expected == NO_STREAM else 2
    assert (info.value.stream_name, info.value.expected, info.value.actual) == (stream, expected, actual)
    assert await eventstore.read_stream(pool, stream) == before
    assert len(await event_ids(pool)) == 2


async def test_two_open_transactions_at_one_version_exactly_one_commits(pool, two_connections):
    a, b = two_connections
    stream = new_stream()
    winner, loser = new_events(2, tag="a"), new_events(1, tag="b")

    tr_a = a.transaction()
    await tr_a.start()
    await eventstore.append(a, stream, winner, NO_STREAM)
    tr_b = b.transaction()
    await tr_b.start()
    # b still sees an empty stream, so the version check passes; its insert then waits on a's
    # uncommitted (stream_name, position) key and fails once a commits.
    b_append = asyncio.create_task(eventstore.append(b, stream, loser, NO_STREAM))
    await asyncio.sleep(0.3)
    assert not b_append.done()
    await tr_a.commit()
    with pytest.raises(WrongExpectedVersion) as info:
        await b_append
    await tr_b.rollback()

    assert info.value.expected == NO_STREAM
    assert [e.id for e in await eventstore.read_stream(pool, stream)] == [e.id for e in winner]


async def test_many_racing_appends_at_one_version_exactly_one_wins(pool):
    stream = new_stream()
    rng = random.Random(7)

    async def attempt(i: int) -> list[RecordedEvent]:
        async with pool.acquire() as con, con.transaction():
            written = await eventstore.append(con, stream, new_events(1 + i % 3, tag=str(i)), NO_STREAM)
            await asyncio.sleep(rng.uniform(0, 0.1))  # overlap the transactions
            return written

    results = await asyncio.gather(*(attempt(i) for i in range(12)), return_exceptions=True)

    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1
    assert all(isinstance(r, WrongExpectedVersion) for r in lost), lost
    assert await eventstore.read_stream(pool, stream) == won[0]


async def test_racing_any_version_appends_all_land_one_after_another(pool):
    stream = new_stream()
    rng = random.Random(11)
    go = asyncio.Event()

    async def appender(i: int) -> list[RecordedEvent]:
        evs = new_events(1 + i % 3, tag=str(i))
        async with pool.acquire() as con:
            await go.wait()  # every appender holds its own connection, then all start at once
            if i % 2:  # half append on their own, outside a transaction
                return await eventstore.append(con, stream, evs, ANY_VERSION)
            async with con.transaction():  # half in a transaction held open a while after the append
                written = await eventstore.append(con, stream, evs, ANY_VERSION)
                await asyncio.sleep(rng.uniform(0, 0.05))
                return written

    tasks = [asyncio.create_task(appender(i)) for i in range(24)]
    await asyncio.sleep(0.2)
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert not [r for r in results if isinstance(r, BaseException)], results
    # Every append landed, each one's events together, and the stream has no gap and no overlap
    for written in results:
        positions = [e.position for e in written]
        assert positions == list(range(positions[0], positions[0] + len(positions)))
    total = sum(len(written) for written in results)
    stored = await eventstore.read_stream(pool, stream)
    assert [e.position for e in stored] == list(range(1, total + 1))
    assert sorted(e.id for e in stored) == sorted(e.id for written in results for e in written)


# ---------------------------------------------------------------------------------------------
# 3. commit-order reads: the xid8 horizon never skips a late commit


async def test_read_committed_stops_at_a_transaction_still_running(pool, two_connections):
    a, b = two_connections
    early = await eventstore.append(pool, new_stream(), new_events(1), NO_STREAM)

    tr_a = a.transaction()
    await tr_a.start()
    held = await eventstore.append(a, new_stream(), new_events(2), NO_STREAM)  # lower position, commits last
    later = await eventstore.append(b, new_stream(), new_events(1), NO_STREAM)  # autocommitted
    assert later[0].global_position > held[-1].global_position

    # Only what is below the oldest running transaction: `later` waits behind `held`.
    assert await eventstore.read_committed(pool, Checkpoint()) == early
    await tr_a.commit()
    assert await eventstore.read_committed(pool, early[-1].checkpoint) == held + later


@dataclass
class Writers:
    committed: set[uuid.UUID] = field(default_factory=set)
    rolled_back: set[uuid.UUID] = field(default_factory=set)
    long_ids: set[uuid.UUID] = field(default_factory=set)


class Rollback(Exception):
    pass


async def test_out_of_order_commits_are_never_skipped_by_the_horizon_reader_but_are_by_a_naive_one(pool):
    rng = random.Random(20240611)
    out = Writers()
    projection = SeenProjection()
    long_inserted = asyncio.Event()
    writers_done = asyncio.Event()

    async def writer(i: int, *, after_long: bool) -> None:
        if after_long:
            await long_inserted.wait()
        await asyncio.sleep(rng.uniform(0, 0.8 if after_long else 0.3))
        # Distinct streams: ANY_VERSION appends to one stream wait for each other's transaction
        # (the stream lock), so they could not commit out of order, which is what this test is about.
        batches = {new_stream(): new_events(rng.randint(1, 3), tag=str(i)) for _ in range(rng.randint(1, 2))}
        ids = {e.id for evs in batches.values() for e in evs}
        roll_back = i % 5 == 0
        try:
            async with pool.acquire() as con, con.transaction():
                for stream, evs in batches.items():
                    await eventstore.append(con, stream, evs, ANY_VERSION)
                # Positions are taken; sleeping before commit makes lower positions commit later.
                await asyncio.sleep(rng.uniform(0, 0.2))
                if roll_back:
                    raise Rollback
        except Rollback:
            out.rolled_back |= ids
        else:
            out.committed |= ids

    async def long_writer() -> None:
        # Start once the tailing projection has applied something, so it demonstrably tails
        # mid-run rather than only in the final catch_up.
        deadline = time.monotonic() + 5
        while not projection.applied:
            assert time.monotonic() < deadline, "the projection applied nothing while writers ran"
            await asyncio.sleep(0.01)
        evs = new_events(3, tag="long")
        async with pool.acquire() as con, con.transaction():
            await eventstore.append(con, new_stream(), evs, NO_STREAM)
            long_inserted.set()
            # Hold low global positions uncommitted while the later writers commit and the readers
            # poll past them; then commit last.
            await asyncio.sleep(1.2)
        out.long_ids |= {e.id for e in evs}
        out.committed |= out.long_ids

    async def tail_projection() -> None:
        while not writers_done.is_set():
            await projections.catch_up(pool, projection)
            await asyncio.sleep(0.02)

    naive_seen: list[uuid.UUID] = []
    naive_last = 0

    async def naive_read() -> None:
        nonlocal naive_last
        rows = await pool.fetch(
            "SELECT id, global_position FROM events WHERE global_position > $1 ORDER BY global_position",
            naive_last,
        )
        naive_seen.extend(r["id"] for r in rows)
        if rows:
            naive_last = rows[-1]["global_position"]

    async def tail_naive() -> None:
        while not writers_done.is_set():
            await naive_read()
            await asyncio.sleep(0.02)

    async def run_writers() -> None:
        try:
            await asyncio.gather(
                long_writer(),
                *(writer(i, after_long=False) for i in range(20)),
                *(writer(i, after_long=True) for i in range(20, 50)),
            )
        finally:
            writers_done.set()

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(run_writers(), tail_projection(), tail_naive()), timeout=15)
    applied_while_tailing = len(projection.applied)
    await projections.catch_up(pool, projection)
    await naive_read()
    elapsed = time.monotonic() - started

    # The writers did what the test relies on.
    assert out.rolled_back and out.long_ids and len(out.committed) > 50
    assert await event_ids(pool) == out.committed  # rolled-back events were never stored
    assert applied_while_tailing > 0  # it tailed mid-run (guaranteed by long_writer's wait)

    # The horizon reader saw exactly the committed events, each once, in (xid, position) order.
    seen = await seen_ids(pool)
    assert len(seen) == len(projection.applied) == len(out.committed)
    assert set(seen) == {e.id for e in projection.applied} == out.committed
    order = [(e.transaction_id, e.global_position) for e in projection.applied]
    assert order == sorted(set(order))
    last = max(await all_events(pool), key=lambda e: (e.transaction_id, e.global_position))
    async with pool.acquire() as con:
        assert await eventstore.load_checkpoint(con, projection.name) == last.checkpoint

    # The naive "global_position > last" reader lost the long transaction's events for good.
    missed = out.committed - set(naive_seen)
    assert out.long_ids <= missed, f"naive reader missed {len(missed)}, not the long transaction's events"
    assert not set(naive_seen) & out.rolled_back
    assert len(naive_seen) == len(set(naive_seen))
    assert elapsed < 10

    # 4. (also) a rebuild of this view ends identical.
    assert await projections.rebuild(pool, projection) == len(out.committed)
    rebuilt = await seen_ids(pool)
    assert len(rebuilt) == len(set(rebuilt)) and set(rebuilt) == out.committed


# ---------------------------------------------------------------------------------------------
# 4. rebuild


async def test_rebuild_replays_the_whole_log_into_an_identical_view(pool):
    projection = SeenProjection()
    for i in range(7):
        await eventstore.append(pool, new_stream(), new_events(1 + i % 3), NO_STREAM)
    total = len(await event_ids(pool))
    # A small batch makes catch_up loop, including a final batch that is exactly full.
    assert await projections.catch_up(pool, projection, batch_size=total // 2) == total
    assert await projections.catch_up(pool, projection) == 0  # nothing new: nothing re-applied
    before = sorted(await seen_ids(pool))

    assert await projections.rebuild(pool, projection) == total

    after = await seen_ids(pool)
    assert sorted(after) == before and len(after) == len(set(after)) == total
    assert len(projection.applied) == 2 * total  # every event applied once per pass, no more
    last = (await all_events(pool))[-1]
    async with pool.acquire() as con:
        assert await eventstore.load_checkpoint(con, projection.name) == last.checkpoint
    # And it keeps tailing from there.
    more = await eventstore.append(pool, new_stream(), new_events(2), NO_STREAM)
    assert await projections.catch_up(pool, projection) == 2
    assert set(await seen_ids(pool)) == set(before) | {e.id for e in more}


# ---------------------------------------------------------------------------------------------
# 5. category filter


async def test_read_committed_with_categories_returns_only_those_categories(pool):
    written: dict[str, list[RecordedEvent]] = {"broadcast": [], "contact": [], "broadcastx": []}
    for i in range(9):
        category = list(written)[i % 3]
        written[category] += await eventstore.append(pool, new_stream(category), new_events(2), NO_STREAM)

    async with pool.acquire() as con:
        only = await eventstore.read_committed(con, Checkpoint(), categories=("broadcast",))
        both = await eventstore.read_committed(con, Checkpoint(), categories=("broadcast", "contact"))
        everything = await eventstore.read_committed(con, Checkpoint())
        # Paging with a limit and the last event's checkpoint gives the same sequence.
        paged: list[RecordedEvent] = []
        while page := await eventstore.read_committed(
            con, paged[-1].checkpoint if paged else Checkpoint(), limit=4, categories=("broadcast",)
        ):
            paged += page

    # "broadcastx-..." shares a prefix but is another category: the match is on the whole part.
    assert only == written["broadcast"] and {e.category for e in only} == {"broadcast"}
    assert paged == only
    assert both == sorted(written["broadcast"] + written["contact"], key=lambda e: e.global_position)
    assert everything == await all_events(pool) and len(everything) == 18

    projection = SeenProjection(name="contacts-only", categories=("contact",))
    assert await projections.catch_up(pool, projection) == len(written["contact"])
    assert set(await seen_ids(pool)) == {e.id for e in written["contact"]}
