"""GET /v1/messages and /v1/messages/{id} on the real stack: the ledger across a tenant's broadcasts
after real sends through the null provider, its filters and cursor pages, its tenant walls, and a
message's content made again for its recipient."""
from __future__ import annotations

import base64
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

from shared.broadcasts import ledger
from shared.platform import db
from shared.tenants import store as tenants
from tests.stack import Api, api_for, sender_in_process

MESSAGES = "/v1/messages"
ENDED = {"completed", "partially_failed", "failed"}
# Ann has an address on both channels; Bob only email (his sms is `skipped`); Cy's `per` makes the
# email's template fail (and his sms is sent); Dee's name is HTML, to be escaped in the HTML part.
PEOPLE = [
    {"external_id": "ann", "email": "ann@example.com", "phone": "+4915100000001",
     "attributes": {"first_name": "Ann", "per": 2}},
    {"external_id": "bob", "email": "bob@example.com", "attributes": {"first_name": "Bob", "per": 5}},
    {"external_id": "cy", "email": "cy@example.com", "phone": "+4915100000003",
     "attributes": {"first_name": "Cy", "per": 0}},
    {"external_id": "dee", "email": "dee@example.com", "attributes": {"first_name": "<b>Dee & Co</b>", "per": 1}},
]
CONTENT = {
    "subject": "Hi {{ first_name }}",
    "html": "<p>Hello {{ first_name }}, your share: {{ 10 | divided_by: per }}</p>",
    "text": "Hello {{ first_name }}",
    "sms": {"body": "Hi {{ first_name }}, from SMS"},
}


async def world(api: Api) -> dict[str, Any]:
    """The contacts in a list, a null provider per channel, and a broadcast on email and sms sent to
    them and finished."""
    ids = (await api.post("/v1/contacts", PEOPLE))["ids"]
    lst = await api.post("/v1/lists", {"name": "everyone"})
    await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
    providers = {c: (await api.post("/v1/providers", {"name": c, "kind": "null", "channel": c,
                                                      "from_email": "news@example.com"}))["id"]
                 for c in ("email", "sms")}
    b = await api.post("/v1/broadcasts", {"name": "both", "list_id": lst["id"], "channels": ["email", "sms"],
                                          "providers": providers, "content": CONTENT})
    await api.post(f"/v1/broadcasts/{b['id']}/send", expect=202)
    await api.wait_for_status(b["id"], ENDED)
    return {"contacts": dict(zip(("ann", "bob", "cy", "dee"), ids)), "list_id": lst["id"], "providers": providers,
            "broadcast_id": b["id"]}


async def another_tenant(api: Api, settings) -> Api:
    con = await db.connect(settings.database_url)
    try:
        tenant = await tenants.create_tenant(con, "other")
        token = (await tenants.create_token(con, tenant.id, "write")).token
    finally:
        await con.close()
    return Api(api.client, token)


async def walk(api: Api, limit: int, **params: Any) -> list[dict[str, Any]]:
    """Every page from the first, following next_cursor."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await api.get(MESSAGES, params={"limit": limit, **params, **({"cursor": cursor} if cursor else {})})
        assert page["limit"] == limit and len(page["items"]) <= limit
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def ledger_key(item: dict[str, Any]) -> tuple:
    return item["broadcast_id"], item["run"], item["contact_id"], item["channel"]


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def newest_first(item: dict[str, Any]) -> tuple:
    return parse(item["recorded_at"]), uuid.UUID(item["broadcast_id"]), item["run"], item["contact_id"], item["channel"]


async def test_the_ledger_across_broadcasts_with_each_filter(settings):
    async with api_for(settings) as api, sender_in_process(settings):
        w = await world(api)
        first = w["broadcast_id"]
        # a second broadcast, email only, to the same people
        second = (await api.post("/v1/broadcasts", {"name": "again", "list_id": w["list_id"],
                                                    "provider_id": w["providers"]["email"],
                                                    "content": {"subject": "Again", "text": "Again {{ first_name }}"}}))["id"]
        await api.post(f"/v1/broadcasts/{second}/send", expect=202)
        await api.wait_for_status(second, ENDED)

        everything = (await api.get(MESSAGES, params={"limit": 500}))
        items = everything["items"]
        assert everything["next_cursor"] is None
        # One per recipient, channel and run: 4 emails + 4 sms rows (2 sent, 2 skipped) + 4 emails again
        assert len(items) == 12 and len({i["id"] for i in items}) == 12
        assert items == sorted(items, key=newest_first, reverse=True)
        assert {i["broadcast_id"] for i in items[:4]} == {second}  # the later send first
        c = w["contacts"]
        by_key = {(i["broadcast_id"], i["contact_id"], i["channel"]): i for i in items}
        ann = by_key[(first, c["ann"], "email")]
        assert ann["status"] == "sent" and ann["address"] == "ann@example.com" and ann["run"] == 1
        assert ann["attempts"] == 1 and ann["error"] is None and ann["sent_at"] is not None
        assert ann["recorded_at"] is not None and ann["delivered_at"] is None and ann["read_at"] is None
        assert (ann["opened_at"], ann["clicked_at"], ann["opens"], ann["clicks"]) == (None, None, 0, 0)
        cy = by_key[(first, c["cy"], "email")]
        assert cy["status"] == "failed" and cy["error"].startswith("template:") and cy["sent_at"] is None
        bob_sms = by_key[(first, c["bob"], "sms")]
        assert bob_sms["status"] == "skipped" and bob_sms["error"] == "no_address" and bob_sms["recorded_at"]

        async def keys(**params: Any) -> set[tuple]:
            return {(i["broadcast_id"], i["contact_id"], i["channel"])
                    for i in (await api.get(MESSAGES, params={"limit": 500, **params}))["items"]}

        assert await keys(broadcast_id=second) == {(second, x, "email") for x in c.values()}
        assert await keys(contact_id=c["ann"]) == {(first, c["ann"], "email"), (first, c["ann"], "sms"),
                                                   (second, c["ann"], "email")}
        assert await keys(channel="sms") == {(first, x, "sms") for x in c.values()}
        assert await keys(status="skipped") == {(first, c["bob"], "sms"), (first, c["dee"], "sms")}
        assert await keys(status="failed") == {(first, c["cy"], "email")}
        assert await keys(status="failed", channel="sms") == set()
        assert await keys(broadcast_id=first, contact_id=c["cy"]) == {(first, c["cy"], "email"), (first, c["cy"], "sms")}
        assert await keys(broadcast_id=str(uuid.uuid4())) == set()
        # since (inclusive) and until (exclusive) on recorded_at
        times = sorted({parse(i["recorded_at"]) for i in items})
        cut = times[len(times) // 2]
        assert await keys(since=cut.isoformat()) == {k for k, i in by_key.items() if parse(i["recorded_at"]) >= cut}
        assert await keys(until=cut.isoformat()) == {k for k, i in by_key.items() if parse(i["recorded_at"]) < cut}
        assert await keys(since=times[0].isoformat(), until=cut.isoformat()) | await keys(since=cut.isoformat()) == set(by_key)
        after = times[-1] + timedelta(microseconds=1)
        assert await keys(since=after.replace(tzinfo=None).isoformat()) == set()  # no offset: UTC
        assert len(await keys(since=times[-1].replace(tzinfo=None).isoformat())) >= 1


async def test_cursor_pages_walk_every_row_exactly_once(settings):
    async with api_for(settings) as api, sender_in_process(settings):
        w = await world(api)
        await api.post(f"/v1/broadcasts/{w['broadcast_id']}/reset")
        await api.post(f"/v1/broadcasts/{w['broadcast_id']}/send", expect=202)
        await api.wait_for_status(w["broadcast_id"], ENDED)
        everything = (await api.get(MESSAGES, params={"limit": 500}))["items"]
        assert len(everything) == 16  # two runs of 8
        for limit in (1, 3, 7, 16):
            walked = await walk(api, limit)
            assert [ledger_key(i) for i in walked] == [ledger_key(i) for i in everything], limit
        # filters hold across pages; a page ends exactly at the last row
        sms = await walk(api, 2, channel="sms")
        assert len(sms) == 8 and {i["channel"] for i in sms} == {"sms"}
        last = await api.get(MESSAGES, params={"limit": 16})
        assert len(last["items"]) == 16 and last["next_cursor"] is None
        # newer messages come first and never shift a walk in progress
        page = await api.get(MESSAGES, params={"limit": 5})
        await api.post(f"/v1/broadcasts/{w['broadcast_id']}/reset")
        await api.post(f"/v1/broadcasts/{w['broadcast_id']}/send", expect=202)
        await api.wait_for_status(w["broadcast_id"], ENDED)
        rest = await walk(api, 4, cursor=page["next_cursor"])
        assert [ledger_key(i) for i in page["items"] + rest] == [ledger_key(i) for i in everything]


async def test_both_ways_of_reading_a_page_agree(settings):
    # A tenant's page is read through its runs (a small ledger, or a broadcast or contact filter) or
    # down the time index (a large one): the same rows in the same order, whichever it is.
    async with api_for(settings) as api, sender_in_process(settings):
        w = await world(api)
        await api.post(f"/v1/broadcasts/{w['broadcast_id']}/reset")
        await api.post(f"/v1/broadcasts/{w['broadcast_id']}/send", expect=202)
        await api.wait_for_status(w["broadcast_id"], ENDED)
        await world(await another_tenant(api, settings))  # rows of another tenant in between
        con = await db.connect(settings.database_url)
        try:
            tenant_id = await con.fetchval("SELECT tenant_id FROM broadcasts WHERE id = $1",
                                           uuid.UUID(w["broadcast_id"]))
            c = w["contacts"]
            for filters in (ledger.Filters(), ledger.Filters(channel="sms"), ledger.Filters(status="sent"),
                            ledger.Filters(contact_id=c["ann"]), ledger.Filters(broadcast_id=uuid.UUID(w["broadcast_id"])),
                            ledger.Filters(contact_id=c["cy"], channel="email")):
                pages = []
                for read in (ledger.run_by_run_sql, ledger.time_walk_sql):
                    rows, position = [], None
                    while True:
                        sql, args = read(tenant_id, filters, position, 3)
                        found = [ledger.LedgerMessage(**dict(r)) for r in await con.fetch(sql, *args)]
                        rows += found[:3]
                        if len(found) <= 3:
                            break
                        position = ledger.parse_cursor(ledger.cursor_after(found[2]))
                    pages.append([m.key for m in rows])
                assert pages[0] == pages[1] and pages[0], filters
        finally:
            await con.close()


async def test_another_tenant_sees_nothing_and_gets_404s(settings):
    async with api_for(settings) as api, sender_in_process(settings):
        w = await world(api)
        other = await another_tenant(api, settings)
        ours = (await api.get(MESSAGES))["items"]
        assert ours
        assert (await other.get(MESSAGES))["items"] == []
        for params in ({"broadcast_id": w["broadcast_id"]}, {"contact_id": w["contacts"]["ann"]},
                       {"channel": "email", "status": "sent"}):
            assert (await other.get(MESSAGES, params=params))["items"] == []
        problem = await other.get(f"{MESSAGES}/{ours[0]['id']}", expect=404)
        assert problem["code"] == "not_found"
        # and their own send does not show up in ours
        await world(other)
        theirs = (await other.get(MESSAGES, params={"limit": 500}))["items"]
        assert len(theirs) == 8
        mine = (await api.get(MESSAGES, params={"limit": 500}))["items"]
        assert {i["id"] for i in mine} == {i["id"] for i in ours} and not {i["id"] for i in theirs} & {i["id"] for i in mine}
        await api.get(f"{MESSAGES}/{theirs[0]['id']}", expect=404)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def test_malformed_ids_are_404_and_bad_parameters_422_naming_them(settings):
    async with api_for(settings) as api:
        valid = ledger.message_id(ledger.MessageKey(uuid.uuid4(), 1, 1, "email"))
        raw = base64.urlsafe_b64decode(valid + "=")
        for bad in ["x", "not-an-id", valid[:-1], valid + "A", valid.replace(valid[5], "!" if valid[5] != "!" else "?"),
                    _b64(b"\x02" + raw[1:]),  # another version
                    _b64(raw[:-1] + b"\xff"),  # no such channel
                    _b64(raw[:17] + b"\x00\x00\x00\x00" + raw[21:]),  # run 0
                    _b64(raw[:21] + b"\xff" * 8 + raw[29:]),  # a contact id past bigint
                    "%00", "a" * 300, valid]:  # the last: well formed, but no such message
            problem = await api.get(f"{MESSAGES}/{bad}", expect=404)
            assert problem["code"] == "not_found", bad
        for params, field in [({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"status": "queued"}, "status"),
                              ({"channel": "fax"}, "channel"), ({"contact_id": 0}, "contact_id"),
                              ({"contact_id": 2**63}, "contact_id"), ({"broadcast_id": "nope"}, "broadcast_id"),
                              ({"since": "yesterday"}, "since"), ({"cursor": "abc"}, "cursor"),
                              ({"cursor": "a*b"}, "cursor"), ({"cursor": valid}, "cursor"),
                              ({"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"}, "until")]:
            problem = await api.get(MESSAGES, params=params, expect=422)
            assert field in [e["field"] for e in problem["errors"]], (params, problem)


async def test_a_message_with_its_content_made_again_for_its_recipient(settings):
    async with api_for(settings) as api, sender_in_process(settings):
        w = await world(api)
        c, first = w["contacts"], w["broadcast_id"]
        items = {(i["contact_id"], i["channel"]): i for i in (await api.get(MESSAGES, params={"limit": 500}))["items"]}

        ann = await api.get(f"{MESSAGES}/{items[(c['ann'], 'email')]['id']}")
        assert {k: ann[k] for k in items[(c["ann"], "email")]} == items[(c["ann"], "email")]
        assert ann["content"]["subject"] == "Hi Ann"
        assert "Hello Ann, your share: 5" in ann["content"]["html"] and ann["content"]["text"] == "Hello Ann"
        assert ann["content"]["from_email"] == "news@example.com"
        assert ann["content_error"] is None and ann["template_version"] == 0
        sms = await api.get(f"{MESSAGES}/{items[(c['ann'], 'sms')]['id']}")
        assert sms["content"] == {"body": "Hi Ann, from SMS"}

        dee = await api.get(f"{MESSAGES}/{items[(c['dee'], 'email')]['id']}")
        assert "Hello &lt;b&gt;Dee &amp; Co&lt;/b&gt;, your share: 10" in dee["content"]["html"]
        assert "<b>Dee" not in dee["content"]["html"]
        assert dee["content"]["text"] == "Hello <b>Dee & Co</b>" and dee["content"]["subject"] == "Hi <b>Dee & Co</b>"

        cy = await api.get(f"{MESSAGES}/{items[(c['cy'], 'email')]['id']}")  # failed: the same error again
        assert cy["content"] is None and cy["content_error"].startswith("not rendered: content.html")
        bob_sms = await api.get(f"{MESSAGES}/{items[(c['bob'], 'sms')]['id']}")
        assert bob_sms["content"] is None and "no address" in bob_sms["content_error"]

        assert ann["data_as_sent"] is True

        # The recipient's data is the contact's as the run used it; the content is the run's, even after an edit
        await api.call("PATCH", f"/v1/contacts/{c['ann']}", json={"attributes": {"first_name": "Annie"}})
        await api.post(f"/v1/broadcasts/{first}/reset")
        await api.patch(f"/v1/broadcasts/{first}", {"content": {"subject": "Run two, {{ first_name }}"}})
        await api.post(f"/v1/broadcasts/{first}/send", expect=202)
        await api.wait_for_status(first, ENDED)
        again = await api.get(f"{MESSAGES}/{ann['id']}")
        assert again["content"]["subject"] == "Hi Ann" and again["data_as_sent"] is True  # run 1's content and data
        run_two = (await api.get(MESSAGES, params={"contact_id": c["ann"], "channel": "email"}))["items"][0]
        assert run_two["run"] == 2
        assert (await api.get(f"{MESSAGES}/{run_two['id']}"))["content"]["subject"] == "Run two, Annie"
        await api.call("PATCH", f"/v1/contacts/{c['ann']}", json={"attributes": {"first_name": "Anna"}})
        assert (await api.get(f"{MESSAGES}/{ann['id']}"))["content"]["subject"] == "Hi Ann"
        assert (await api.get(f"{MESSAGES}/{run_two['id']}"))["content"]["subject"] == "Run two, Annie"

        # An erased contact's message is kept, its content cannot be made again
        await api.call("DELETE", f"/v1/contacts/{c['bob']}")
        bob = await api.get(f"{MESSAGES}/{items[(c['bob'], 'email')]['id']}")
        assert bob["address"] == "[erased]" and bob["content"] is None and "erased" in bob["content_error"]


async def test_a_template_broadcast_renders_its_runs_version_after_the_template_changed(settings):
    async with api_for(settings) as api, sender_in_process(settings):
        ids = (await api.post("/v1/contacts", PEOPLE[:2]))["ids"]
        lst = await api.post("/v1/lists", {"name": "two"})
        await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
        provider = await api.post("/v1/providers", {"name": "n", "kind": "null", "channel": "email",
                                                    "from_email": "news@example.com"})
        template = await api.post("/v1/templates", {"name": "Welcome", "content": {
            "subject": "Welcome {{ first_name }} (v1)", "html": "<p>v1 for {{ first_name }}</p>"}})
        b = await api.post("/v1/broadcasts", {"name": "templated", "list_id": lst["id"],
                                              "provider_id": provider["id"], "template_id": template["id"]})
        await api.post(f"/v1/broadcasts/{b['id']}/send", expect=202)
        await api.wait_for_status(b["id"], {"completed"})
        edited = await api.patch(f"/v1/templates/{template['id']}",
                                 {"content": {"subject": "Welcome {{ first_name }} (v2)"}})
        assert edited["version"] == 2

        item = (await api.get(MESSAGES, params={"contact_id": ids[0]}))["items"][0]
        message = await api.get(f"{MESSAGES}/{item['id']}")
        assert message["template_version"] == 1
        assert message["content"]["subject"] == "Welcome Ann (v1)" and "v1 for Ann" in message["content"]["html"]


@pytest.mark.parametrize("key", [
    ledger.MessageKey(uuid.UUID(int=0), 1, 1, "email"),
    ledger.MessageKey(uuid.UUID(int=2**128 - 1), 2**31 - 1, 2**63 - 1, "webhook"),
])
def test_ids_and_cursors_read_back_what_they_hold(key):
    assert ledger.parse_message_id(ledger.message_id(key)) == key
    assert len(ledger.message_id(key)) == 40
    at = datetime.fromisoformat("2026-12-01T12:34:56.123456+00:00")
    message = ledger.LedgerMessage(
        broadcast_id=key.broadcast_id, run=key.run, contact_id=key.contact_id, channel=key.channel, address="a",
        status="sent", attempts=1, error=None, provider_message_id=None, recorded_at=at, sent_at=None,
        delivered_at=None, read_at=None, opened_at=None, clicked_at=None, opens=0, clicks=0)
    assert ledger.parse_cursor(ledger.cursor_after(message)) == (at, key)
