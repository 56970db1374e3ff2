"""The worker's branches, each on its own, against real Postgres and JetStream: a job of a paused run
is held, one of a cancelled run dropped, a redelivered job after a crashed attempt sends nobody twice,
and a channel other than email takes each contact's address on it from the snapshot to the ledger."""
from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import msgspec
import pytest
from nats.js import JetStreamContext

from sender_service.job_context import JobContextLoader
from sender_service.planner import Plan, Planner
from sender_service.worker import UNKNOWN_OUTCOME, BatchBusy, JobProcessor, Stopping
from shared.broadcasts import decider as b
from shared.broadcasts import handlers
from shared.channels import accounts
from shared.kernel.content import SmsPart
from shared.platform import bus, db
from shared.sending.jobs import Job, Recipient
from tests.smtp_peer import SmtpPeer, smtp_peer  # noqa: F401  (the fixture)
from tests.stack import Api, api_for
from tests.test_planner import (
    no_heartbeat,
    plan_of,
    planned_and_dispatched,
    planning,
    published_jobs,
    recipients_of,
    started_run,
)
from tests.test_send_e2e import audience, smtp_broadcast


@dataclass
class Planned:
    api: Api
    broadcast_id: str
    jobs: list[Job]  # in seq order
    recipients: list[list[Recipient]]  # of each job
    processor: JobProcessor
    con: asyncpg.Connection
    planner: Planner
    plan: Plan
    js: JetStreamContext
    names: bus.Names


@asynccontextmanager
async def planned(settings, n: int, batch_size: int, peer: SmtpPeer | None = None) -> AsyncIterator[Planned]:
    """A run of `n` members planned into jobs that nothing consumes: the test is the only worker
    (no background tasks run either)."""
    settings = msgspec.structs.replace(settings, run_background=False)
    async with planning(settings) as (js, names, pool), api_for(settings) as api:
        if peer is None:
            plan = await started_run(settings, api, n, batch_size=batch_size)
        else:
            broadcast_id = await smtp_broadcast(api, peer, await audience(api, n), batch_size=batch_size)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            plan = await plan_of(settings, uuid.UUID(broadcast_id))
        planner = Planner(pool, js, names)
        await planned_and_dispatched(pool, js, names, plan)
        jobs = sorted(await published_jobs(js, names), key=lambda j: j.seq)
        con = await db.connect(settings.database_url)
        try:
            recipients = [await recipients_of(con, j) for j in jobs]
            processor = JobProcessor(pool, JobContextLoader(allow_private_networks=True), backoff_s=0.01)
            yield Planned(api, str(plan.broadcast_id), jobs, recipients, processor, con, planner, plan, js, names)
        finally:
            await con.close()


async def batch_status(con: asyncpg.Connection, job: Job) -> str:
    return await con.fetchval("SELECT status FROM batches WHERE broadcast_id = $1 AND run = $2 AND seq = $3",
                              job.broadcast_id, job.run, job.seq)


async def ledger_of(con: asyncpg.Connection, job: Job) -> dict[int, tuple[str, str | None]]:
    rows = await con.fetch("SELECT contact_id, status, error FROM messages WHERE broadcast_id = $1 AND batch_seq = $2",
                           job.broadcast_id, job.seq)
    return {r["contact_id"]: (r["status"], r["error"]) for r in rows}


async def test_a_job_of_a_paused_run_is_held_unsent_and_sent_after_the_resume(settings):
    async with planned(settings, 6, batch_size=3) as run:
        # Given a sending run of two jobs, paused
        await run.api.post(f"/v1/broadcasts/{run.broadcast_id}/pause")
        # When a worker takes its first job
        assert await run.processor.process(run.jobs[0]) is False
        # Then the batch is held and nobody of it is in the ledger
        assert await batch_status(run.con, run.jobs[0]) == "held" and await ledger_of(run.con, run.jobs[0]) == {}
        # And the resume publishes exactly that batch again, under a job id of its own, and it is sent
        await run.api.post(f"/v1/broadcasts/{run.broadcast_id}/resume")
        await run.planner.resume(run.plan, 1, no_heartbeat)
        republished = [j for j in await published_jobs(run.js, run.names) if j.resumes == 1]
        assert [j.seq for j in republished] == [0]
        assert await run.processor.process(republished[0]) is True
        ledger = await ledger_of(run.con, run.jobs[0])
        assert sorted(ledger) == sorted(r.contact_id for r in run.recipients[0])
        assert {status for status, _ in ledger.values()} == {"sent"}


async def test_a_job_of_a_cancelled_run_is_dropped_and_sends_nobody(settings):
    async with planned(settings, 6, batch_size=3) as run:
        await run.api.post(f"/v1/broadcasts/{run.broadcast_id}/cancel")
        assert await run.processor.process(run.jobs[1]) is False
        assert await batch_status(run.con, run.jobs[1]) == "dropped" and await ledger_of(run.con, run.jobs[1]) == {}
        # A redelivery of the dropped job changes nothing.
        assert await run.processor.process(run.jobs[1]) is False
        assert await batch_status(run.con, run.jobs[1]) == "dropped"
        messages = await run.api.all_messages(run.broadcast_id)
        assert sorted(m["status"] for m in messages) == ["dropped"] * 6


async def test_a_job_redelivered_after_a_crashed_attempt_sends_nobody_twice(settings, smtp_peer):  # noqa: F811
    async with planned(settings, 5, batch_size=5, peer=smtp_peer) as run:
        [job], [recipients], processor, con = run.jobs, run.recipients, run.processor, run.con
        first, second, *rest = [r.contact_id for r in recipients]
        # Given an attempt that claimed the batch, sent the first recipient and died while sending the second
        await con.execute("UPDATE batches SET status = 'sending' WHERE broadcast_id = $1", job.broadcast_id)
        await con.execute(
            """INSERT INTO messages (broadcast_id, run, contact_id, channel, batch_seq, address, status, attempts)
               VALUES ($1, 1, $2, 'email', 0, $3, 'sent', 1), ($1, 1, $4, 'email', 0, $5, 'sending', 1)""",
            job.broadcast_id, first, recipients[0].address, second, recipients[1].address,
        )
        # When the job is redelivered
        assert await processor.process(job) is True
        # Then only the three nobody had tried are sent; the one in flight is unknown, not resent
        assert sorted(r.rcpt_tos[0] for r in smtp_peer.received) == sorted(r.address for r in recipients[2:])
        ledger = await ledger_of(con, job)
        assert ledger[first] == ("sent", None) and ledger[second] == ("unknown", UNKNOWN_OUTCOME)
        assert all(ledger[c] == ("sent", None) for c in rest)
        # And the batch's outcome is counted from the ledger, both attempts together
        done = await con.fetchrow("SELECT status, sent, failed, unknown FROM batches WHERE broadcast_id = $1",
                                  job.broadcast_id)
        assert tuple(done) == ("done", 4, 0, 1)
        completed = await con.fetchval("SELECT data FROM events WHERE type = 'BatchCompleted'")
        assert (completed["sent"], completed["failed"], completed["unknown"]) == (4, 0, 1)
        # And a second redelivery finds the batch done and sends nothing more
        assert await processor.process(job) is False
        assert len(smtp_peer.received) == 3


async def test_a_stopping_worker_hands_its_job_back_between_two_recipients_and_the_next_attempt_goes_on(
    settings, smtp_peer  # noqa: F811
):
    async with planned(settings, 6, batch_size=6, peer=smtp_peer) as run:
        [job], [recipients], processor, con = run.jobs, run.recipients, run.processor, run.con
        smtp_peer.configure(delay=0.05)
        stop = asyncio.Event()

        async def stop_after_two() -> None:
            while len(smtp_peer.received) < 2:
                await asyncio.sleep(0.005)
            stop.set()

        # Given a worker told to stop (SIGTERM) once two of its six recipients were received
        watcher = asyncio.create_task(stop_after_two())
        # Then it finishes the message in hand and hands the job back, its outcomes written
        with pytest.raises(Stopping):
            await processor.process(job, stop)
        await watcher
        ledger = await ledger_of(con, job)
        assert 2 <= len(ledger) < 6 and {status for status, _ in ledger.values()} == {"sent"}
        # When another attempt takes the job at once
        assert await processor.process(job) is True
        # Then everyone received one copy, and nobody's outcome is unknown
        assert Counter(r.rcpt_tos[0] for r in smtp_peer.received) == Counter(r.address for r in recipients)
        assert {status for status, _ in (await ledger_of(con, job)).values()} == {"sent"}
        assert await batch_status(con, job) == "done"


async def test_a_job_redelivered_while_its_first_attempt_lives_waits_for_it_and_marks_nothing_unknown(
    settings, smtp_peer  # noqa: F811
):
    async with planned(settings, 4, batch_size=4, peer=smtp_peer) as run:
        [job], [recipients], processor, con = run.jobs, run.recipients, run.processor, run.con
        first = recipients[0]
        # Given an attempt that is alive (frozen past the ack wait, say) holding the batch, with its
        # first recipient in flight
        holder = await db.connect(settings.database_url)
        await holder.execute(
            "SELECT pg_advisory_lock(hashtextextended('crier-batch:' || $1::uuid || ':' || $2::int || ':' || $3::int, 0))",
            job.broadcast_id, job.run, job.seq)
        await con.execute("UPDATE batches SET status = 'sending' WHERE broadcast_id = $1", job.broadcast_id)
        await con.execute(
            """INSERT INTO messages (broadcast_id, run, contact_id, channel, batch_seq, address, status, attempts)
               VALUES ($1, 1, $2, 'email', 0, $3, 'sending', 1)""", job.broadcast_id, first.contact_id, first.address)
        # When the job is delivered again
        # Then this delivery waits: it sends nobody and leaves the one in flight alone
        with pytest.raises(BatchBusy):
            await processor.process(job)
        assert smtp_peer.received == [] and (await ledger_of(con, job))[first.contact_id] == ("sending", None)
        # And once the first attempt has written its outcome and is gone, the next delivery sends the rest
        await con.execute("UPDATE messages SET status = 'sent' WHERE broadcast_id = $1", job.broadcast_id)
        await holder.close()
        assert await processor.process(job) is True
        assert sorted(r.rcpt_tos[0] for r in smtp_peer.received) == sorted(r.address for r in recipients[1:])
        assert {status for status, _ in (await ledger_of(con, job)).values()} == {"sent"}


async def test_a_broadcast_on_another_channel_goes_to_each_contacts_address_on_it(settings):
    # Given five contacts of whom three have a phone, and an sms broadcast through a null provider
    settings = msgspec.structs.replace(settings, run_background=False)
    async with planning(settings) as (js, names, pool), api_for(settings) as api:
        people = [{"external_id": f"s{i}", "email": f"s{i}@example.com",
                   **({"phone": f"+4930555000{i}"} if i != 1 and i != 3 else {})} for i in range(5)]
        ids = (await api.post("/v1/contacts", people))["ids"]
        lst = await api.post("/v1/lists", {"name": "texters"})
        await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
        con = await db.connect(settings.database_url)
        try:
            tenant_id = await con.fetchval("SELECT tenant_id FROM lists WHERE id = $1", uuid.UUID(lst["id"]))
            provider = await accounts.create(con, tenant_id=tenant_id, name="texts", kind="null", config={},
                                             channel="sms", batch_size=2, batch_delay_ms=0)
            actor = handlers.Actor(tenant_id, "test")
            created = await handlers.create(pool, actor, b.CreateBroadcast(
                broadcast_id=uuid.uuid4(), tenant_id=tenant_id, name="sms", channel="sms",
                list_id=uuid.UUID(lst["id"]), provider_id=provider.id, content=b.Content(sms=SmsPart(body="Hi")),
                at=await con.fetchval("SELECT now()")))
            _, queued = await handlers.send(pool, actor, created.id, await con.fetchval("SELECT now()"))
            # When it is planned and its jobs processed
            await planned_and_dispatched(pool, js, names, await plan_of(settings, created.id))
            processor = JobProcessor(pool, JobContextLoader())
            jobs = await published_jobs(js, names)
            recipients = [await recipients_of(con, job) for job in jobs]
            recipients = [r for rs in recipients for r in rs]
            for job in jobs:
                assert await processor.process(job) is True
            rows = await con.fetch("SELECT contact_id, channel, address, status FROM messages ORDER BY contact_id")
            phones = {r["id"]: r["phone"] for r in await con.fetch("SELECT id, phone FROM contacts")}
        finally:
            await con.close()
    # Then the three with a phone got it there, on the sms channel, and the two without were left out
    assert queued == 5  # accepted with the list's size; the snapshot has the exact figure
    assert len(recipients) == 3 and {j.channel for j in jobs} == {"sms"}
    with_phone = sorted(i for i in ids if phones[i])
    assert [(r["contact_id"], r["channel"], r["address"], r["status"]) for r in rows] == [
        (i, "sms", phones[i], "sent") for i in with_phone
    ]


async def test_a_recipient_whose_data_takes_the_template_past_its_limits_fails_with_a_clear_error(settings):
    # Given a broadcast whose HTML writes each contact's `bio` 200 times (saved: with no data it is
    # nothing), to one contact with a short bio and one with 8 KiB (1.6 MB written)
    settings = msgspec.structs.replace(settings, run_background=False)
    async with planning(settings) as (js, names, pool), api_for(settings) as api:
        people = [{"external_id": "short", "email": "short@example.com", "attributes": {"bio": "hi"}},
                  {"external_id": "long", "email": "long@example.com", "attributes": {"bio": "b" * 8192}}]
        ids = (await api.post("/v1/contacts", people))["ids"]
        lst = await api.post("/v1/lists", {"name": "bios"})
        await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
        provider = await api.post("/v1/providers", {"name": "null", "channel": "email", "kind": "null",
                                                    "from_email": "news@example.com", "batch_size": 10,
                                                    "batch_delay_ms": 0, "max_retries": 0})
        created = await api.post("/v1/broadcasts", {
            "name": "bios", "list_id": lst["id"], "provider_id": provider["id"],
            "content": {"subject": "Hi", "html": "{% for i in (1..200) %}<p>{{ bio }}</p>{% endfor %}", "text": "Hi"}})
        await api.post(f"/v1/broadcasts/{created['id']}/send", expect=202)
        # When a worker processes the job
        await planned_and_dispatched(pool, js, names, await plan_of(settings, uuid.UUID(created["id"])))
        [job] = await published_jobs(js, names)
        assert await JobProcessor(pool, JobContextLoader()).process(job) is True
        con = await db.connect(settings.database_url)
        try:
            ledger = await ledger_of(con, job)
        finally:
            await con.close()
    # Then the short bio is sent, and the long one fails on its own, saying why
    short, long = ids
    assert ledger[short] == ("sent", None)
    assert ledger[long] == ("failed", "template: content.html: output over 1 MiB (the limit per message) on line 1")
