"""The lifecycle on the real stack (API, relay, planner, workers, SMTP peer): pause/resume, cancel,
stop, top-up, reset, preview, test sends, idempotency keys and live progress, with exact counts."""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import msgspec
import nats

from api_service import idempotency
from api_service.app import MAX_BODY, create_app
from api_service.idempotency import fingerprint_of
from shared.broadcasts.counters import ENGAGEMENT
from shared.platform import db
from shared.platform.bus import Names
from shared.tenants import store as tenants
from tests.smtp_peer import SmtpPeer
from tests.stack import Api, api_for, sender_in_process, served
from tests.test_send_e2e import audience, smtp_broadcast

NO_ENGAGEMENT = dict.fromkeys(ENGAGEMENT, 0)  # nothing opened, clicked, received back

FINISHED = {"completed", "partially_failed", "failed", "cancelled"}


async def wait_for(api: Api, broadcast_id: str, predicate, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = await api.get(f"/v1/broadcasts/{broadcast_id}")
        if predicate(got):
            return got
        assert time.monotonic() < deadline, f"gave up waiting: {got}"
        await asyncio.sleep(0.05)


async def settled(api: Api, broadcast_id: str) -> dict:
    """The broadcast once no batch is in flight: nothing claimed but unfinished in the ledger, and
    the counters equal to the ledger, twice in a row."""
    previous = None
    while True:
        got = await api.get(f"/v1/broadcasts/{broadcast_id}")
        ledger = {
            status: (await api.get(f"/v1/broadcasts/{broadcast_id}/messages", params={"status": status, "limit": 1}))[
                "total"]
            for status in ("sending", "sent", "failed")
        }
        c = got["counters"]
        quiet = ledger["sending"] == 0 and (ledger["sent"], ledger["failed"]) == (c["sent"], c["failed"])
        if quiet and got == previous:
            return got
        previous = got if quiet else None
        await asyncio.sleep(0.5)


def once_each(peer: SmtpPeer) -> Counter:
    per_address = Counter(a for r in peer.received for a in r.rcpt_tos)
    assert set(per_address.values()) <= {1}, [a for a, n in per_address.items() if n > 1][:5]
    return per_address


async def test_pause_keeps_unsent_messages_and_resume_sends_each_exactly_once(settings):
    n = 2000
    with SmtpPeer(delay=0.003) as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            list_id = await audience(api, n)
            broadcast_id = await smtp_broadcast(api, peer, list_id, batch_size=50)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            await wait_for(api, broadcast_id, lambda b: b["status"] == "sending" and b["counters"]["sent"] >= 200)

            paused = await api.post(f"/v1/broadcasts/{broadcast_id}/pause")
            assert paused["status"] == "paused"
            again = await api.post(f"/v1/broadcasts/{broadcast_id}/pause")  # idempotent
            assert again["status"] == "paused"
            during = await settled(api, broadcast_id)
            assert during["status"] == "paused"
            assert 0 < during["counters"]["sent"] < n and during["counters"]["queued"] == n - during["counters"]["sent"]
            assert len(peer.received) == during["counters"]["sent"]  # nothing goes out while paused

            resumed = await api.post(f"/v1/broadcasts/{broadcast_id}/resume")
            assert resumed["status"] == "sending"
            done = await api.wait_for_status(broadcast_id, FINISHED, timeout=120)

    assert done["status"] == "completed"
    assert done["counters"] == {"total": n, "queued": 0, "sent": n, "failed": 0, "unknown": 0, "suppressed": 0, "dropped": 0, "skipped": 0, **NO_ENGAGEMENT}
    assert len(once_each(peer)) == n


async def test_a_resume_right_after_a_pause_leaves_the_batch_in_flight_to_its_worker(settings):
    # Given a send whose batches take a while (20 recipients at 50 ms each: a second a batch)
    n = 100
    with SmtpPeer(delay=0.05) as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            list_id = await audience(api, n)
            broadcast_id = await smtp_broadcast(api, peer, list_id, batch_size=20)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            await wait_for(api, broadcast_id, lambda b: b["status"] == "sending" and len(peer.received) >= 3)

            # When it is paused and resumed at once, while a batch is half sent
            await api.post(f"/v1/broadcasts/{broadcast_id}/pause")
            await api.post(f"/v1/broadcasts/{broadcast_id}/resume")
            done = await api.wait_for_status(broadcast_id, FINISHED, timeout=120)
            failed = await api.get(f"/v1/broadcasts/{broadcast_id}/messages", params={"status": "failed"})

    # Then nobody was failed as "unknown" by a second attempt of that batch, nor sent twice
    assert done["status"] == "completed", (done["counters"], [(m["contact_id"], m["attempts"], m["error"]) for m in failed["items"]])
    assert done["counters"] == {"total": n, "queued": 0, "sent": n, "failed": 0, "unknown": 0, "suppressed": 0, "dropped": 0, "skipped": 0, **NO_ENGAGEMENT}
    assert len(once_each(peer)) == n


async def test_cancel_drops_unsent_messages_and_a_top_up_reaches_only_the_rest(settings):
    n = 1500
    with SmtpPeer(delay=0.003) as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            list_id = await audience(api, n)
            broadcast_id = await smtp_broadcast(api, peer, list_id, batch_size=50)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            await wait_for(api, broadcast_id, lambda b: b["counters"]["sent"] >= 100)

            cancelled = await api.post(f"/v1/broadcasts/{broadcast_id}/cancel")
            assert cancelled["status"] == "cancelled"
            after = await settled(api, broadcast_id)
            reached = once_each(peer)
            c = after["counters"]
            assert after["status"] == "cancelled"
            assert c["sent"] == len(reached) < n and c["queued"] == 0 and c["dropped"] == n - c["sent"]
            assert after["remaining"] == n - c["sent"] and after["audience_total"] == n
            dropped = await api.get(f"/v1/broadcasts/{broadcast_id}/messages", params={"status": "dropped"})
            assert dropped["total"] == c["dropped"]

            # A top-up sends to exactly those the cancelled run did not reach.
            top_up = await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            assert top_up["queued"] == n - c["sent"] and top_up["run"] == 2
            done = await api.wait_for_status(broadcast_id, FINISHED - {"cancelled"}, timeout=120)
            nobody_left = await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            final = await api.get(f"/v1/broadcasts/{broadcast_id}")

    assert done["status"] == "completed"
    assert len(once_each(peer)) == n  # everyone exactly once over the two runs
    assert nobody_left == {"status": "completed", "queued": 0, "run": 2}
    assert final["status"] == "completed" and final["remaining"] == 0


async def test_a_top_up_right_after_a_cancel_reaches_nobody_twice(settings):
    # Given a send whose batches take a while (20 recipients at 50 ms each: a second a batch)
    n = 300
    with SmtpPeer(delay=0.05) as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            list_id = await audience(api, n)
            broadcast_id = await smtp_broadcast(api, peer, list_id, batch_size=20)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            await wait_for(api, broadcast_id, lambda b: b["counters"]["sent"] >= 30)

            # When it is cancelled while batches are in flight, and topped up at once
            await api.post(f"/v1/broadcasts/{broadcast_id}/cancel")
            top_up = await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            peer.configure(delay=0.0)
            done = await api.wait_for_status(broadcast_id, {"completed"}, timeout=120)
            final = await settled(api, broadcast_id)
            nobody_left = await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)

    # Then everyone got exactly one message over the two runs
    assert top_up["run"] == 2 and done["run"] == 2
    assert len(once_each(peer)) == n
    assert final["remaining"] == 0 and nobody_left["queued"] == 0


async def test_stop_returns_to_draft_and_reset_clears_the_reached_set(settings):
    n = 300
    with SmtpPeer() as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            list_id = await audience(api, n)
            broadcast_id = await smtp_broadcast(api, peer, list_id, batch_size=50)
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            await api.wait_for_status(broadcast_id, {"completed"}, timeout=60)
            refused = await api.call("POST", f"/v1/broadcasts/{broadcast_id}/stop", expect=409)
            assert refused["status"] == 409 and refused["current_status"] == "completed"

            reset = await api.post(f"/v1/broadcasts/{broadcast_id}/reset")
            assert reset["status"] == "draft" and reset["remaining"] is None or reset["status"] == "draft"
            assert (await api.get(f"/v1/broadcasts/{broadcast_id}"))["remaining"] == n
            again = await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            assert again["queued"] == n and again["run"] == 2
            stopped = await api.post(f"/v1/broadcasts/{broadcast_id}/stop")
            assert stopped["status"] == "draft"
            await settled(api, broadcast_id)
            history = [e["type"] for e in (await api.get(f"/v1/broadcasts/{broadcast_id}/events"))["items"]]

    received = Counter(a for r in peer.received for a in r.rcpt_tos)
    assert len(received) == n and set(received.values()) <= {1, 2}  # run 2 was stopped part-way, or not
    assert history[:6] == ["BroadcastCreated", "BroadcastStarted", "AudienceSnapshotted", "BroadcastCompleted",
                           "BroadcastReset", "BroadcastStarted"]
    assert "BroadcastStopped" in history


async def test_preview_resolves_messages_and_a_test_send_is_not_counted(settings):
    with SmtpPeer() as peer:
        async with api_for(settings) as api:
            list_id = await audience(api, 20)
            broadcast_id = await smtp_broadcast(api, peer, list_id)
            preview = await api.get(f"/v1/broadcasts/{broadcast_id}/preview", params={"limit": 3})
            too_many = await api.call("GET", f"/v1/broadcasts/{broadcast_id}/preview", params={"limit": 11},
                                      expect=422)
            sent = await api.post(f"/v1/broadcasts/{broadcast_id}/test",
                                  {"emails": ["me@example.com"], "contact_ids": [preview["items"][0]["contact_id"]]})
            bad = await api.call("POST", f"/v1/broadcasts/{broadcast_id}/test", json={"emails": ["nope"]}, expect=422)
            got = await api.get(f"/v1/broadcasts/{broadcast_id}")
            history = [e["type"] for e in (await api.get(f"/v1/broadcasts/{broadcast_id}/events"))["items"]]

    items = preview["items"]
    assert len(items) == 3 and [i["contact_id"] for i in items] == sorted(i["contact_id"] for i in items)
    for item in items:  # each resolved with its own variables, escaped in HTML only
        n = int(item["address"].removeprefix("person").split("@")[0])
        assert item["subject"] == f"Hi Ann<{n}>" and item["channel"] == "email"
        assert f"Hello Ann&lt;{n}&gt;, plan {'pro' if n % 2 else 'free'}" in item["html"]
    assert too_many["errors"][0]["field"] == "limit"
    first = items[0]["address"]
    assert sorted(r["address"] for r in sent["results"]) == sorted(["me@example.com", first])
    assert all(r["ok"] for r in sent["results"])
    assert sorted(a for r in peer.received for a in r.rcpt_tos) == sorted(["me@example.com", first])
    assert all(r.subject.startswith("[Test] ") for r in peer.received)
    assert bad["errors"][0]["field"] == "emails[0]"
    assert got["status"] == "draft" and got["counters"]["total"] == 0 and got["run"] == 0
    assert history == ["BroadcastCreated", "TestSent"]


async def test_an_idempotency_key_returns_the_same_result_and_does_nothing_twice(settings):
    async with api_for(settings) as api:
        key = {"Idempotency-Key": "create-1"}
        body = {"name": "only once", "content": {"subject": "Hi"}}
        first = await api.client.post("/v1/broadcasts", json=body, headers={**api.headers, **key})
        second = await api.client.post("/v1/broadcasts", json=body, headers={**api.headers, **key})
        other = await api.client.post("/v1/broadcasts", json={**body, "name": "else"}, headers={**api.headers, **key})
        listed = await api.get("/v1/broadcasts")

    assert first.status_code == second.status_code == 201
    assert first.json() == second.json() and second.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422 and other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert listed["total"] == 1


async def test_an_idempotency_key_in_flight_is_a_409_until_abandoned_and_expires_after_a_day(settings, monkeypatch):
    async with api_for(settings) as api:
        con = await db.connect(settings.database_url)
        try:
            tenant_id, token_id = await con.fetchrow("SELECT tenant_id, id FROM api_tokens")
            body = msgspec.json.encode({"name": "keyed", "content": {"subject": "Hi"}})

            async def create(key: str) -> Any:
                return await api.client.post("/v1/broadcasts", content=body, headers={
                    **api.headers, "Idempotency-Key": key, "Content-Type": "application/json"})

            async def first_request(key: str, started_ago: timedelta, answered: bool) -> None:
                await con.execute(
                    """INSERT INTO idempotency_keys (tenant_id, token_id, key, fingerprint, status_code, body, created_at)
                       VALUES ($1, $2, $3, $4, $5, $6, now() - $7::interval)""",
                    tenant_id, token_id, key, fingerprint_of("/v1/broadcasts", body), 201 if answered else None,
                    b"{}" if answered else None, started_ago)

            # Given first requests: one still running, one whose replica died 10 minutes ago, one
            # answered two days ago
            await first_request("running", timedelta(seconds=1), answered=False)
            await first_request("abandoned", timedelta(minutes=10), answered=False)
            await first_request("old", timedelta(days=2), answered=True)

            running, abandoned, old = await create("running"), await create("abandoned"), await create("old")
            # And expired keys are deleted now and then as new ones come
            await first_request("forgotten", timedelta(days=3), answered=True)
            monkeypatch.setattr(idempotency, "PURGE_CHANCE", 1.0)
            await create("new")
            kept = {r["key"] for r in await con.fetch("SELECT key FROM idempotency_keys")}
        finally:
            await con.close()

    assert running.status_code == 409 and running.json()["errors"][0]["field"] == "Idempotency-Key"
    assert abandoned.status_code == 201 and "idempotent-replayed" not in abandoned.headers
    assert old.status_code == 201 and "idempotent-replayed" not in old.headers
    assert kept == {"running", "abandoned", "old", "new"}


async def test_an_idempotency_key_is_per_token_and_a_refusal_is_not_kept(settings):
    async with api_for(settings) as api:
        con = await db.connect(settings.database_url)
        try:
            tenant_id = await con.fetchval("SELECT id FROM tenants")
            reader = {"Authorization": f"Bearer {(await tenants.create_token(con, tenant_id, 'read')).token}"}
            body = {"name": "keyed", "content": {"subject": "Hi"}}

            async def create(headers: dict[str, str], key: str) -> Any:
                return await api.client.post("/v1/broadcasts", json=body, headers={**headers, "Idempotency-Key": key})

            # A write token's answer is not replayed to a read token using its key
            written = await create(api.headers, "shared-1")
            read_after = await create(reader, "shared-1")
            # Nor is a read token's refusal replayed to a write token using its key
            read_first = await create(reader, "shared-2")
            written_after = await create(api.headers, "shared-2")
            retried = await create(api.headers, "shared-2")
            kept = sorted((r["key"], r["status_code"]) for r in await con.fetch("SELECT * FROM idempotency_keys"))
        finally:
            await con.close()

    assert written.status_code == 201
    assert read_after.status_code == read_first.status_code == 403
    assert "idempotent-replayed" not in read_after.headers and "idempotent-replayed" not in read_first.headers
    assert written_after.status_code == 201 and "idempotent-replayed" not in written_after.headers
    assert retried.headers["idempotent-replayed"] == "true" and retried.json() == written_after.json()
    assert kept == [("shared-1", 201), ("shared-2", 201)]  # the refusals left nothing


async def test_a_keyed_post_is_answered_without_reading_a_body_it_refuses(settings):
    mib = b" " * 2**20
    con = await db.connect(settings.database_url)
    try:
        tenant = await tenants.create_tenant(con, "big bodies")
        writer = (await tenants.create_token(con, tenant.id, "write")).token
        reader = (await tenants.create_token(con, tenant.id, "read")).token
    finally:
        await con.close()
    app = create_app(settings)

    async def post(token: str, mib_chunks: int, content_length: int | None = None) -> tuple[int, dict, int, float]:
        """POST a body of `mib_chunks` MiB, streamed (chunked unless a Content-Length is declared)
        straight into the app; returns the status, the problem, the chunks read and the time taken."""
        read = 0

        async def receive() -> dict:
            nonlocal read
            read += 1
            if read > mib_chunks:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": mib, "more_body": read < mib_chunks}

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        headers = [(b"host", b"test"), (b"authorization", f"Bearer {token}".encode()),
                   (b"idempotency-key", b"big-1"), (b"content-type", b"application/json")]
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/broadcasts", "raw_path": b"/v1/broadcasts", "query_string": b"",
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 4000), "server": ("test", 80),
                 "state": {}, "extensions": {}}
        started = time.monotonic()
        await app(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], msgspec.json.decode(body), read, time.monotonic() - started

    async with served(app):  # its lifespan in this event loop; requests go straight into it below
        # A read token's keyed POST of 100 MiB: refused by its scope, not one chunk read
        refused = await post(reader, 100)
        # A write token's, declaring 100 MiB: refused by its Content-Length, not one chunk read
        declared = await post(writer, 100, content_length=100 * 2**20)
        # A write token's, streamed without a length: read only until past the cap
        streamed = await post(writer, 100)
        con = await db.connect(settings.database_url)
        try:
            kept = await con.fetchval("SELECT count(*) FROM idempotency_keys")
        finally:
            await con.close()

    assert refused[:3] == (403, refused[1], 0) and refused[1]["code"] == "forbidden"
    assert declared[:3] == (413, declared[1], 0) and declared[1]["code"] == "payload_too_large"
    assert streamed[0] == 413 and streamed[1]["code"] == "payload_too_large"
    assert streamed[2] == MAX_BODY // 2**20 + 1  # the chunk that passed the cap, and no further
    assert max(refused[3], declared[3]) < 1.0
    assert kept == 0


@asynccontextmanager
async def nats_progress(settings, broadcast_id: str) -> AsyncIterator[list[dict]]:
    """What an outside subscriber receives on the broadcast's NATS progress subject, as it comes."""
    nc = await nats.connect(settings.nats_url)
    published: list[dict] = []

    async def on_progress(msg) -> None:
        published.append(msgspec.json.decode(msg.data))

    try:
        await nc.subscribe(Names(settings.nats_prefix).progress_subject("*", broadcast_id), cb=on_progress)
        await nc.flush()
        yield published
    finally:
        await nc.close()


async def last_published(published: list[dict], status: str) -> dict:
    """The NATS feed's last update once it has `status` (it trails the SSE stream by up to a tick)."""
    deadline = time.monotonic() + 10
    while (not published or published[-1]["status"] != status) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert published, "nothing published"
    return published[-1]


async def sse(api: Api, broadcast_id: str) -> AsyncIterator[tuple[str, dict]]:
    """The progress stream's (event, data) pairs until the server ends it."""
    async with api.client.stream("GET", f"/v1/broadcasts/{broadcast_id}/progress", headers=api.headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = ""
        async for line in stream.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                yield event, msgspec.json.decode(line.split(":", 1)[1].strip())


async def test_progress_streams_counters_until_the_broadcast_finishes(settings):
    n = 400
    with SmtpPeer(delay=0.001) as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            list_id = await audience(api, n)
            broadcast_id = await smtp_broadcast(api, peer, list_id, batch_size=50)
            async with nats_progress(settings, broadcast_id) as published:
                await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
                updates = [update async for update in sse(api, broadcast_id)]
                last_on_nats = await last_published(published, "completed")

    assert updates[-1][0] == "finished" and updates[-1][1]["status"] == "completed"
    assert updates[-1][1]["counters"]["sent"] == n
    sent = [u["counters"]["sent"] for _, u in updates]
    assert sent == sorted(sent)  # counters only grow
    assert all(e == "progress" for e, _ in updates[:-1])
    # The same snapshots on NATS, ending with the finished one
    assert last_on_nats == updates[-1][1]
    assert [p["counters"]["sent"] for p in published] == sorted(p["counters"]["sent"] for p in published)


async def test_progress_ends_when_a_run_is_stopped(settings):
    with SmtpPeer(delay=0.01) as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            list_id = await audience(api, 600)
            broadcast_id = await smtp_broadcast(api, peer, list_id, batch_size=20)
            async with nats_progress(settings, broadcast_id) as published:
                events, statuses = [], []
                # Given a client following a draft's progress
                async for event, data in sse(api, broadcast_id):
                    events.append(event)
                    statuses.append(data["status"])
                    if statuses == ["draft"]:
                        # When the broadcast is sent, and stopped while it sends
                        await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
                    elif data["status"] == "sending":
                        await api.post(f"/v1/broadcasts/{broadcast_id}/stop")
                last_on_nats = await last_published(published, "draft")

    # Then the stream followed the run and ended with it, back in draft; so did the NATS feed
    assert events[0] == "progress" and events[-1] == "finished" and set(events[1:-1]) <= {"progress"}
    assert "sending" in statuses and statuses[-1] == "draft"
    assert last_on_nats["status"] == "draft" and last_on_nats["counters"]["dropped"] > 0


async def test_audience_figures_follow_membership_changes(settings):
    async with api_for(settings) as api:
        list_id = await audience(api, 5)
        broadcast = await api.post("/v1/broadcasts", {"name": "a", "list_id": list_id, "content": {"subject": "Hi"}})
        path = f"/v1/broadcasts/{broadcast['id']}"

        first, again = await api.get(path), await api.get(path)  # counted, then kept
        extra = await api.post("/v1/contacts", [{"external_id": "x1", "email": "x1@example.com"},
                                                {"external_id": "x2"}])  # x2 has no address
        await api.post(f"/v1/lists/{list_id}/members", {"contact_ids": extra["ids"]})
        grown = await api.get(path)
        await api.call("DELETE", f"/v1/lists/{list_id}/members", json={"external_ids": ["c0", "c1"]})
        shrunk = await api.get(path)

    assert (first["audience_total"], first["remaining"]) == (again["audience_total"], again["remaining"]) == (5, 5)
    assert (grown["audience_total"], grown["remaining"]) == (6, 6)
    assert (shrunk["audience_total"], shrunk["remaining"]) == (4, 4)
