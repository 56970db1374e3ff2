"""Broadcast audiences on the real stack: lists, segments, excludes and ad-hoc recipients; the
preflight counts; suppressions honoured at the snapshot and when a batch is sent; the one-click
unsubscribe a message carries."""
from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from urllib.parse import urlsplit

import asyncpg

from sender_service.planner import Planner
from shared.platform import signing
from tests.smtp_peer import SmtpPeer
from tests.stack import Api, api_for, sender_in_process
from tests.test_planner import Crash, DyingHeartbeat, no_heartbeat, plan_of, planning

PRO = {"field": "attributes.plan", "op": "eq", "value": "pro"}


async def people(api: Api, n: int) -> list[int]:
    """Contacts p0..p{n-1}: odd ones on the pro plan; every fifth has no email (a phone instead)."""
    items = [
        {"external_id": f"p{i}", "attributes": {"plan": "pro" if i % 2 else "free", "first_name": f"P{i}"},
         **({"phone": f"+4930123{i:04d}"} if i % 5 == 0 else {"email": f"p{i}@example.com"})}
        for i in range(n)
    ]
    return (await api.post("/v1/contacts", items))["ids"]


async def a_list(api: Api, name: str, ids: list[int]) -> str:
    created = await api.post("/v1/lists", {"name": name})
    await api.post(f"/v1/lists/{created['id']}/members", {"contact_ids": ids})
    return created["id"]


async def smtp_provider(api: Api, peer: SmtpPeer, **extra: object) -> str:
    created = await api.post("/v1/providers", {
        "name": "peer", "channel": "email", "kind": "smtp", "host": peer.host, "port": peer.port, "starttls": False,
        "from_email": "news@example.com", "batch_size": 5, "batch_delay_ms": 0, **extra})
    return created["id"]


async def broadcast(api: Api, provider_id: str, audience: dict, **extra: object) -> dict:
    return await api.post("/v1/broadcasts", {
        "name": "Audience", "provider_id": provider_id, "audience": audience,
        "content": {"subject": "Hi {{ first_name }}", "text": "Hello. Unsubscribe: {{ unsubscribe_url }}"}, **extra})


def addresses(peer: SmtpPeer) -> Counter:
    return Counter(a for r in peer.received for a in r.rcpt_tos)


async def test_a_segment_minus_an_excluded_list_plus_recipients_reaches_exactly_that_set(settings):
    with SmtpPeer() as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            # Given 40 people, a segment of the pro ones, a list of some to leave out, and three ad hoc
            ids = await people(api, 40)
            segment = await api.post("/v1/segments", {"name": "pro", "rules": PRO})
            excluded = await a_list(api, "left out", [ids[i] for i in (1, 3, 4, 21)])
            provider = await smtp_provider(api, peer)
            created = await broadcast(api, provider, {
                "segments": [segment["id"]], "exclude_lists": [excluded],
                "recipients": ["p2", ids[6], {"email": "New.Person@Example.COM"}, {"email": "p8@EXAMPLE.com"}]})
            # When the preflight is read and the broadcast is sent
            preflight = await api.get(f"/v1/broadcasts/{created['id']}/audience")
            preview = (await api.get(f"/v1/broadcasts/{created['id']}/preview", params={"limit": 2}))["items"]
            accepted = await api.post(f"/v1/broadcasts/{created['id']}/send", expect=202)
            done = await api.wait_for_status(created["id"], {"completed", "partially_failed", "failed"})

    # Then exactly the pro ones with an email, less the excluded, plus the ad-hoc ones, got it once
    pro_with_email = {i for i in range(40) if i % 2 and i % 5}
    expected = {f"p{i}@example.com" for i in pro_with_email - {1, 3, 21}} | {
        "p2@example.com", "p6@example.com", "New.Person@example.com", "p8@example.com"}
    assert addresses(peer) == Counter({a: 1 for a in expected})
    # the preflight said so beforehand, and why the others would not get it
    pro_without_email = {i for i in range(40) if i % 2 and not i % 5}  # 5, 15, 25, 35
    assert preflight == {"channel": "email", "included": 20 + 4, "excluded": 3, "suppressed": 0, "reached": 0,
                         "no_address": len(pro_without_email), "reach": len(expected)}
    assert accepted["queued"] == len(expected)
    assert done["status"] == "completed" and done["counters"]["sent"] == len(expected)
    # the preview shows each message as it will go, with the recipient's own unsubscribe link
    sent_text = {r.rcpt_tos[0]: r.text for r in peer.received}
    by_id = sorted((ids[int(a[1:].split("@")[0])], a) for a in expected if a.startswith("p"))
    assert [p["address"] for p in preview] == [a for _, a in by_id[:2]]  # in the planner's order
    assert all("/u/" in p["text"] and p["text"] == sent_text[p["address"]].rstrip("\n") for p in preview)
    assert done["audience"]["segments"] == [segment["id"]] and done["audience"]["exclude_lists"] == [excluded]
    assert done["list_id"] is None and len(done["audience"]["recipients"]) == 4


async def test_an_address_recipient_is_the_contact_with_that_address_or_a_new_one(settings):
    async with api_for(settings) as api:
        ids = await people(api, 3)
        created = await api.post("/v1/broadcasts", {
            "name": "x", "content": {"subject": "s", "text": "t"},
            "audience": {"recipients": [{"email": "P1@Example.com"}, {"email": "fresh@example.com"},
                                        {"phone": "+49 30 1230000"}]}})
        fresh = await api.get("/v1/contacts", params={"email": "fresh@example.com"})
    assert created["audience"]["recipients"][0] == ids[1]
    assert created["audience"]["recipients"][2] == ids[0]  # p0 has that phone
    assert fresh["total"] == 1 and created["audience"]["recipients"][1] == fresh["items"][0]["id"]


async def test_an_audience_names_only_the_tenants_own_lists_segments_and_contacts(settings):
    async with api_for(settings) as api:
        ids = await people(api, 2)
        mine = await a_list(api, "mine", ids)
        body = {"name": "x", "content": {"subject": "s", "text": "t"}}

        async def refused(audience: dict, field: str) -> None:
            problem = await api.call("POST", "/v1/broadcasts", expect=422, json={**body, "audience": audience})
            assert [e["field"] for e in problem["errors"]] == [field], problem

        await refused({"lists": [mine, str(uuid.uuid4())]}, "audience.lists[1]")
        await refused({"lists": [mine], "exclude_segments": [str(uuid.uuid4())]}, "audience.exclude_segments[0]")
        await refused({"recipients": [ids[0], "nobody"]}, "audience.recipients[1]")
        await refused({"recipients": [2**40]}, "audience.recipients[0]")
        await refused({"recipients": [{"email": "not an address"}]}, "audience.recipients[0].email")
        await refused({"recipients": [{"phone": "030 1234567"}]}, "audience.recipients[0].phone")
        await refused({"recipients": [{}]}, "audience.recipients[0]")
        problem = await api.call("POST", "/v1/broadcasts", expect=422,
                                 json={**body, "list_id": mine, "audience": {"lists": [mine]}})
        assert problem["errors"][0]["field"] == "list_id"
        # nothing half-written: no broadcast, no contact made for an address of a refused request
        await refused({"recipients": [{"email": "half@example.com"}, "nobody"]}, "audience.recipients[1]")
        assert (await api.get("/v1/contacts", params={"email": "half@example.com"}))["total"] == 0
        assert (await api.get("/v1/broadcasts"))["total"] == 0


async def test_a_list_id_broadcast_shows_its_audience_and_can_switch_to_one(settings):
    async with api_for(settings) as api:
        ids = await people(api, 4)
        one, two = await a_list(api, "one", ids[:2]), await a_list(api, "two", ids[1:])
        created = await api.post("/v1/broadcasts", {"name": "x", "list_id": one, "content": {"subject": "s", "text": "t"}})
        assert created["audience"]["lists"] == [one] and created["list_id"] == one
        edited = await api.call("PATCH", f"/v1/broadcasts/{created['id']}", json={"audience": {"lists": [one, two]}})
        assert edited["list_id"] is None and edited["audience"]["lists"] == [one, two]
        shown = await api.get(f"/v1/broadcasts/{created['id']}")
        preflight = await api.get(f"/v1/broadcasts/{created['id']}/audience")
    # Each contact once: p1 is in both lists; p0 has no email
    assert preflight == {"channel": "email", "included": 4, "excluded": 0, "suppressed": 0, "reached": 0,
                         "no_address": 1, "reach": 3}
    assert shown["audience_total"] == 3 and shown["remaining"] == 3


async def test_a_suppressed_contact_is_left_out_of_the_snapshot_and_counted_by_the_preflight(settings):
    with SmtpPeer() as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            ids = await people(api, 10)
            everyone = await a_list(api, "everyone", ids)
            await api.post("/v1/suppressions", [
                {"contact_id": ids[1], "channel": "email", "reason": "unsubscribed"},
                {"address": "P2@example.com", "channel": "all", "reason": "bounced"},
                {"contact_id": ids[3], "channel": "sms", "reason": "manual"},  # another channel
            ])
            created = await broadcast(api, await smtp_provider(api, peer), {"lists": [everyone]})
            preflight = await api.get(f"/v1/broadcasts/{created['id']}/audience")
            accepted = await api.post(f"/v1/broadcasts/{created['id']}/send", expect=202)
            done = await api.wait_for_status(created["id"], {"completed", "partially_failed", "failed"})
    reached = {f"p{i}@example.com" for i in (3, 4, 6, 7, 8, 9)}
    assert addresses(peer) == Counter({a: 1 for a in reached})
    assert preflight == {"channel": "email", "included": 10, "excluded": 0, "suppressed": 2, "reached": 0,
                         "no_address": 2, "reach": 6}
    assert accepted["queued"] == 10  # one list: accepted with its member count; the snapshot has the figure
    assert done["status"] == "completed" and done["counters"]["total"] == 6 and done["counters"]["sent"] == 6


async def test_an_unsubscribe_mid_send_stops_that_person_and_the_ledger_says_suppressed(settings):
    with SmtpPeer() as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            ids = await people(api, 12)
            everyone = await a_list(api, "everyone", ids)
            # one message a batch, 0.3 s apart: the send is under way long enough to act on it
            provider = await smtp_provider(api, peer, batch_size=1, batch_delay_ms=300)
            created = await broadcast(api, provider, {"lists": [everyone]})
            tenant_id = uuid.UUID((await api.get(f"/v1/broadcasts/{created['id']}/events"))["items"][0]["data"]["tenant_id"])
            await api.post(f"/v1/broadcasts/{created['id']}/send", expect=202)
            while not peer.received:  # Given the first message arrived
                await asyncio.sleep(0.05)
            first = peer.received[0]
            # When the last recipient follows the one-click link of their (signed) unsubscribe URL
            con = await asyncpg.connect(settings.database_url)
            signer = await signing.load_signer(con)
            await con.close()
            code = signer.unsubscribe_code(tenant_id, uuid.UUID(created["id"]), ids[11], "email")
            page = await api.client.get(f"/u/{code}")
            clicked = await api.client.post(f"/u/{code}", content=b"List-Unsubscribe=One-Click",
                                             headers={"Content-Type": "application/x-www-form-urlencoded"})
            done = await api.wait_for_status(created["id"], {"completed", "partially_failed", "failed"}, timeout=60)
            suppressed = (await api.get(f"/v1/broadcasts/{created['id']}/messages",
                                        params={"status": "suppressed"}))["items"]
            # and the first recipient's own link, from the message's header, works as RFC 8058 says
            own = first.headers["list-unsubscribe"]
            one_click = await api.client.post(urlsplit(own.strip("<>")).path, content=b"List-Unsubscribe=One-Click",
                                              headers={"Content-Type": "application/x-www-form-urlencoded"})
            listed = (await api.get("/v1/suppressions", params={"reason": "unsubscribed"}))["items"]

    # Then they got nothing after the batch in flight, and the ledger and counters say why
    assert page.status_code == 200 and "<form" in page.text
    assert clicked.status_code == 200 and "location" not in clicked.headers
    assert "p11@example.com" not in addresses(peer)
    assert [m["contact_id"] for m in suppressed] == [ids[11]]
    assert done["status"] == "completed" and done["counters"]["suppressed"] == 1
    assert done["counters"]["sent"] == len(peer.received) == 8  # 9 with an email, less the one unsubscribed
    # The message's header and its text carry the same per-recipient link
    assert first.headers["list-unsubscribe-post"] == "List-Unsubscribe=One-Click"
    assert own == f"<{first.text.rsplit('Unsubscribe: ', 1)[1].strip()}>"
    assert one_click.status_code == 200 and "location" not in one_click.headers
    first_contact = ids[int(first.rcpt_tos[0].removeprefix("p").split("@")[0])]
    assert {s["contact_id"] for s in listed} == {ids[11], first_contact}


async def test_a_snapshot_of_many_chunks_takes_each_member_of_any_audience_once(settings):
    """25,000 contacts: more than two of the planner's 10,000-candidate chunks, in each way it
    walks an audience (lists merged; the tenant's contacts for a segment), resumed after a crash."""
    n = 25_000
    async with api_for(settings) as api:
        ids: list[int] = []
        for start in range(0, n, 10_000):
            ids += (await api.post("/v1/contacts", [
                {"external_id": f"m{i}", "email": f"m{i}@example.com", "attributes": {"seven": i % 7 == 0, "i": i}}
                for i in range(start, min(n, start + 10_000))]))["ids"]
        first, second = await a_list(api, "first", ids[:15_000]), await a_list(api, "second", ids[10_000:])
        middle = await a_list(api, "middle", ids[12_000:15_000])
        sevens = await api.post("/v1/segments", {"name": "sevens",
                                                 "rules": {"field": "attributes.seven", "op": "eq", "value": True}})
        high = await api.post("/v1/segments", {"name": "high",
                                               "rules": {"field": "attributes.i", "op": "gte", "value": 20_000}})
        provider = (await api.post("/v1/providers", {
            "name": "null", "channel": "email", "kind": "null", "from_email": "news@example.com",
            "batch_size": 1000, "batch_delay_ms": 0, "max_retries": 0}))["id"]
        audiences = {
            "lists": ({"lists": [first, second], "exclude_segments": [sevens["id"]], "recipients": [ids[3]]},
                      {i for i in range(n) if i % 7} | {3}),
            "segments": ({"segments": [high["id"]], "lists": [first], "exclude_lists": [middle],
                          "recipients": [ids[17_000]]},
                         set(range(12_000)) | set(range(20_000, n)) | {17_000}),
        }
        plans = {}
        for name, (audience, _) in audiences.items():
            created = await broadcast(api, provider, audience)
            await api.post(f"/v1/broadcasts/{created['id']}/send", expect=202)
            plans[name] = await plan_of(settings, uuid.UUID(created["id"]))
    async with planning(settings) as (js, names, pool):
        for name, plan in plans.items():
            try:  # dies after the first chunk, then a planner resumes from the last one committed
                await Planner(pool, js, names).plan(plan, DyingHeartbeat(1))
            except Crash:
                pass
            await Planner(pool, js, names).plan(plan, no_heartbeat)
            async with pool.acquire() as con:
                planned = [cid for r in await con.fetch(
                    "SELECT contact_ids FROM batches WHERE broadcast_id = $1 ORDER BY seq", plan.broadcast_id)
                    for cid in r["contact_ids"]]
            expected = sorted(ids[i] for i in audiences[name][1])
            assert planned == expected, name  # each once, in contact-id order


async def test_a_list_or_segment_a_queued_broadcast_is_snapshotting_cannot_be_deleted(settings):
    async with api_for(settings) as api:  # no sender: the broadcast stays queued, its snapshot pending
        ids = await people(api, 4)
        left_out = await a_list(api, "left out", ids[:1])
        segment = await api.post("/v1/segments", {"name": "pro", "rules": PRO})
        provider = (await api.post("/v1/providers", {
            "name": "null", "channel": "email", "kind": "null", "from_email": "news@example.com"}))["id"]
        created = await broadcast(api, provider, {"segments": [segment["id"]], "exclude_lists": [left_out]})
        await api.post(f"/v1/broadcasts/{created['id']}/send", expect=202)
        segment_refused = await api.call("DELETE", f"/v1/segments/{segment['id']}", expect=409)
        list_refused = await api.call("DELETE", f"/v1/lists/{left_out}", expect=409)
    assert segment_refused["code"] == "segment_in_use" and segment_refused["broadcasts"] == [created["id"]]
    assert list_refused["code"] == "list_in_use" and list_refused["broadcasts"] == [created["id"]]
