"""The planner and the dispatcher against real Postgres and JetStream: a crash half-way through
planning or dispatching a run, then a resume, publishes every batch exactly once and puts every
member in exactly one batch."""
from __future__ import annotations

import uuid
from collections import Counter
from contextlib import asynccontextmanager

import asyncpg
import msgspec
import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from sender_service import planner as planner_module
from sender_service.dispatcher import Dispatcher, FixedBudget
from sender_service.planner import Plan, Planner
from shared.broadcasts import decider as b
from shared.platform import bus, codec, db, eventstore
from shared.sending.jobs import (
    Job,
    Recipient,
    batch_recipients,
    decode_job,
    decode_recipients,
)
from tests.stack import api_for
from tests.test_send_e2e import audience


class Crash(Exception):
    pass


class CrashingJetStream:
    """Fault injection around a real JetStream context: the process 'dies' after `survive`
    publishes (the last of them may or may not have reached the server, as in a real crash)."""

    def __init__(self, js, survive: int) -> None:
        self.js, self.left = js, survive

    async def publish_async(self, *args, **kwargs):
        if self.left == 0:
            raise Crash()
        self.left -= 1
        return await self.js.publish_async(*args, **kwargs)


async def started_run(settings, api, n: int, batch_size: int) -> Plan:
    list_id = await audience(api, n)
    provider = await api.post(
        "/v1/providers",
        {"name": "null", "channel": "email", "kind": "null", "from_email": "news@example.com",
         "batch_size": batch_size, "batch_delay_ms": 0, "max_retries": 0},
    )
    created = await api.post(
        "/v1/broadcasts",
        {"name": "n", "list_id": list_id, "provider_id": provider["id"],
         "content": {"subject": "Hi", "html": "<p>Hi</p>", "text": "Hi"}},
    )
    await api.post(f"/v1/broadcasts/{created['id']}/send", expect=202)
    return await plan_of(settings, uuid.UUID(created["id"]))


async def plan_of(settings, broadcast_id: uuid.UUID) -> Plan:
    """The plan of the broadcast's run, from its BroadcastStarted event."""
    con = await db.connect(settings.database_url)
    try:
        events = await eventstore.read_stream(con, b.stream_name(broadcast_id))
    finally:
        await con.close()
    started = next(codec.from_recorded(e, b.Event) for e in events if e.type == "BroadcastStarted")
    return Plan(started.tenant_id, broadcast_id, started)


@asynccontextmanager
async def planning(settings):
    """JetStream, the stream names and a pool for a planner run by the test (no background tasks)."""
    nc = await nats.connect(settings.nats_url)
    pool = await db.create_pool(settings.database_url, max_size=4)
    try:
        js = nc.jetstream()
        yield js, await bus.ensure_streams(js, settings), pool
    finally:
        await pool.close()
        await nc.close()


async def no_heartbeat() -> None:
    pass


async def published_jobs(js, names: bus.Names) -> list:
    info = await js.stream_info(names.jobs_stream)
    sub = await js.pull_subscribe(names.jobs_all, stream=names.jobs_stream,
                                  config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    jobs = []
    while len(jobs) < info.state.messages:
        jobs += [decode_job(m.data) for m in await sub.fetch(batch=100, timeout=5)]
    # Deleted now, not when it times out: a work-queue stream takes one consumer per subject at a time.
    await js.delete_consumer(names.jobs_stream, (await sub.consumer_info()).name)
    await sub.unsubscribe()
    return jobs


class DyingHeartbeat:
    """The planner's heartbeat after each snapshot chunk: the process 'dies' at the `survive`-th."""

    def __init__(self, survive: int) -> None:
        self.left = survive

    async def __call__(self) -> None:
        if self.left == 0:
            raise Crash()
        self.left -= 1


def dispatcher(pool, js, names: bus.Names) -> Dispatcher:
    """A dispatcher whose windows hold any test's whole run."""
    return Dispatcher(pool, js, names, FixedBudget(10_000), run_window=10_000, tenant_window=10_000)


async def planned_and_dispatched(pool, js, names: bus.Names, plan: Plan) -> None:
    await Planner(pool, js, names).plan(plan, no_heartbeat)
    await dispatcher(pool, js, names).dispatch_once()


async def recipients_of(con: asyncpg.Connection, job: Job) -> list[Recipient]:
    """The recipients a worker reads for `job` (jobs name a batch; they do not carry its recipients)."""
    return decode_recipients(await con.fetchval(
        f"SELECT {batch_recipients(job.channel)} FROM batches bt WHERE broadcast_id = $1 AND run = $2 AND seq = $3",
        job.broadcast_id, job.run, job.seq,
    ))


@pytest.mark.parametrize("survive", [0, 2, 4])
async def test_a_planner_and_a_dispatcher_crashing_half_way_resume_without_duplicating_or_dropping_a_job(
    settings, monkeypatch, survive
):
    # Given a started run of 95 members in batches of 4 (24 jobs), read 20 members per chunk
    monkeypatch.setattr(planner_module, "READ_CHUNK", 20)
    settings = msgspec.structs.replace(settings, run_background=False)
    async with planning(settings) as (js, names, pool):
        async with api_for(settings) as api:
            plan = await started_run(settings, api, 95, batch_size=4)

        # When the planner dies after `survive` chunks and a fresh one plans the run again,
        with pytest.raises(Crash):
            await Planner(pool, js, names).plan(plan, DyingHeartbeat(survive))
        await Planner(pool, js, names).plan(plan, no_heartbeat)
        # and the dispatcher dies after `survive * 5` publishes and a fresh one dispatches again
        with pytest.raises(Crash):
            await Dispatcher(pool, CrashingJetStream(js, survive * 5), names, FixedBudget(10_000), 10_000,
                             10_000).dispatch_once()
        await dispatcher(pool, js, names).dispatch_once()

        # Then JetStream holds each of the 24 jobs once, and every member is in exactly one of them
        jobs = await published_jobs(js, names)
        assert sorted(j.seq for j in jobs) == list(range(24))
        con: asyncpg.Connection = await db.connect(settings.database_url)
        try:
            per_job = [await recipients_of(con, j) for j in jobs]
            per_member = Counter(r.contact_id for rs in per_job for r in rs)
            assert len(per_member) == 95 and set(per_member.values()) == {1}
            run = await con.fetchrow("SELECT * FROM runs WHERE broadcast_id = $1", plan.broadcast_id)
            history = [e.type for e in await eventstore.read_stream(con, b.stream_name(plan.broadcast_id))]
        finally:
            await con.close()
        assert (run["batches"], run["recipients"], run["published"], run["planned"]) == (24, 95, 24, True)
        assert history.count("AudienceSnapshotted") == 1


async def test_batches_leave_out_members_without_an_address_and_stay_under_the_job_size_limit(settings, monkeypatch):
    # Given 60 members, of whom 25 have no email (a whole chunk of them among them), and recipients
    # whose attributes make about four of them fill the job size limit
    monkeypatch.setattr(planner_module, "READ_CHUNK", 10)
    monkeypatch.setattr(planner_module, "JOB_BYTES", 2_000)
    settings = msgspec.structs.replace(settings, run_background=False)
    async with planning(settings) as (js, names, pool):
        async with api_for(settings) as api:
            people = [
                {"external_id": f"p{i}", "phone": f"+4930{i:07d}"} if 20 <= i < 45 else
                {"external_id": f"p{i}", "email": f"p{i}@example.com", "attributes": {"bio": "x" * 400, "n": i}}
                for i in range(60)
            ]
            ids = (await api.post("/v1/contacts", people))["ids"]
            with_email = {cid for cid, p in zip(ids, people) if "email" in p}
            lst = await api.post("/v1/lists", {"name": "mixed"})
            await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
            provider = await api.post(
                "/v1/providers",
                {"name": "null", "channel": "email", "kind": "null", "from_email": "news@example.com",
                 "batch_size": 8, "batch_delay_ms": 0, "max_retries": 0},
            )
            created = await api.post(
                "/v1/broadcasts",
                {"name": "n", "list_id": lst["id"], "provider_id": provider["id"],
                 "content": {"subject": "Hi", "html": "<p>{{ bio }}</p>", "text": "Hi"}},
            )
            await api.post(f"/v1/broadcasts/{created['id']}/send", expect=202)
        # When the run is planned
        plan = await plan_of(settings, uuid.UUID(created["id"]))
        await planned_and_dispatched(pool, js, names, plan)
        jobs = sorted(await published_jobs(js, names), key=lambda j: j.seq)
        con = await db.connect(settings.database_url)
        try:
            batches = await con.fetch(
                "SELECT seq, contact_ids, addresses FROM batches WHERE broadcast_id = $1 ORDER BY seq", plan.broadcast_id
            )
            run = await con.fetchrow("SELECT * FROM runs WHERE broadcast_id = $1", plan.broadcast_id)
            per_job = [await recipients_of(con, j) for j in jobs]
        finally:
            await con.close()

        # Then every member with an email is in exactly one job, with its own data, and nobody else is
        assert [j.seq for j in jobs] == list(range(len(jobs)))
        recipients = [r for job_recipients in per_job for r in job_recipients]
        assert sorted(r.contact_id for r in recipients) == sorted(with_email)
        assert all(r.address == r.email and r.attributes["bio"] == "x" * 400 for r in recipients)
        # and no job is over the size limit by more than one recipient, or over batch_size
        assert all(len(rs) <= 8 for rs in per_job)
        assert all(len(msgspec.json.encode(rs[1:])) <= 2_000 for rs in per_job)
        assert max(len(rs) for rs in per_job) < 8  # the size limit, not batch_size, cut them
        # and the batch rows say the same as the jobs
        assert [(r["seq"], r["contact_ids"]) for r in batches] == [
            (j.seq, [x.contact_id for x in rs]) for j, rs in zip(jobs, per_job)
        ]
        assert (run["batches"], run["recipients"], run["planned"]) == (len(jobs), len(with_email), True)


async def test_a_retry_run_snapshots_the_failed_recipients_of_the_run_retried_and_resumes_after_a_crash(
    settings, monkeypatch
):
    # Given a run of 40 in which the server refused every third address (14 failed), and one of
    # those contacts deleted since
    from tests.smtp_peer import SmtpPeer
    from tests.stack import sender_in_process
    from tests.test_send_e2e import smtp_broadcast

    refused = {f"person{i}@example.com" for i in range(0, 40, 3)}
    with SmtpPeer(fail_permanently=refused) as peer:
        async with api_for(settings) as api:
            bid = await smtp_broadcast(api, peer, await audience(api, 40), max_retries=0)
            async with sender_in_process(settings):
                await api.post(f"/v1/broadcasts/{bid}/send", expect=202)
                first = await api.wait_for_status(bid, {"completed", "partially_failed", "failed"})
            failing = sorted(m["contact_id"] for m in await api.all_messages(bid) if m["status"] == "failed")
            assert first["counters"]["failed"] == len(failing) == 14
            await api.call("DELETE", f"/v1/contacts/{failing[5]}")
            # When the failed ones are retried (no sender runs: this test plans the run itself)
            accepted = await api.post(f"/v1/broadcasts/{bid}/retry", {"statuses": ["failed"]}, expect=202)
    assert (accepted["queued"], accepted["run"]) == (13, 2)

    monkeypatch.setattr(planner_module, "READ_CHUNK", 3)
    settings = msgspec.structs.replace(settings, run_background=False)
    broadcast_id = uuid.UUID(bid)
    async with planning(settings) as (js, names, pool):
        con = await db.connect(settings.database_url)
        try:
            events = await eventstore.read_stream(con, b.stream_name(broadcast_id))
        finally:
            await con.close()
        started = [codec.from_recorded(e, b.Event) for e in events if e.type == "BroadcastStarted"][-1]
        plan = Plan(started.tenant_id, broadcast_id, started)
        # and its planner dies after two chunks, and a fresh one plans it again
        with pytest.raises(Crash):
            await Planner(pool, js, names).plan(plan, DyingHeartbeat(2))
        await Planner(pool, js, names).plan(plan, no_heartbeat)
        con = await db.connect(settings.database_url)
        try:
            batches = await con.fetch("SELECT seq, contact_ids FROM batches WHERE broadcast_id = $1 AND run = 2 "
                                      "ORDER BY seq", broadcast_id)
            run = await con.fetchrow("SELECT * FROM runs WHERE broadcast_id = $1 AND run = 2", broadcast_id)
            events = await eventstore.read_stream(con, b.stream_name(broadcast_id))
        finally:
            await con.close()

    # Then run 2's batches hold each failed contact still there once, in contact-id order, nobody else
    snapshotted = [codec.from_recorded(e, b.Event) for e in events if e.type == "AudienceSnapshotted"][-1]
    assert [cid for r in batches for cid in r["contact_ids"]] == sorted(set(failing) - {failing[5]})
    assert [r["seq"] for r in batches] == list(range(len(batches)))
    assert (run["recipients"], run["planned"]) == (13, True)
    assert (snapshotted.run, snapshotted.recipients, snapshotted.retried_failed, snapshotted.retried_unknown) == (
        2, 13, 13, 0)
