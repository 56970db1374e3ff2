"""Fair sending: each run keeps a bounded window of jobs in JetStream, pacing is a due time, and no
broadcast waits on another's planning, pacing or queue. The shares as literal tables, then the
whole stack (API, sender with planner, dispatcher and workers, real Postgres, NATS and SMTP)."""
from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta, timezone

from shared.platform import db
from shared.sending.window import RunWindow, Shares, queue_budget, shares
from shared.tenants import store as tenants
from tests.smtp_peer import SmtpPeer
from tests.stack import Api, api_for, sender_in_process
from tests.test_send_e2e import audience, smtp_broadcast

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
A, B = uuid.UUID(int=0xA), uuid.UUID(int=0xB)
R1, R2, R3 = (uuid.UUID(int=1), 1), (uuid.UUID(int=2), 1), (uuid.UUID(int=3), 1)


def run(key, tenant=A, in_flight=0, unpublished=100, **kw) -> RunWindow:
    return RunWindow(key=key, tenant_id=tenant, in_flight=in_flight, unpublished=unpublished, **kw)


# --- the shares, given the runs, the queue's budget and the time -----------------------------------

def test_a_run_gets_what_the_budget_and_its_window_allow():
    table = [
        # (in flight, unpublished, budget, window per run, per tenant) -> batches granted
        ((1, 100, 10, 4, 6), 3),  # its window
        ((4, 100, 10, 4, 6), 0),
        ((0, 2, 10, 4, 6), 2),  # what is left of it
        ((0, 100, 1, 4, 6), 1),  # the queue's budget
        ((0, 100, 10, 8, 6), 6),  # its tenant's window
    ]
    for (in_flight, unpublished, budget, per_run, per_tenant), granted in table:
        got = shares([run(R1, in_flight=in_flight, unpublished=unpublished)], NOW, budget, per_run, per_tenant)
        assert got == Shares(batches={R1: granted} if granted else {}, next_due_at=None), (in_flight, budget)


def test_the_next_jobs_go_to_the_least_loaded_tenant_then_its_least_loaded_run():
    table = [
        # (runs as (key, tenant, in flight), budget) -> granted
        ([(R1, A, 30), (R2, B, 0)], 1, {R2: 1}),  # a newcomer is next in line
        ([(R1, A, 30), (R2, B, 0)], 4, {R2: 4}),
        ([(R1, A, 2), (R2, B, 0)], 4, {R1: 1, R2: 3}),
        ([(R1, A, 0), (R2, A, 0), (R3, B, 0)], 4, {R1: 1, R2: 1, R3: 2}),  # tenants first, then runs
        ([(R1, A, 3), (R2, A, 0), (R3, B, 6)], 3, {R2: 3}),
        ([(R1, A, 6), (R2, B, 6)], 3, {}),  # both tenants at their window of 6
    ]
    for runs, budget, granted in table:
        given = [run(key, tenant=tenant, in_flight=f) for key, tenant, f in runs]
        assert shares(given, NOW, budget, 100, 6).batches == granted, runs


def test_a_paused_run_gets_nothing_and_a_paced_one_a_batch_when_due():
    later = NOW + timedelta(seconds=30)
    table = [
        (run(R1, paused=True), {}, None),
        (run(R1, delay_ms=60_000), {R1: 1}, None),  # never published: due at once
        (run(R1, delay_ms=60_000, next_due_at=NOW), {R1: 1}, None),
        (run(R1, delay_ms=60_000, next_due_at=later), {}, later),
        (run(R1, delay_ms=60_000, in_flight=4), {}, None),  # its window is full even so
        (run(R1, unpublished=0), {}, None),
    ]
    for given, granted, due in table:
        assert shares([given], NOW, 10, 4, 6) == Shares(batches=granted, next_due_at=due), given


def test_the_queue_takes_a_tenth_of_a_second_of_work_and_a_job_for_each_idle_worker():
    table = [
        # (jobs/s workers take, jobs waiting, workers idle) -> new jobs
        ((0.0, 0, 0), 2),  # at least two waiting
        ((0.0, 0, 8), 10),  # and one for every worker asking
        ((260.0, 0, 0), 26),  # 0.1 s of work at 260 jobs a second
        ((260.0, 20, 0), 6),
        ((260.0, 40, 0), 0),
        ((5000.0, 0, 0), 64),  # at most 64
        ((3.0, 2, 0), 0),  # slow jobs: two waiting is enough
    ]
    for (rate, waiting, idle), budget in table:
        assert queue_budget(rate, waiting, idle, backlog_s=0.1) == budget, (rate, waiting, idle)


# --- the whole stack -------------------------------------------------------------------------------

async def second_tenant(settings, api: Api) -> Api:
    """Another tenant on the same installation, through the same API server."""
    con = await db.connect(settings.database_url)
    try:
        tenant = await tenants.create_tenant(con, "other")
        token = (await tenants.create_token(con, tenant.id, "write")).token
    finally:
        await con.close()
    return Api(api.client, token)


async def null_broadcast(api: Api, list_id: str, batch_size: int, batch_delay_ms: int) -> str:
    p = await api.post("/v1/providers", {"name": "null", "channel": "email", "kind": "null",
                                         "from_email": "news@example.com", "batch_size": batch_size,
                                         "batch_delay_ms": batch_delay_ms, "max_retries": 0})
    b = await api.post("/v1/broadcasts", {"name": "n", "list_id": list_id, "provider_id": p["id"],
                                          "content": {"subject": "Hi", "html": "<p>Hi</p>"}})
    return b["id"]


async def sent_within(api: Api, broadcast_id: str, seconds: float) -> tuple[dict, float]:
    started = time.monotonic()
    await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
    done = await api.wait_for_status(broadcast_id, {"completed", "partially_failed", "failed"}, timeout=seconds)
    return done, time.monotonic() - started


async def sent_while(api: Api, small_api: Api, big: str, small: str) -> tuple[dict, int]:
    """Sends `small` and returns its final state with how many of `big` were sent meanwhile.

    Counted in messages rather than seconds: a first-come-first-served queue would make the
    small broadcast wait for most of the big one, however fast or slow this machine is today."""
    before = (await api.get(f"/v1/broadcasts/{big}"))["counters"]["sent"]
    done, _ = await sent_within(small_api, small, seconds=60)
    after = (await api.get(f"/v1/broadcasts/{big}"))["counters"]["sent"]
    return done, after - before


async def test_a_small_broadcast_is_not_held_up_by_a_large_one_paced_at_2000_a_second(settings):
    async with api_for(settings) as a, sender_in_process(settings):
        b = await second_tenant(settings, a)
        # Given tenant A sending to 200,000 through a provider that takes 2,000 a second
        big = await null_broadcast(a, await audience(a, 200_000), batch_size=100, batch_delay_ms=50)
        small = await null_broadcast(b, await audience(b, 20), batch_size=50, batch_delay_ms=0)
        await a.post(f"/v1/broadcasts/{big}/send", expect=202)
        await a.wait_for_status(big, {"sending"}, timeout=60)
        # When tenant B sends to 20 a second later
        await asyncio.sleep(1.0)
        done, big_sent_meanwhile = await sent_while(a, b, big, small)
        # Then B's broadcast completes while A's has sent only a sliver more of its 200,000
        assert done["status"] == "completed" and done["counters"]["sent"] == 20
        assert big_sent_meanwhile < 20_000, f"A sent {big_sent_meanwhile} while B waited"
        assert (await a.get(f"/v1/broadcasts/{big}"))["status"] == "sending"
        await a.post(f"/v1/broadcasts/{big}/cancel")


async def test_a_small_broadcast_is_not_queued_behind_a_large_one_on_a_slow_provider(settings):
    with SmtpPeer() as peer:
        async with api_for(settings) as a, sender_in_process(settings):
            b = await second_tenant(settings, a)
            # Given tenant A sending 20,000 emails in 400 jobs through an SMTP server (a few
            # hundred a second here: had they all been queued, the last would wait a minute)
            big = await smtp_broadcast(a, peer, await audience(a, 20_000), batch_size=50)
            small = await null_broadcast(b, await audience(b, 20), batch_size=50, batch_delay_ms=0)
            await a.post(f"/v1/broadcasts/{big}/send", expect=202)
            await a.wait_for_status(big, {"sending"}, timeout=60)
            await asyncio.sleep(1.0)
            # When tenant B sends to 20
            done, big_sent_meanwhile = await sent_while(a, b, big, small)
            # Then it completes while A's has sent only a sliver more of its 20,000
            assert done["status"] == "completed"
            assert big_sent_meanwhile < 2_000, f"A sent {big_sent_meanwhile} while B waited"
            assert (await a.get(f"/v1/broadcasts/{big}"))["status"] == "sending"
            await a.post(f"/v1/broadcasts/{big}/cancel")


async def test_a_broadcast_paced_at_one_batch_a_minute_delays_no_other_and_stops_at_once(settings):
    async with api_for(settings) as a, sender_in_process(settings):
        b = await second_tenant(settings, a)
        # Given a broadcast to three, one at a time, a minute apart (its first went out at once)
        paced = await null_broadcast(a, await audience(a, 3), batch_size=1, batch_delay_ms=60_000)
        await a.post(f"/v1/broadcasts/{paced}/send", expect=202)
        await _until(lambda: _counter(a, paced, "sent"), 1, timeout=10)
        # When another tenant's broadcast to two is sent, and one of the same tenant
        other, took_other = await sent_within(b, await null_broadcast(b, await audience(b, 2), 50, 0), seconds=30)
        same, took_same = await sent_within(a, await null_broadcast(a, await audience(a, 2), 50, 0), seconds=30)
        # Then both complete well before the paced one's next batch is due
        assert other["status"] == same["status"] == "completed"
        assert took_other + took_same < 30.0, (took_other, took_same)
        assert await _counter(a, paced, "sent") == 1
        # And a pause, then a cancel, take effect at once: its two unsent recipients are dropped
        await a.post(f"/v1/broadcasts/{paced}/pause")
        assert (await a.get(f"/v1/broadcasts/{paced}"))["status"] == "paused"
        await a.post(f"/v1/broadcasts/{paced}/cancel")
        await _until(lambda: _counter(a, paced, "dropped"), 2, timeout=5)
        assert (await a.get(f"/v1/broadcasts/{paced}"))["counters"]["sent"] == 1


async def _counter(api: Api, broadcast_id: str, name: str) -> int:
    messages = await api.all_messages(broadcast_id)
    return sum(m["status"] == name for m in messages)


async def _until(read, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (value := await read()) != expected:
        assert time.monotonic() < deadline, f"still {value}, not {expected}, after {timeout}s"
        await asyncio.sleep(0.05)

