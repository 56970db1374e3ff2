"""The scheduler against real Postgres with an injected clock: each occurrence fires exactly once,
whatever the number of schedulers, across DST changes, and missed occurrences follow their policy.

The sender is not running here; the tests play the planner's part by recording an empty snapshot
(which completes the run at once and reschedules a recurring broadcast), so a whole calendar of
occurrences can be walked through in a second."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from shared.audience import lists
from shared.broadcasts import decider as b
from shared.broadcasts import handlers
from shared.broadcasts.scheduler import tick
from shared.channels import accounts
from shared.platform import codec, commands, db, eventstore
from shared.tenants import store as tenants

UTC = timezone.utc
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def new_york(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=NEW_YORK, fold=fold).astimezone(UTC)


@asynccontextmanager
async def pools(settings, n: int) -> AsyncIterator[list[asyncpg.Pool]]:
    """`n` separate pools: the connections of `n` API replicas."""
    opened = [await db.create_pool(settings.database_url, min_size=1, max_size=3) for _ in range(n)]
    try:
        yield opened
    finally:
        for pool in opened:
            await pool.close()


class Tenant:
    """A tenant with a list of three contacts and a null provider, creating broadcasts as a user would."""

    def __init__(self, pool: asyncpg.Pool, tenant_id: uuid.UUID, list_id: uuid.UUID, provider_id: uuid.UUID) -> None:
        self.pool, self.actor = pool, handlers.Actor(tenant_id, "test")
        self.list_id, self.provider_id = list_id, provider_id

    @classmethod
    async def create(cls, pool: asyncpg.Pool) -> Tenant:
        async with pool.acquire() as con:
            tenant = await tenants.create_tenant(con, "scheduling")
            ids = [r["id"] for r in await con.fetch(
                "INSERT INTO contacts (tenant_id, email) SELECT $1, 'c' || i || '@example.com' "
                "FROM generate_series(1, 3) i RETURNING id", tenant.id)]
            lst, _ = await lists.create_list(con, tenant.id, "everyone")
            await lists.change_members(con, tenant.id, lst.id, add=True, contact_ids=ids)
            provider = await accounts.create(
                con, tenant_id=tenant.id, name="null", kind="null", config={"from_email": "news@example.com"})
        return cls(pool, tenant.id, lst.id, provider.id)

    async def scheduled(self, now: datetime, *, scheduled_at: datetime | None = None, cron: str | None = None,
                        tz: str = "UTC", missed_policy: str = "send", max_lateness_s: int = 3600) -> uuid.UUID:
        broadcast_id = uuid.uuid4()
        create = b.CreateBroadcast(
            broadcast_id=broadcast_id, tenant_id=self.actor.tenant_id, name="Daily digest", list_id=self.list_id,
            provider_id=self.provider_id, content=b.Content(subject="Digest", text="Today"), at=now)
        recurrence = b.Recurrence(cron=cron, timezone=tz) if cron else None
        schedule = b.ScheduleBroadcast(
            scheduled_at=scheduled_at, at=now,
            schedule=b.Schedule(recurrence=recurrence, timezone=tz, missed_policy=missed_policy,
                                max_lateness_s=max_lateness_s))
        await handlers.create(self.pool, self.actor, create, then=schedule)
        return broadcast_id

    async def finish_runs(self, now: datetime) -> None:
        """Play the planner: every started run is recorded as an empty snapshot, which ends it."""
        async with self.pool.acquire() as con:
            started = await con.fetch("SELECT id, run FROM broadcasts WHERE status = 'queued'")
        for row in started:
            await commands.handle(self.pool, handlers.DECIDER, b.stream_name(row["id"]),
                                 b.RecordSnapshot(run=row["run"], recipients=0, batches=0, at=now),
                                 self.actor.metadata(), handlers.INLINE)

    async def events(self, broadcast_id: uuid.UUID, *types: str) -> list[b.Event]:
        async with self.pool.acquire() as con:
            recorded = await eventstore.read_stream(con, b.stream_name(broadcast_id))
        return [codec.from_recorded(e, b.Event) for e in recorded if e.type in types]

    async def status(self, broadcast_id: uuid.UUID) -> tuple[str, datetime | None]:
        async with self.pool.acquire() as con:
            row = await con.fetchrow("SELECT status, scheduled_at FROM broadcasts WHERE id = $1", broadcast_id)
        return row["status"], row["scheduled_at"]


async def walk(tenant: Tenant, schedulers: list[asyncpg.Pool], start: datetime, end: datetime,
               step: timedelta = timedelta(minutes=5)) -> None:
    """Advance the injected clock from `start` to `end`; at each step every scheduler ticks at once."""
    now = start
    while now <= end:
        await asyncio.gather(*(tick(pool, now) for pool in schedulers))
        await tenant.finish_runs(now)
        now += step


def fired_at(started: list[b.Event]) -> list[datetime]:
    return [e.occurrence_at for e in started]  # type: ignore[union-attr]


# ---- several schedulers ----


async def test_three_schedulers_fire_each_due_broadcast_exactly_once(settings):
    async with pools(settings, 3) as schedulers:
        # Given twenty one-off broadcasts due at the same minute
        tenant = await Tenant.create(schedulers[0])
        now = utc(2026, 6, 1, 8, 0)
        due = utc(2026, 6, 1, 9, 0)
        ids = [await tenant.scheduled(now, scheduled_at=due) for _ in range(20)]

        # When three schedulers tick at the same instant, twice (a retry after a crash)
        fired = await asyncio.gather(*(tick(pool, due + timedelta(seconds=1)) for pool in schedulers))
        again = await asyncio.gather(*(tick(pool, due + timedelta(seconds=2)) for pool in schedulers))

        # Then each broadcast started exactly one run, for that occurrence
        assert sum(fired) == 20 and sum(again) == 0
        for broadcast_id in ids:
            started = await tenant.events(broadcast_id, "BroadcastStarted")
            assert fired_at(started) == [due]
            assert started[0].audience_size == 3  # type: ignore[union-attr]
            assert (await tenant.status(broadcast_id))[0] == "queued"


async def test_nothing_fires_before_it_is_due(settings):
    async with pools(settings, 1) as (pool,):
        tenant = await Tenant.create(pool)
        now = utc(2026, 6, 1, 8, 0)
        broadcast_id = await tenant.scheduled(now, scheduled_at=utc(2026, 6, 1, 9, 0))

        assert await tick(pool, utc(2026, 6, 1, 8, 59, 59)) == 0
        assert await tenant.status(broadcast_id) == ("scheduled", utc(2026, 6, 1, 9, 0))


async def test_a_recurring_broadcast_runs_every_occurrence_once_with_three_schedulers(settings):
    async with pools(settings, 3) as schedulers:
        tenant = await Tenant.create(schedulers[0])
        start = utc(2026, 6, 1, 0, 0)
        broadcast_id = await tenant.scheduled(start, cron="0 */6 * * *")  # 00:00, 06:00, 12:00, 18:00 UTC

        await walk(tenant, schedulers, start, utc(2026, 6, 2, 23, 59))

        started = await tenant.events(broadcast_id, "BroadcastStarted")
        expected = [utc(2026, 6, 1, h) for h in (6, 12, 18)] + [utc(2026, 6, 2, h) for h in (0, 6, 12, 18)]
        assert fired_at(started) == expected
        assert [e.run for e in started] == list(range(1, 8))  # type: ignore[union-attr]
        assert await tenant.status(broadcast_id) == ("scheduled", utc(2026, 6, 3, 0))


# ---- DST in America/New_York ----


async def test_fall_back_a_local_time_that_occurs_twice_fires_once(settings):
    # 2026-11-01: at 02:00 EDT the clocks go back to 01:00 EST, so 01:30 happens twice.
    async with pools(settings, 3) as schedulers:
        tenant = await Tenant.create(schedulers[0])
        start = new_york(2026, 10, 30, 12, 0)
        broadcast_id = await tenant.scheduled(start, cron="30 1 * * *", tz="America/New_York")

        await walk(tenant, schedulers, start, new_york(2026, 11, 2, 12, 0))

        started = await tenant.events(broadcast_id, "BroadcastStarted")
        assert fired_at(started) == [
            utc(2026, 10, 31, 5, 30),  # 01:30 EDT
            utc(2026, 11, 1, 5, 30),  # 01:30 EDT, the first pass only; 06:30Z (01:30 EST) does not fire
            utc(2026, 11, 2, 6, 30),  # 01:30 EST
        ]
        assert not await tenant.events(broadcast_id, "OccurrenceSkipped")


async def test_spring_forward_a_local_time_that_does_not_exist_fires_at_the_next_valid_minute(settings):
    # 2026-03-08: at 02:00 EST the clocks jump to 03:00 EDT, so 02:30 does not exist that day.
    async with pools(settings, 3) as schedulers:
        tenant = await Tenant.create(schedulers[0])
        start = new_york(2026, 3, 6, 12, 0)
        broadcast_id = await tenant.scheduled(start, cron="30 2 * * *", tz="America/New_York")

        await walk(tenant, schedulers, start, new_york(2026, 3, 9, 12, 0))

        started = await tenant.events(broadcast_id, "BroadcastStarted")
        assert fired_at(started) == [
            utc(2026, 3, 7, 7, 30),  # 02:30 EST
            utc(2026, 3, 8, 7, 0),  # 03:00 EDT, the first valid minute after the gap
            utc(2026, 3, 9, 6, 30),  # 02:30 EDT
        ]


# ---- missed occurrences ----


async def test_missed_with_skip_policy_is_recorded_and_the_next_occurrence_still_fires(settings):
    async with pools(settings, 1) as (pool,):
        tenant = await Tenant.create(pool)
        start = utc(2026, 6, 1, 0, 0)
        broadcast_id = await tenant.scheduled(start, cron="0 9 * * *", missed_policy="skip")

        # Given nothing ran from 08:00 to 09:10 on June 1st (the 09:00 occurrence was missed)
        await tick(pool, utc(2026, 6, 1, 9, 10))
        # When the scheduler keeps going until the next day
        await walk(tenant, [pool], utc(2026, 6, 1, 9, 15), utc(2026, 6, 2, 10, 0), step=timedelta(minutes=1))

        skipped = await tenant.events(broadcast_id, "OccurrenceSkipped")
        assert [e.occurrence_at for e in skipped] == [utc(2026, 6, 1, 9, 0)]  # type: ignore[union-attr]
        assert "skip" in skipped[0].reason  # type: ignore[union-attr]
        started = await tenant.events(broadcast_id, "BroadcastStarted")
        assert fired_at(started) == [utc(2026, 6, 2, 9, 0)]


async def test_missed_with_send_policy_sends_late_within_max_lateness(settings):
    async with pools(settings, 1) as (pool,):
        tenant = await Tenant.create(pool)
        now = utc(2026, 6, 1, 8, 0)
        late_ok = await tenant.scheduled(now, scheduled_at=utc(2026, 6, 1, 9, 0), max_lateness_s=3600)
        too_late = await tenant.scheduled(now, scheduled_at=utc(2026, 6, 1, 8, 30), max_lateness_s=3600)

        # Given the scheduler was down until 09:45: 45 minutes late for one, 75 for the other
        await tick(pool, utc(2026, 6, 1, 9, 45))

        started = await tenant.events(late_ok, "BroadcastStarted")
        assert fired_at(started) == [utc(2026, 6, 1, 9, 0)]
        assert started[0].at == utc(2026, 6, 1, 9, 45)  # type: ignore[union-attr]
        assert not await tenant.events(too_late, "BroadcastStarted")
        skipped = await tenant.events(too_late, "OccurrenceSkipped")
        assert [e.occurrence_at for e in skipped] == [utc(2026, 6, 1, 8, 30)]  # type: ignore[union-attr]
        # A skipped one-off schedule leaves the broadcast where a user can send or reschedule it
        assert (await tenant.status(too_late))[0] == "draft"


async def test_skip_policy_still_fires_an_occurrence_within_the_grace_period(settings):
    async with pools(settings, 1) as (pool,):
        tenant = await Tenant.create(pool)
        now = utc(2026, 6, 1, 8, 0)
        broadcast_id = await tenant.scheduled(now, scheduled_at=utc(2026, 6, 1, 9, 0), missed_policy="skip")

        await tick(pool, utc(2026, 6, 1, 9, 0, b.SKIP_GRACE_S - 1))

        assert fired_at(await tenant.events(broadcast_id, "BroadcastStarted")) == [utc(2026, 6, 1, 9, 0)]


@pytest.mark.parametrize("policy", ["send", "skip"])
async def test_a_rescheduled_broadcast_fires_at_its_new_time_only(settings, policy):
    async with pools(settings, 1) as (pool,):
        tenant = await Tenant.create(pool)
        now = utc(2026, 6, 1, 8, 0)
        broadcast_id = await tenant.scheduled(now, scheduled_at=utc(2026, 6, 1, 9, 0), missed_policy=policy)
        await handlers.schedule(pool, tenant.actor, broadcast_id, b.ScheduleBroadcast(
            scheduled_at=utc(2026, 6, 1, 10, 0), schedule=b.Schedule(missed_policy=policy), at=now))

        await walk(tenant, [pool], utc(2026, 6, 1, 8, 55), utc(2026, 6, 1, 11, 0), step=timedelta(minutes=1))

        assert fired_at(await tenant.events(broadcast_id, "BroadcastStarted")) == [utc(2026, 6, 1, 10, 0)]
        assert not await tenant.events(broadcast_id, "OccurrenceSkipped")
