"""End to end on the real stack: REST → events → relay → planner → workers → SMTP peer → ledger → counters."""
from __future__ import annotations

import os
import signal
import uuid
from collections import Counter

import asyncpg
import msgspec

from sender_service.worker import UNKNOWN_OUTCOME
from shared.broadcasts.counters import ENGAGEMENT
from tests.smtp_peer import SmtpPeer
from tests.stack import Api, api_for, sender_in_process, sender_process

NO_ENGAGEMENT = dict.fromkeys(ENGAGEMENT, 0)  # nothing opened, clicked, received back


def contacts(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "external_id": f"c{i}",
            "email": f"person{i}@example.com",
            "attributes": {"first_name": f"Ann<{i}>", "plan": "pro" if i % 2 else "free"},
        }
        for i in range(start, start + n)
    ]


async def audience(api: Api, n: int) -> str:
    ids: list[int] = []
    for start in range(0, n, 10_000):
        result = await api.post("/v1/contacts", contacts(min(10_000, n - start), start))
        ids += result["ids"]
    lst = await api.post("/v1/lists", {"name": "everyone"})
    for start in range(0, len(ids), 50_000):
        await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids[start : start + 50_000]})
    return lst["id"]


async def smtp_broadcast(api: Api, peer: SmtpPeer, list_id: str, **provider: object) -> str:
    p = await api.post(
        "/v1/providers",
        {"name": "peer", "channel": "email", "kind": "smtp", "host": peer.host, "port": peer.port,
         "starttls": False, "from_email": "news@example.com", "batch_size": 100, "batch_delay_ms": 0,
         "max_retries": 2, **provider},
    )
    b = await api.post(
        "/v1/broadcasts",
        {"name": "November news", "list_id": list_id, "provider_id": p["id"],
         "content": {"subject": "Hi {{ first_name }}", "html": "<p>Hello {{ first_name }}, plan {{ plan }}</p>",
                     "text": "Hello {{ first_name }}, plan {{ plan }}"}},
    )
    return b["id"]


async def ledger(settings, broadcast_id: str) -> Counter:
    con = await asyncpg.connect(settings.database_url)
    rows = await con.fetch("SELECT status FROM messages WHERE broadcast_id = $1", uuid.UUID(broadcast_id))
    await con.close()
    return Counter(r["status"] for r in rows)


async def test_a_broadcast_reaches_every_address_exactly_once_with_its_own_variables(settings):
    n = 2000
    with SmtpPeer() as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            list_id = await audience(api, n)
            broadcast_id = await smtp_broadcast(api, peer, list_id)
            accepted = await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            assert accepted == {"status": "queued", "queued": n, "run": 1}
            done = await api.wait_for_status(broadcast_id, {"completed", "partially_failed", "failed"}, timeout=120)
            messages = await api.all_messages(broadcast_id)
            history = [e["type"] for e in (await api.get(f"/v1/broadcasts/{broadcast_id}/events"))["items"]]

    assert done["status"] == "completed"
    assert done["counters"] == {"total": n, "queued": 0, "sent": n, "failed": 0, "unknown": 0, "suppressed": 0, "dropped": 0, "skipped": 0, **NO_ENGAGEMENT}
    per_address = Counter(a for r in peer.received for a in r.rcpt_tos)
    assert len(per_address) == n and set(per_address.values()) == {1}
    for r in peer.received[:50]:  # each got its own variables, escaped in HTML only
        i = int(r.rcpt_tos[0].removeprefix("person").split("@")[0])
        assert r.subject == f"Hi Ann<{i}>"
        assert f"Hello Ann&lt;{i}&gt;, plan {'pro' if i % 2 else 'free'}" in r.html
        assert f"Hello Ann<{i}>, plan" in r.text
    assert len(messages) == n and {m["status"] for m in messages} == {"sent"}
    assert await ledger(settings, broadcast_id) == Counter(sent=n)
    # every message carries its own one-click unsubscribe link, though the content never names it
    links = {r.headers["list-unsubscribe"] for r in peer.received}
    assert len(links) == n and all(link.startswith("<http://") and "/u/" in link for link in links)
    assert {r.headers["list-unsubscribe-post"] for r in peer.received} == {"List-Unsubscribe=One-Click"}
    assert history == ["BroadcastCreated", "BroadcastStarted", "AudienceSnapshotted", "BroadcastCompleted"]


async def test_a_run_completes_when_only_a_sender_runs_the_background_tasks(settings):
    # Given an API replica that runs no relay, projector or scheduler, and one sender that may
    api_settings = msgspec.structs.replace(settings, run_background=False)
    with SmtpPeer() as peer:
        async with api_for(api_settings) as api, sender_in_process(settings):
            broadcast_id = await smtp_broadcast(api, peer, await audience(api, 30))
            # When a broadcast is sent
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            done = await api.wait_for_status(broadcast_id, {"completed", "partially_failed", "failed"}, timeout=60)
            history = (await api.get(f"/v1/broadcasts/{broadcast_id}/events"))["items"]
    # Then the sender's relay fed its planner, and its projector counted and finished the run
    assert done["status"] == "completed" and done["counters"]["sent"] == 30 and len(peer.received) == 30
    assert [(e["type"], e["actor"]) for e in history][-1] == ("BroadcastCompleted", "projector:run-completion")


async def test_failing_recipients_are_retried_then_failed_and_the_broadcast_partially_fails(settings):
    flaky, dead = "person3@example.com", {"person5@example.com", "person7@example.com"}
    with SmtpPeer(fail_permanently=dead, fail_transiently={flaky: 1, "person9@example.com": 10}) as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            list_id = await audience(api, 20)
            broadcast_id = await smtp_broadcast(api, peer, list_id, max_retries=2)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            done = await api.wait_for_status(broadcast_id, {"completed", "partially_failed", "failed"})
            failed = (await api.get(f"/v1/broadcasts/{broadcast_id}/messages", params={"status": "failed"}))["items"]
            sent = (await api.get(f"/v1/broadcasts/{broadcast_id}/messages", params={"status": "sent"}))["items"]

    assert done["status"] == "partially_failed"
    assert done["counters"] == {"total": 20, "queued": 0, "sent": 17, "failed": 3, "unknown": 0, "suppressed": 0, "dropped": 0, "skipped": 0, **NO_ENGAGEMENT}
    assert {m["address"] for m in failed} == dead | {"person9@example.com"}
    by_address = {m["address"]: m for m in failed + sent}
    assert by_address[flaky]["status"] == "sent" and by_address[flaky]["attempts"] == 2
    assert by_address["person9@example.com"]["attempts"] == 3  # first try + max_retries
    assert all(by_address[a]["attempts"] == 1 and "550" in by_address[a]["error"] for a in dead)
    assert peer.attempts("person9@example.com") == 3
    assert len(peer.received_by(flaky)) == 1


async def test_a_recipient_whose_template_fails_is_failed_and_the_rest_of_its_batch_sent(settings):
    # Given 30 contacts of whom 3 have a value the template cannot divide by, sent through the
    # deduping null provider (its outcomes are written in bulk when the batch is done)
    async with api_for(settings) as api, sender_in_process(settings):
        people = [{"external_id": f"d{i}", "email": f"d{i}@example.com", "attributes": {"per": 0 if i % 10 == 3 else 2}}
                  for i in range(30)]
        ids = (await api.post("/v1/contacts", people))["ids"]
        lst = await api.post("/v1/lists", {"name": "dividers"})
        await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
        provider = await api.post(
            "/v1/providers",
            {"name": "null", "channel": "email", "kind": "null", "from_email": "news@example.com", "batch_size": 8,
             "batch_delay_ms": 0},
        )
        b = await api.post(
            "/v1/broadcasts",
            {"name": "shares", "list_id": lst["id"], "provider_id": provider["id"],
             "content": {"subject": "Your share", "html": "<p>{{ 10 | divided_by: per }}</p>", "text": "share"}},
        )
        # When it is sent
        await api.post(f"/v1/broadcasts/{b['id']}/send", expect=202)
        done = await api.wait_for_status(b["id"], {"completed", "partially_failed", "failed"})
        messages = await api.all_messages(b["id"])

    # Then those 3 failed with the template's reason, the rest of their batches were sent
    assert done["status"] == "partially_failed"
    assert done["counters"] == {"total": 30, "queued": 0, "sent": 27, "failed": 3, "unknown": 0, "suppressed": 0, "dropped": 0, "skipped": 0, **NO_ENGAGEMENT}
    failed = sorted(m["address"] for m in messages if m["status"] == "failed")
    assert failed == ["d13@example.com", "d23@example.com", "d3@example.com"]
    for m in messages:
        assert m["attempts"] == 1
        if m["status"] == "failed":
            assert m["error"].startswith("template: content.html: divided_by") and m["sent_at"] is None
        else:
            assert m["status"] == "sent" and m["error"] is None and m["sent_at"] is not None


async def test_a_worker_killed_mid_job_sends_nobody_twice_and_misses_nobody(settings):
    n = 400
    settings = msgspec.structs.replace(settings, job_ack_wait_s=3.0)
    with SmtpPeer(delay=0.005) as peer:
        async with api_for(settings) as api:
            list_id = await audience(api, n)
            broadcast_id = await smtp_broadcast(api, peer, list_id, batch_size=50)
            victim = sender_process(settings, CRIER_JOB_ACK_WAIT_S="3")
            try:
                await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
                await peer.wait_for(120, timeout=60)
                os.kill(victim.pid, signal.SIGKILL)  # in the middle of its jobs
                victim.wait()
                killed_at = len(peer.received)
                assert killed_at < n, "the victim finished before it was killed: make the peer slower"
                async with sender_in_process(settings):
                    done = await api.wait_for_status(broadcast_id, {"completed", "partially_failed", "failed"}, 120)
                    messages = await api.all_messages(broadcast_id)
            finally:
                if victim.poll() is None:
                    victim.kill()

    per_address = Counter(a for r in peer.received for a in r.rcpt_tos)
    assert max(per_address.values()) == 1, "somebody received the broadcast twice"
    unknown = {m["address"] for m in messages if m["status"] == "unknown"}
    assert all(m["error"] == UNKNOWN_OUTCOME for m in messages if m["status"] == "unknown")
    assert not any(m["status"] == "failed" for m in messages)
    # At most the recipients in flight when the worker died (one per concurrent job) are ambiguous,
    # and only those whose message was written to its end; everyone else received exactly one copy.
    assert len(unknown) <= 4
    assert set(per_address) | unknown == {f"person{i}@example.com" for i in range(n)}
    sent = {m["address"] for m in messages if m["status"] == "sent"}
    # An unknown one may have arrived (the kill fell between the end of its data and the ledger write).
    assert sent <= set(per_address) and set(per_address) - sent <= unknown
    assert done["counters"]["sent"] == len(sent) and done["counters"].get("unknown", 0) == len(unknown)
    assert done["counters"]["total"] == n and done["counters"]["queued"] == 0
    assert done["status"] == ("completed" if not unknown else "partially_failed")


async def test_bad_broadcast_input_is_a_422_naming_the_field_and_writes_nothing(settings):
    async with api_for(settings) as api:
        list_id = await audience(api, 2)
        provider = await api.post("/v1/providers", {"name": "n", "channel": "email", "kind": "null",
                                                    "from_email": "a@example.com"})
        good = {"name": "x", "list_id": list_id, "provider_id": provider["id"], "content": {"subject": "Hi"}}
        cases = [
            ({**good, "list_id": str(uuid.uuid4())}, "list_id"),
            ({**good, "provider_id": str(uuid.uuid4())}, "provider_id"),
            ({**good, "content": {"subject": ""}}, "content.subject"),
            ({**good, "content": {"subject": "Hi", "from_email": "not-an-address"}}, "content.from_email"),
            ({**good, "content": {"subject": "Hi", "html": "<p>{{ first_name </p>"}}, "content.html"),
            ({**good, "colour": "red"}, "colour"),
        ]
        for body, field in cases:
            problem = await api.post("/v1/broadcasts", body, expect=422)
            assert field in [e["field"] for e in problem["errors"]], (field, problem)
        assert (await api.get("/v1/broadcasts"))["total"] == 0
        draft = await api.post("/v1/broadcasts", {"name": "no list", "content": {"subject": "Hi"}})
        problem = await api.post(f"/v1/broadcasts/{draft['id']}/send", expect=422)
        assert problem["errors"][0]["field"] == "list_id"
        assert (await api.get(f"/v1/broadcasts/{draft['id']}"))["status"] == "draft"
