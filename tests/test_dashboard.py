"""GET /v1/dashboard on the real stack (API over loopback HTTP, Postgres, NATS, a sender through
`null` providers writing the ledger, opens and clicks through /o/ and /r/): the broadcasts whose
latest run started in [from, to), their counters summed, per channel and one by one; each
tenant's own only; and a 422 naming the field for a window that cannot be read. The figures of a
real tracked send: tests/test_tracking_e2e.py."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx

from api_service.app import create_app
from shared.broadcasts.counters import ENGAGEMENT
from shared.platform import db, signing
from shared.platform.settings import Settings
from shared.tenants import store as tenants
from shared.tracking.stats import CHANNEL_FIGURES
from tests.stack import Api, sender_in_process, served
from tests.tenant_env import tenant_env

ENDED = {"completed", "partially_failed", "failed"}
NOTHING = {"total": 0, "queued": 0, "sent": 0, "failed": 0, "unknown": 0, "suppressed": 0, "dropped": 0,
           "skipped": 0, **dict.fromkeys(ENGAGEMENT, 0)}


@dataclass
class Tenants:
    one: Api  # tenant one's writer
    reader: Api  # tenant one's read token
    two: Api  # tenant two's writer
    anyone: httpx.AsyncClient  # no token: a mail client, a browser
    database_url: str

    async def links(self, broadcast_id: str, channel: str) -> signing.TrackingLinks:
        """Signed links of the broadcast's run 1 on `channel`, as its messages carry them."""
        con = await db.connect(self.database_url)
        try:
            key = await con.fetchval("SELECT key FROM tracking_keys WHERE broadcast_id = $1 AND run = 1 AND channel = $2",
                                     uuid.UUID(broadcast_id), channel)
            assert key is not None, (broadcast_id, channel)
            return (await signing.load_signer(con)).tracking_links(key)
        finally:
            await con.close()


@asynccontextmanager
async def two_tenants(settings: Settings) -> AsyncIterator[Tenants]:
    con = await db.connect(settings.database_url)
    try:
        one, two = await tenants.create_tenant(con, "one"), await tenants.create_tenant(con, "two")
        tokens = [(await tenants.create_token(con, tenant.id, scope)).token
                  for tenant, scope in ((one, "write"), (one, "read"), (two, "write"))]
    finally:
        await con.close()
    async with served(create_app(settings)) as base_url, httpx.AsyncClient(base_url=base_url, timeout=60) as client, \
            httpx.AsyncClient(base_url=base_url, timeout=60) as anyone:
        yield Tenants(*(Api(client, token) for token in tokens), anyone, settings.database_url)


async def audience(api: Api, people: list[dict[str, Any]]) -> tuple[str, list[int]]:
    """A list of these new contacts: its id, and theirs."""
    ids = (await api.post("/v1/contacts", people))["ids"]
    members = await api.post("/v1/lists", {"name": f"l{uuid.uuid4().hex[:6]}"})
    await api.post(f"/v1/lists/{members['id']}/members", {"contact_ids": ids})
    return members["id"], ids


async def null_provider(api: Api, channel: str) -> str:
    return (await api.post("/v1/providers", {"name": channel, "channel": channel, "kind": "null",
                                             "from_email": "news@example.com", "batch_delay_ms": 0}))["id"]


async def sent(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """The broadcast made, sent and completed (its view, with started_at)."""
    made = await api.post("/v1/broadcasts", body)
    await api.post(f"/v1/broadcasts/{made['id']}/send", expect=202)
    done = await api.wait_for_status(made["id"], ENDED)
    assert done["status"] == "completed", done
    return done


def summed(*counters: dict[str, int]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for figures in counters:
        total.update(figures)
    return {name: total[name] for name in NOTHING}


async def test_the_windows_broadcasts_summed_per_channel_and_one_by_one_each_tenant_its_own(settings):
    async with two_tenants(settings) as t:
        people = [{"external_id": f"p{i}", "email": f"p{i}@example.com", "phone": f"+4915100000{i:03d}"}
                  for i in range(3)] + [{"external_id": "mail-only", "email": "m@example.com"}]
        everyone, contact_ids = await audience(t.one, people)
        ids = dict(zip((p["external_id"] for p in people), contact_ids))
        mail, texts = await null_provider(t.one, "email"), await null_provider(t.one, "sms")
        html = '<p><a href="https://shop.example.com/a">Shop</a></p>'
        # Given an email broadcast, then one on email and sms (the mail-only contact skipped on sms),
        # a broadcast sent and deleted, one never sent, and tenant two's
        async with sender_in_process(settings):
            news = await sent(t.one, {"name": "news", "list_id": everyone, "provider_id": mail, "track_opens": True,
                                      "track_clicks": True, "content": {"subject": "Hi", "html": html}})
            both = await sent(t.one, {
                "name": "both", "list_id": everyone, "channels": ["email", "sms"], "channel_policy": "all",
                "providers": {"email": mail, "sms": texts}, "track_opens": True, "track_clicks": True,
                "track_text_links": True,
                "content": {"subject": "Hi", "html": html, "sms": {"body": "Sale: https://shop.example.com/b"}}})
            gone = await sent(t.one, {"name": "gone", "list_id": everyone, "provider_id": mail,
                                      "content": {"subject": "Hi", "text": "Hello"}})
            await t.one.call("DELETE", f"/v1/broadcasts/{gone['id']}")
            await t.one.post("/v1/broadcasts", {"name": "draft", "list_id": everyone, "provider_id": mail,
                                                "content": {"subject": "Hi", "text": "Hello"}})
            theirs = await sent(t.two, {"name": "theirs", "list_id": (await audience(t.two, people[:1]))[0],
                                        "provider_id": await null_provider(t.two, "email"),
                                        "content": {"subject": "Hi", "text": "Hello"}})
        # and opens and clicks on each channel
        news_mail, both_mail, both_sms = (await t.links(news["id"], "email"), await t.links(both["id"], "email"),
                                          await t.links(both["id"], "sms"))
        hits = [f"/o/{news_mail.open(ids['p0'])}", f"/o/{news_mail.open(ids['p0'])}", f"/o/{news_mail.open(ids['p1'])}",
                f"/r/{news_mail.click(ids['p0'], 1)}", f"/r/{news_mail.click(ids['p0'], 1)}",
                f"/o/{both_mail.open(ids['mail-only'])}",
                f"/r/{both_sms.click(ids['p1'], 1)}", f"/r/{both_sms.click(ids['p2'], 1)}",
                f"/r/{both_sms.click(ids['p2'], 1)}"]
        assert [(await t.anyone.get(path)).status_code for path in hits] == [200] * 3 + [302] * 2 + [200] + [302] * 3

        # When each reads its dashboard (the last 30 days)
        board = await t.one.get("/v1/dashboard")
        read = await t.reader.get("/v1/dashboard")
        theirs_board = await t.two.get("/v1/dashboard")
        latest_only = await t.one.get("/v1/dashboard", params={"limit": 1})
        no_token = await t.anyone.get("/v1/dashboard")
        shown = {b["id"]: (await t.one.get(f"/v1/broadcasts/{b['id']}"))["counters"] for b in (news, both)}
        both_stats = await t.one.get(f"/v1/broadcasts/{both['id']}/stats")

    # Then tenant one's holds its two sent broadcasts, the latest first, each with its counters
    assert board["broadcasts"] == 2 and board["limit"] == 100
    assert [(i["name"], i["channels"], i["status"]) for i in board["items"]] == [
        ("both", ["email", "sms"], "completed"), ("news", ["email"], "completed")]
    for item, made in zip(board["items"], (both, news)):
        assert (item["id"], item["started_at"], item["sent_at"]) == (made["id"], made["started_at"], made["sent_at"])
        assert item["counters"] == shown[made["id"]]
    # summed: 4 emails, then 4 emails and 3 texts (the mail-only contact skipped on sms)
    assert board["totals"] == summed(*shown.values())
    assert (board["totals"]["sent"], board["totals"]["total"], board["totals"]["skipped"]) == (11, 11, 1)
    # per channel: the broadcasts on it, and what was opened and clicked there
    figures = {c["channel"]: c for c in board["channels"]}
    assert list(figures) == ["email", "sms"]
    assert figures["email"] == {"channel": "email", "broadcasts": 2, **dict.fromkeys(CHANNEL_FIGURES, 0),
                                "opened": 3, "opens": 4, "clicked": 1, "clicks": 2}
    assert figures["sms"] == {"channel": "sms", "broadcasts": 1, **dict.fromkeys(CHANNEL_FIGURES, 0),
                              "clicked": 2, "clicks": 3}
    assert {f: sum(c[f] for c in board["channels"]) for f in CHANNEL_FIGURES} == {
        f: board["totals"][f] for f in CHANNEL_FIGURES}
    # and the two-channel broadcast's own stats split its sends and clicks by channel
    assert [(c["channel"], c["sent"], c["failed"], c["opened"], c["clicked"], c["clicks"])
            for c in both_stats["channels"]] == [("email", 4, 0, 1, 0, 0), ("sms", 3, 0, 0, 2, 3)]
    # The window as applied: now, and 30 days before
    to = datetime.fromisoformat(board["to"])
    assert datetime.fromisoformat(board["from"]) == to - timedelta(days=30)
    assert abs(datetime.now(timezone.utc) - to) < timedelta(minutes=1)
    # A read token reads the same; `limit` shortens the list, never the totals
    assert {k: v for k, v in read.items() if k not in ("from", "to")} == {
        k: v for k, v in board.items() if k not in ("from", "to")}
    assert [i["name"] for i in latest_only["items"]] == ["both"]
    assert (latest_only["broadcasts"], latest_only["totals"], latest_only["channels"]) == (
        2, board["totals"], board["channels"])
    # Tenant two's holds its own only; no token, no dashboard
    assert [i["id"] for i in theirs_board["items"]] == [theirs["id"]] and theirs_board["broadcasts"] == 1
    assert theirs_board["totals"]["sent"] == 1 and [c["channel"] for c in theirs_board["channels"]] == ["email"]
    assert no_token.status_code == 401


async def test_a_broadcast_is_in_the_window_its_latest_run_started_in(settings):
    async with two_tenants(settings) as t:
        everyone, _ = await audience(t.one, [{"email": f"w{i}@example.com"} for i in range(2)])
        mail = await null_provider(t.one, "email")
        async with sender_in_process(settings):
            first = await sent(t.one, {"name": "first", "list_id": everyone, "provider_id": mail,
                                       "content": {"subject": "Hi", "text": "Hello"}})
            second = await sent(t.one, {"name": "second", "list_id": everyone, "provider_id": mail,
                                        "content": {"subject": "Hi", "text": "Hello"}})
        assert first["started_at"] < second["started_at"]

        async def names(**window: str) -> list[str]:
            board = await t.one.get("/v1/dashboard", params=window)
            assert board["broadcasts"] == len(board["items"])
            assert board["totals"] == summed(*(i["counters"] for i in board["items"]))
            return [i["name"] for i in board["items"]]

        # `from` is in the window, `to` is not
        assert await names(**{"from": first["started_at"], "to": second["started_at"]}) == ["first"]
        assert await names(**{"from": second["started_at"]}) == ["second"]
        assert await names(**{"from": first["started_at"]}) == ["second", "first"]
        assert await names(to=first["started_at"]) == []
        empty = await t.one.get("/v1/dashboard", params={"to": first["started_at"]})
        assert (empty["totals"], empty["channels"]) == (NOTHING, [])
        # A window of another time: before these broadcasts, or long after
        assert await names(**{"from": "2026-01-01", "to": "2026-02-01"}) == []
        assert await names(**{"from": "2999-01-01T00:00:00Z", "to": "2999-12-31T00:00:00Z"}) == []

        # With no sender running, one broadcast started stays queued and another is cancelled: the
        # totals count their unsent messages as each shows them, queued or dropped
        waiting, called_off = [await t.one.post("/v1/broadcasts", {
            "name": name, "list_id": everyone, "provider_id": mail, "content": {"subject": "Hi", "text": "Hello"}})
            for name in ("waiting", "called off")]
        for made in (waiting, called_off):
            await t.one.post(f"/v1/broadcasts/{made['id']}/send", expect=202)
        await t.one.post(f"/v1/broadcasts/{called_off['id']}/cancel")
        deadline = time.monotonic() + 30
        while ((await t.one.get(f"/v1/broadcasts/{waiting['id']}"))["counters"]["queued"] != 2
               or (await t.one.get(f"/v1/broadcasts/{called_off['id']}"))["counters"]["dropped"] != 2):
            assert time.monotonic() < deadline, "the runs' totals were never counted"
            await asyncio.sleep(0.05)
        assert await names() == ["called off", "waiting", "second", "first"]
        board = await t.one.get("/v1/dashboard")
        assert [i["status"] for i in board["items"]] == ["cancelled", "queued", "completed", "completed"]
        assert {k: board["totals"][k] for k in ("total", "queued", "sent", "dropped")} == {
            "total": 8, "queued": 2, "sent": 4, "dropped": 2}


async def test_a_window_that_cannot_be_read_is_a_422_naming_its_field(settings):
    async with tenant_env(settings) as env:
        async def fields(**params: Any) -> list[str]:
            return await env.reader.fields("GET", "/v1/dashboard", params=params)

        assert await fields(**{"from": "yesterday"}) == ["from"]
        assert await fields(to="2026-13-01T00:00:00Z") == ["to"]
        assert await fields(**{"from": "2026-01-01T00:00:00Z" + " " * 60}) == ["from"]  # over 64 characters
        assert await fields(**{"from": "0001-01-01T00:00:00+05:00"}) == ["from"]  # before the year 1 in UTC
        assert await fields(**{"from": "2026-06-01T00:00:00Z", "to": "2026-06-01T00:00:00Z"}) == ["to"]  # empty
        assert await fields(**{"from": "2026-06-02", "to": "2026-06-01"}) == ["to"]
        assert await fields(**{"from": "2999-01-01T00:00:00Z"}) == ["from"]  # after now, `to` left out
        assert await fields(**{"from": "2025-01-01", "to": "2026-01-03"}) == ["from"]  # over 366 days
        assert await fields(**{"from": "2020-01-01"}) == ["from"]  # over 366 days before now
        assert await fields(limit=0) == ["limit"] and await fields(limit=501) == ["limit"]
        problem = await env.reader.problem("GET", "/v1/dashboard", 422, params={"to": "soon"})
        assert problem["code"] == "validation_error" and "to" in problem["detail"]

        # Accepted: a year of 366 days, dates, a time without offset (UTC), lower-case RFC 3339, offsets
        async def window(**params: str) -> tuple[str, str]:
            board = await env.reader.call("GET", "/v1/dashboard", 200, params=params)
            assert (board["broadcasts"], board["items"], board["totals"]) == (0, [], NOTHING)
            return board["from"], board["to"]

        assert await window(**{"from": "2024-01-01", "to": "2025-01-01"}) == ("2024-01-01T00:00:00Z",
                                                                              "2025-01-01T00:00:00Z")
        assert await window(**{"from": "2026-06-01T10:00:00", "to": "2026-06-02t00:00:00z"}) == (
            "2026-06-01T10:00:00Z", "2026-06-02T00:00:00Z")
        assert await window(**{"from": "2026-06-01T12:00:00+02:00", "to": "2026-06-01T12:00:00-02:00"}) == (
            "2026-06-01T10:00:00Z", "2026-06-01T14:00:00Z")
        assert await window(to="2026-06-01T00:00:00Z") == ("2026-05-02T00:00:00Z", "2026-06-01T00:00:00Z")
        assert await window(to="0001-01-02T00:00:00Z") == ("0001-01-01T00:00:00Z", "0001-01-02T00:00:00Z")
