"""The click links and the open pixel on the real stack (API over loopback HTTP, Postgres, NATS, a
sender through the `null` provider writing the ledger): /r/{code} redirects only to stored URLs and
counts each click once committed, /o/{code} answers the GIF and counts people and privacy proxies
apart, any bad code is a 404 with no Location, and the broadcast's counters are the engagement
tables' figures. The codes' own property tests: tests/test_tracking_codes.py."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
from litestar import Litestar

from api_service.app import create_app
from api_service.routes.tracking import PIXEL
from shared.platform import db, signing
from shared.platform.settings import Settings
from shared.tenants import store as tenants
from shared.tracking.recorder import Recorder
from tests.stack import Api, sender_in_process, served

URLS = {1: "https://shop.example.com/sale?utm_source=crier&x=%20y", 2: "https://example.com/über uns",
        3: "https://example.com/three"}
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
GMAIL_UA = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
PERSON_UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"


@dataclass
class Sent:
    """A broadcast sent to `contacts` (the ledger has them), a tracking key of its run with URLS,
    and a way to sign its codes."""

    api: Api
    http: httpx.AsyncClient  # no token: as a person's browser or a mail client
    app: Litestar
    database_url: str
    tenant_id: uuid.UUID
    broadcast_id: uuid.UUID
    contacts: list[int]
    outsider: int  # a contact of the tenant the broadcast never sent to
    key: int
    links: signing.TrackingLinks

    async def sql(self, method: str, query: str, *args: Any) -> Any:
        con = await db.connect(self.database_url)
        try:
            return await getattr(con, method)(query, *args)
        finally:
            await con.close()

    def recorder(self) -> Recorder:
        return self.app.state["crier_tracking"].recorder

    async def engagement(self) -> dict[str, int]:
        row = await self.sql("fetchrow", """
            SELECT coalesce(sum(opened), 0) AS opened, coalesce(sum(opens), 0) AS opens,
                   coalesce(sum(proxy_opened), 0) AS proxy_opened, coalesce(sum(proxy_opens), 0) AS proxy_opens,
                   coalesce(sum(clicked), 0) AS clicked, coalesce(sum(clicks), 0) AS clicks
            FROM engagement_counters WHERE broadcast_id = $1""", self.broadcast_id)
        return dict(row)

    async def per_message(self) -> dict[str, int]:
        """The same figures, counted from message_engagement (what the counters must equal)."""
        row = await self.sql("fetchrow", """
            SELECT count(opened_at) AS opened, coalesce(sum(opens), 0) AS opens,
                   count(proxy_opened_at) AS proxy_opened, coalesce(sum(proxy_opens), 0) AS proxy_opens,
                   count(clicked_at) AS clicked, coalesce(sum(clicks), 0) AS clicks
            FROM message_engagement WHERE broadcast_id = $1""", self.broadcast_id)
        return dict(row)

    async def counters(self) -> dict[str, int]:
        return (await self.api.get(f"/v1/broadcasts/{self.broadcast_id}"))["counters"]


async def tracking_key(con: Any, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, run: int, urls: dict[int, str],
                       channel: str = "email") -> int:
    """A tracking key of the run's content, with its links: what the sender makes as it renders."""
    key = await con.fetchval(
        """INSERT INTO tracking_keys (tenant_id, broadcast_id, run, version, channel)
           VALUES ($1, $2, $3, 1, $4) RETURNING key""", tenant_id, broadcast_id, run, channel)
    await con.executemany("INSERT INTO tracked_links (key, link, url) VALUES ($1, $2, $3)",
                          [(key, link, url) for link, url in urls.items()])
    return key


@asynccontextmanager
async def sent_broadcast(settings: Settings, n: int = 10) -> AsyncIterator[Sent]:
    settings = msgspec.structs.replace(settings, run_background=True)
    con = await db.connect(settings.database_url)
    tenant = await tenants.create_tenant(con, "tracking")
    token = (await tenants.create_token(con, tenant.id, "write")).token
    await con.close()
    app = create_app(settings)
    async with served(app) as base_url, httpx.AsyncClient(base_url=base_url, timeout=60) as client, \
            httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        api = Api(client, token)
        people = [{"external_id": f"p{i}", "email": f"person{i}@example.com"} for i in range(n + 1)]
        ids = (await api.post("/v1/contacts", people))["ids"]
        contacts, outsider = ids[:n], ids[n]
        lst = await api.post("/v1/lists", {"name": "everyone"})
        await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": contacts})
        provider = await api.post("/v1/providers", {"name": "null", "channel": "email", "kind": "null",
                                                    "from_email": "news@example.com", "batch_delay_ms": 0})
        broadcast = await api.post("/v1/broadcasts", {
            "name": "tracked", "list_id": lst["id"], "provider_id": provider["id"],
            "content": {"subject": "Hi", "html": "<p>Hello</p>", "text": "Hello"}})
        async with sender_in_process(settings):
            await api.post(f"/v1/broadcasts/{broadcast['id']}/send", expect=202)
            done = await api.wait_for_status(broadcast["id"], {"completed", "partially_failed", "failed"})
        assert done["status"] == "completed", done
        con = await db.connect(settings.database_url)
        try:
            broadcast_id = uuid.UUID(broadcast["id"])
            assert await con.fetchval("SELECT count(*) FROM messages WHERE broadcast_id = $1 AND status = 'sent'",
                                      broadcast_id) == n
            key = await tracking_key(con, tenant.id, broadcast_id, 1, URLS)
            signer = await signing.load_signer(con)
        finally:
            await con.close()
        yield Sent(api, http, app, settings.database_url, tenant.id, broadcast_id, contacts, outsider, key,
                   signer.tracking_links(key))


def _not_found(r: httpx.Response) -> None:
    assert r.status_code == 404, (r.status_code, r.headers, r.text)
    assert "location" not in r.headers
    assert r.headers["content-type"].startswith("text/plain") and len(r.content) < 100
    assert r.headers["cache-control"] == "no-store"


async def test_a_click_redirects_to_its_stored_url_once_recorded_and_counts_once_per_message(settings):
    async with sent_broadcast(settings) as sent:
        ann, bob = sent.contacts[:2]
        r = await sent.http.get(f"/r/{sent.links.click(ann, 1)}")
        assert r.status_code == 302 and r.headers["location"] == URLS[1] and r.content == b""
        assert r.headers["cache-control"] == "no-store"
        # Durable before the answer: the rows are there the moment the redirect came back.
        assert await sent.sql("fetchval", "SELECT clicks FROM link_clicks WHERE key = $1 AND link = 1 AND contact_id = $2",
                              sent.key, ann) == 1
        assert (await sent.engagement())["clicks"] == 1 and (await sent.engagement())["clicked"] == 1

        for _ in range(2):  # again: in the totals, not in the unique figures
            assert (await sent.http.get(f"/r/{sent.links.click(ann, 1)}")).headers["location"] == URLS[1]
        # Another link of the same message, then another message.
        r = await sent.http.get(f"/r/{sent.links.click(ann, 2)}")
        assert r.headers["location"] == "https://example.com/%C3%BCber%20uns"  # safe to send, the same URL
        await sent.http.get(f"/r/{sent.links.click(bob, 1)}")
        assert await sent.engagement() == {"opened": 0, "opens": 0, "proxy_opened": 0, "proxy_opens": 0,
                                           "clicked": 2, "clicks": 5}
        assert await sent.per_message() == await sent.engagement()
        links = {(r["link"], r["contact_id"]): r["clicks"] for r in await sent.sql(
            "fetch", "SELECT link, contact_id, clicks FROM link_clicks WHERE key = $1", sent.key)}
        assert links == {(1, ann): 3, (2, ann): 1, (1, bob): 1}
        first, last = await sent.sql("fetchrow", "SELECT first_at, last_at FROM link_clicks WHERE key = $1 AND link = 1 "
                                                 "AND contact_id = $2", sent.key, ann)
        assert first < last  # the first time kept, the last moved
        counters = await sent.counters()
        assert (counters["clicked"], counters["clicks"], counters["sent"]) == (2, 5, 10)

        # HEAD (link checkers): the same answer, nothing recorded.
        r = await sent.http.head(f"/r/{sent.links.click(bob, 3)}")
        assert r.status_code == 302 and r.headers["location"] == URLS[3]
        assert (await sent.engagement())["clicks"] == 5


async def test_a_changed_code_a_code_of_the_other_kind_or_an_unknown_link_is_a_404_with_no_location(settings):
    async with sent_broadcast(settings, n=2) as sent:
        ann = sent.contacts[0]
        code = sent.links.click(ann, 1)
        flip = {c: ALPHABET[(ALPHABET.index(c) + 1) % 64] for c in ALPHABET}
        # Every single-character change at a few positions, each to a few other characters (the
        # exhaustive property: tests/test_tracking_codes.py), and shapes that are no code at all.
        bad = [code[:i] + c + code[i + 1:] for i in (0, 1, 3, 8, 12, 20, 22, 30, 43)
               for c in {flip[code[i]], "A" if code[i] != "A" else "B", "_" if code[i] != "_" else "-"}]
        bad += [code[:-1], code + "A", "A" * 44, "%00" * 15, "é" * 44, sent.links.open(ann),
                signing.Signer(77, b"k" * 32).tracking_links(sent.key).click(ann, 1)]  # a kid never made
        for b in bad:
            _not_found(await sent.http.get(f"/r/{b}"))
            r = await sent.http.head(f"/r/{b}")
            assert r.status_code == 404 and "location" not in r.headers
        for b in [code, sent.links.open(ann)[:-1] + "A"]:  # a click's code, a changed open code
            _not_found(await sent.http.get(f"/o/{b}"))
        # A genuine code of a link that is not stored: a 404 too (not a failure of the client's).
        _not_found(await sent.http.get(f"/r/{sent.links.click(ann, 9)}"))
        assert await sent.engagement() == dict.fromkeys(("opened", "opens", "proxy_opened", "proxy_opens",
                                                         "clicked", "clicks"), 0)
        assert await sent.sql("fetchval", "SELECT count(*) FROM message_engagement") == 0
        assert (await sent.http.get(f"/r/{code}")).status_code == 302  # the real one still works


async def test_a_retired_keys_codes_are_404s_at_once_and_a_newer_keys_work(settings):
    async with sent_broadcast(settings, n=2) as sent:
        ann, bob = sent.contacts
        old_click, old_open = sent.links.click(ann, 1), sent.links.open(ann)
        assert (await sent.http.get(f"/r/{old_click}")).status_code == 302  # the API has key 1 now
        con = await db.connect(sent.database_url)
        try:
            assert await signing.rotate_key(con) == 2
            new = (await signing.load_signer(con)).tracking_links(sent.key)
            assert await signing.retire_key(con, 1)
        finally:
            await con.close()
        # Retired: at once, though the API still holds key 1 (the batch checks the key is live).
        _not_found(await sent.http.get(f"/r/{old_click}"))
        _not_found(await sent.http.get(f"/o/{old_open}"))
        assert (await sent.http.head(f"/r/{old_click}")).status_code == 404
        await asyncio.sleep(signing.KeyRing().reload_every_s)  # a kid the API does not know: it reloads
        r = await sent.http.get(f"/r/{new.click(bob, 2)}")
        assert r.status_code == 302 and r.headers["location"] == "https://example.com/%C3%BCber%20uns"
        assert (await sent.http.get(f"/o/{new.open(bob)}")).status_code == 200
        assert await sent.engagement() == {"opened": 1, "opens": 1, "proxy_opened": 0, "proxy_opens": 0,
                                           "clicked": 2, "clicks": 2}  # the click before the retirement, and bob's


async def test_opens_answer_the_gif_and_privacy_proxies_count_apart(settings):
    async with sent_broadcast(settings, n=4) as sent:
        ann, bob, cid, dan = sent.contacts

        async def opened(contact: int, user_agent: str | None) -> None:
            headers = {"user-agent": user_agent} if user_agent is not None else {}
            r = await sent.http.get(f"/o/{sent.links.open(contact)}", headers=headers)
            assert r.status_code == 200 and r.content == PIXEL and r.headers["content-type"] == "image/gif"
            assert r.headers["cache-control"] == "no-store, max-age=0"

        await opened(ann, "Mozilla/5.0")  # Apple Mail Privacy Protection on delivery
        await opened(ann, PERSON_UA)  # then ann herself
        await opened(ann, PERSON_UA)
        await opened(bob, GMAIL_UA)
        await opened(bob, GMAIL_UA)
        await opened(cid, "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html")
        await opened(dan, "")  # no User-Agent at all: a person
        assert await sent.engagement() == {"opened": 2, "opens": 3, "proxy_opened": 3, "proxy_opens": 4,
                                           "clicked": 0, "clicks": 0}
        assert await sent.per_message() == await sent.engagement()
        counters = await sent.counters()
        assert {k: counters[k] for k in ("opened", "opens", "proxy_opened", "proxy_opens")} == {
            "opened": 2, "opens": 3, "proxy_opened": 3, "proxy_opens": 4}


async def test_a_code_of_a_message_the_ledger_does_not_have_redirects_and_counts_nothing(settings):
    async with sent_broadcast(settings, n=2) as sent:
        # A test send's or a preview's code: genuine, but the broadcast never sent that message.
        r = await sent.http.get(f"/r/{sent.links.click(sent.outsider, 1)}")
        assert r.status_code == 302 and r.headers["location"] == URLS[1]
        assert (await sent.http.get(f"/o/{sent.links.open(sent.outsider)}")).content == PIXEL
        assert await sent.sql("fetchval", "SELECT count(*) FROM message_engagement") == 0
        assert await sent.sql("fetchval", "SELECT count(*) FROM link_clicks") == 0
        assert await sent.sql("fetchval", "SELECT count(*) FROM engagement_counters") == 0


async def test_hundreds_of_clicks_at_once_are_all_recorded_in_few_transactions_and_counted_exactly(settings):
    async with sent_broadcast(settings, n=50) as sent:
        wanted = [(contact, link) for contact in sent.contacts for link in (1, 2, 3)] * 3  # 450 clicks
        wanted += [(contact, 0) for contact in sent.contacts[:20]] * 2  # and 40 opens

        async def hit(contact: int, link: int) -> int:
            path = f"/r/{sent.links.click(contact, link)}" if link else f"/o/{sent.links.open(contact)}"
            return (await sent.http.get(path)).status_code

        statuses = await asyncio.gather(*(hit(c, link) for c, link in wanted))
        assert statuses.count(302) == 450 and statuses.count(200) == 40
        assert await sent.engagement() == {"opened": 20, "opens": 40, "proxy_opened": 0, "proxy_opens": 0,
                                           "clicked": 50, "clicks": 450}
        assert await sent.per_message() == await sent.engagement()
        assert await sent.sql("fetchval", "SELECT sum(clicks) FROM link_clicks WHERE key = $1", sent.key) == 450
        assert await sent.sql("fetchval", "SELECT count(*) FROM link_clicks WHERE key = $1", sent.key) == 150
        stats = sent.recorder().stats
        assert stats.events == 490 and stats.failed_batches == 0
        assert stats.batches < 490 / 2, stats  # grouped: far fewer transactions than requests


async def test_the_broadcasts_counters_are_the_engagement_tables_in_the_broadcast_its_list_and_its_stream(settings):
    async with sent_broadcast(settings, n=3) as sent:
        ann, bob, _ = sent.contacts
        for path in (f"/r/{sent.links.click(ann, 1)}", f"/r/{sent.links.click(ann, 2)}",
                     f"/r/{sent.links.click(bob, 1)}", f"/o/{sent.links.open(ann)}"):
            assert (await sent.http.get(path)).status_code in (200, 302)
        await sent.http.get(f"/o/{sent.links.open(bob)}", headers={"user-agent": GMAIL_UA})
        # What another engineer's receipts and the unsubscribe page write: read all the same.
        await sent.sql("execute", """UPDATE engagement_counters SET delivered = 3, read = 1, bounced = 1,
                                     complained = 1, unsubscribed = 1 WHERE broadcast_id = $1""", sent.broadcast_id)
        expected = {**await sent.engagement(), "delivered": 3, "read": 1, "bounced": 1, "complained": 1,
                    "unsubscribed": 1}
        assert expected == {**await sent.per_message(), "delivered": 3, "read": 1, "bounced": 1, "complained": 1,
                            "unsubscribed": 1}
        assert {k: (await sent.counters())[k] for k in expected} == expected
        listed = next(b for b in (await sent.api.get("/v1/broadcasts"))["items"] if b["id"] == str(sent.broadcast_id))
        assert {k: listed["counters"][k] for k in expected} == expected
        # The progress stream of a finished broadcast: one snapshot, with them.
        async with sent.api.client.stream("GET", f"/v1/broadcasts/{sent.broadcast_id}/progress",
                                          headers=sent.api.headers) as stream:
            data = next(line for line in [line async for line in stream.aiter_lines()] if line.startswith("data:"))
        assert {k: msgspec.json.decode(data[5:])["counters"][k] for k in expected} == expected


async def test_too_many_bad_codes_from_one_address_are_429s_and_genuine_ones_never_use_the_budget(settings):
    async with sent_broadcast(msgspec.structs.replace(settings, auth_failures_per_minute=3), n=1) as sent:
        good = f"/r/{sent.links.click(sent.contacts[0], 1)}"
        for _ in range(5):
            assert (await sent.http.get(good)).status_code == 302
        assert (await sent.http.get(f"/r/{sent.links.click(sent.contacts[0], 9)}")).status_code == 404  # no failure
        for _ in range(3):
            _not_found(await sent.http.get("/r/" + "A" * 44))
        r = await sent.http.get("/o/" + "A" * 44)
        assert r.status_code == 429 and r.headers["content-type"].startswith("application/problem+json")
        assert int(r.headers["retry-after"]) >= 1 and "location" not in r.headers
        assert (await sent.http.get(good)).status_code == 429  # blocked is blocked


async def test_a_click_postgres_cannot_commit_in_time_is_a_503_never_a_redirect(settings):
    async with sent_broadcast(settings, n=1) as sent:
        ann = sent.contacts[0]
        assert (await sent.http.get(f"/r/{sent.links.click(ann, 1)}")).status_code == 302
        tracking = sent.app.state["crier_tracking"]
        tracking.recorder = Recorder(tracking.recorder.pool, timeout_s=0.5)
        con = await db.connect(sent.database_url)
        try:
            async with con.transaction():  # the broadcast's counters row held: no batch can commit
                await con.execute("SELECT * FROM engagement_counters WHERE broadcast_id = $1 FOR UPDATE",
                                  sent.broadcast_id)
                r = await sent.http.get(f"/r/{sent.links.click(ann, 1)}")
                assert r.status_code == 503 and "location" not in r.headers, r.text
                assert r.headers["retry-after"] and r.headers["content-type"].startswith("application/problem+json")
        finally:
            await con.close()
        # The batch that timed out may still have committed once the lock went (the client was told
        # nothing either way); whatever it did, the counters and the tables agree.
        assert (await sent.http.get(f"/r/{sent.links.click(ann, 1)}")).status_code == 302
        assert (await sent.engagement())["clicks"] in (2, 3) and await sent.per_message() == await sent.engagement()


async def test_the_stats_show_each_channel_each_link_and_the_timeline(settings):
    async with sent_broadcast(settings, n=3) as sent:
        ann, bob, cid = sent.contacts
        for contact, link in ((ann, 1), (ann, 1), (bob, 1), (ann, 2)):
            assert (await sent.http.get(f"/r/{sent.links.click(contact, link)}")).status_code == 302
        await sent.http.get(f"/o/{sent.links.open(ann)}")
        await sent.http.get(f"/o/{sent.links.open(cid)}", headers={"user-agent": "Mozilla/5.0"})
        stats = await sent.api.get(f"/v1/broadcasts/{sent.broadcast_id}/stats")
        assert stats["channels"] == [{"channel": "email", "sent": 3, "failed": 0, "unknown": 0, "suppressed": 0,
                                      "delivered": 0, "read": 0, "opened": 1, "opens": 1,
                                      "proxy_opened": 1, "proxy_opens": 1, "clicked": 2, "clicks": 4, "bounced": 0,
                                      "complained": 0, "unsubscribed": 0}]
        assert stats["links"] == [{"url": URLS[1], "clicked": 2, "clicks": 3}, {"url": URLS[2], "clicked": 1, "clicks": 1},
                                  {"url": URLS[3], "clicked": 0, "clicks": 0}]
        assert stats["bucket"] == "hour"  # the run is over
        totals = {k: sum(b[k] for b in stats["timeline"]) for k in ("sent", "opened", "proxy_opened", "clicked")}
        assert totals == {"sent": 3, "opened": 1, "proxy_opened": 1, "clicked": 2}
        assert all(b["at"].endswith(("+00:00", "Z")) and b["at"][14:19] == "00:00" for b in stats["timeline"])
        minutes = await sent.api.get(f"/v1/broadcasts/{sent.broadcast_id}/stats", params={"bucket": "minute"})
        assert minutes["bucket"] == "minute" and sum(b["sent"] for b in minutes["timeline"]) == 3
        assert (await sent.api.call("GET", f"/v1/broadcasts/{sent.broadcast_id}/stats", 422,
                                    params={"bucket": "day"}))["status"] == 422
        await sent.api.call("GET", f"/v1/broadcasts/{uuid.uuid4()}/stats", 404)
        # Another tenant's token: the broadcast does not exist for it.
        con = await db.connect(sent.database_url)
        try:
            other = await tenants.create_tenant(con, "other")
            token = (await tenants.create_token(con, other.id, "read")).token
        finally:
            await con.close()
        r = await sent.http.get(f"/v1/broadcasts/{sent.broadcast_id}/stats", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 404
