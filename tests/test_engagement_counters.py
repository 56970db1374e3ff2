"""Engagement counters on a real Postgres: the broadcast's counters merge the folded sending counters
with engagement_counters (one query, summed over runs and channels; the progress stamp moves with
them); the recorder's group commit counts exactly under two processes' concurrent batches, records
nothing for a message never sent or a retired key, and is bounded when Postgres cannot commit; and
the unsubscribe page counts a contact's first unsubscribe once, for the broadcast's latest run that
sent to it. The proxy table: literal cases. The endpoints end to end: tests/test_tracking_endpoints.py."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.broadcasts import progress
from shared.broadcasts.counters import ENGAGEMENT, Counters, counters_of, shown
from shared.platform import db, signing
from shared.tracking.cache import TrackingCache, TrackingKey
from shared.tracking.location import as_location
from shared.tracking.proxies import privacy_proxy
from shared.tracking.recorder import (
    NOT_SENT,
    RECORDED,
    RETIRED,
    Engagement,
    Recorder,
    RecorderUnavailable,
)
from tests.tenant_env import TenantEnv, tenant_env

TENANT = uuid.UUID(int=1)


@pytest.fixture
async def con(settings) -> AsyncIterator[Any]:
    con = await db.connect(settings.database_url)
    yield con
    await con.close()


async def ledger(con: Any, broadcast_id: uuid.UUID, run: int, statuses: dict[int, str], channel: str = "email",
                 tenant_id: uuid.UUID = TENANT) -> None:
    """A run's ledger as a sender leaves it: one row per contact, in the given status."""
    await con.execute("""INSERT INTO runs (broadcast_id, run, tenant_id, channel, planned) VALUES ($1, $2, $3, $4, true)
                         ON CONFLICT DO NOTHING""", broadcast_id, run, tenant_id, channel)
    await con.executemany(
        """INSERT INTO messages (broadcast_id, run, contact_id, channel, batch_seq, address, status, attempts, sent_at)
           VALUES ($1, $2, $3, $4, 0, $5, $6, 1, now())""",
        [(broadcast_id, run, c, channel, f"c{c}@example.com", status) for c, status in statuses.items()])


async def tracking_key(con: Any, broadcast_id: uuid.UUID, run: int, channel: str = "email") -> TrackingKey:
    key = await con.fetchval("""INSERT INTO tracking_keys (tenant_id, broadcast_id, run, version, channel)
                                VALUES ($1, $2, $3, 1, $4) RETURNING key""", TENANT, broadcast_id, run, channel)
    await con.execute("INSERT INTO tracked_links (key, link, url) VALUES ($1, 1, 'https://a.example'), "
                      "($1, 2, 'https://b.example')", key)
    return TrackingKey(key=key, tenant_id=TENANT, broadcast_id=broadcast_id, run=run, channel=channel)


# -- the counters ----------------------------------------------------------------------------------


async def test_counters_of_merges_the_sending_counters_and_the_engagement_over_runs_and_channels(con):
    both, sending_only, engagement_only, neither = (uuid.uuid4() for _ in range(4))
    await con.executemany(
        "INSERT INTO broadcast_counters (broadcast_id, run, total, sent, failed) VALUES ($1, $2, $3, $4, $5)",
        [(both, 1, 10, 8, 2), (both, 2, 5, 5, 0), (sending_only, 1, 3, 3, 0)])
    rows = [(both, 1, "email", 7, 0, 5, 9, 3, 4, 2, 6, 1, 0, 1), (both, 1, "sms", 2, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0),
            (both, 2, "email", 4, 0, 1, 1, 2, 2, 0, 0, 0, 0, 1), (engagement_only, 3, "email", 1, 0, 0, 0, 0, 0, 0, 0,
                                                                   0, 0, 0)]
    await con.executemany(
        f"INSERT INTO engagement_counters (broadcast_id, run, channel, {', '.join(ENGAGEMENT)}) "
        f"VALUES ($1, $2, $3, {', '.join(f'${i}' for i in range(4, 4 + len(ENGAGEMENT)))})", rows)
    found = await counters_of(con, [both, sending_only, engagement_only, neither])
    assert set(found) == {both, sending_only, engagement_only}
    assert found[both] == Counters(total=15, sent=13, failed=2, delivered=13, read=1, opened=6, opens=10,
                                   proxy_opened=5, proxy_opens=6, clicked=3, clicks=7, bounced=1, complained=1,
                                   unsubscribed=2)
    assert found[sending_only] == Counters(total=3, sent=3)
    assert found[engagement_only] == Counters(delivered=1)
    assert found[both].engaged() == 13 + 1 + 6 + 10 + 5 + 6 + 3 + 7 + 1 + 1 + 2
    shown_both = shown(found[both], "completed")
    assert list(shown_both) == ["total", "queued", "sent", "failed", "unknown", "suppressed", "dropped", "skipped",
                                *ENGAGEMENT]
    assert shown_both["opened"] == 6 and shown_both["dropped"] == 0
    assert shown(None, "draft") == dict.fromkeys(shown_both, 0)


async def test_the_progress_snapshot_shows_the_engagement_and_its_stamp_moves_with_it(con):
    broadcast_id = uuid.uuid4()
    await con.execute("""INSERT INTO broadcasts (id, tenant_id, name, channel, status, content, run, version, created_at,
                                                 updated_at)
                         VALUES ($1, $2, 'b', 'email', 'completed', '{}', 1, 3, now(), now())""", broadcast_id, TENANT)
    before = (await progress.read(con, [broadcast_id]))[broadcast_id].progress
    await con.execute("INSERT INTO engagement_counters (broadcast_id, run, channel, clicks, clicked) "
                      "VALUES ($1, 1, 'email', 2, 1)", broadcast_id)
    after = (await progress.read(con, [broadcast_id]))[broadcast_id].progress
    assert after.snapshot["counters"]["clicks"] == 2 and after.snapshot["counters"]["clicked"] == 1
    assert after.stamp.engaged == before.stamp.engaged + 3
    assert after.stamp.after(before.stamp) and not before.stamp.after(after.stamp)
    assert not after.stamp.after(after.stamp)
    # A stamp without the engagement part (a process before it) reads as 0 there.
    assert progress.Stamp(1, 2, 3) == progress.Stamp(1, 2, 3, 0)


# -- the recorder ----------------------------------------------------------------------------------


async def _kid(con: Any) -> int:
    return (await signing.load_signer(con)).kid


async def test_the_recorder_counts_exactly_under_two_processes_batches_at_once(settings, con):
    broadcast_id = uuid.uuid4()
    contacts = list(range(1, 41))
    await ledger(con, broadcast_id, 1, dict.fromkeys(contacts, "sent"))
    key = await tracking_key(con, broadcast_id, 1)
    kid = await _kid(con)
    # Two API processes: two pools, two recorders, the same messages clicked and opened from both.
    pools = [await db.create_pool(settings.database_url, max_size=2) for _ in range(2)]
    recorders = [Recorder(pool, max_batch=25, linger_s=0.001) for pool in pools]
    try:
        events = [Engagement(key=key, contact_id=c, kid=kid, link=link, proxy=proxy)
                  for c in contacts for link, proxy in ((1, False), (2, False), (1, False), (0, False), (0, True))]
        outcomes = await asyncio.gather(*(recorders[i % 2].record(e) for i, e in enumerate(events * 3)))
    finally:
        for pool in pools:
            await pool.close()
    assert set(outcomes) == {RECORDED}
    assert sum(r.stats.batches for r in recorders) < len(outcomes) / 5
    counters = dict(await con.fetchrow(
        "SELECT opened, opens, proxy_opened, proxy_opens, clicked, clicks FROM engagement_counters "
        "WHERE broadcast_id = $1 AND run = 1 AND channel = 'email'", broadcast_id))
    assert counters == {"opened": 40, "opens": 120, "proxy_opened": 40, "proxy_opens": 120, "clicked": 40,
                        "clicks": 360}
    rows = await con.fetch("SELECT * FROM message_engagement WHERE broadcast_id = $1", broadcast_id)
    assert len(rows) == 40 and {(r["opens"], r["proxy_opens"], r["clicks"]) for r in rows} == {(3, 3, 9)}
    assert all(r["opened_at"] and r["proxy_opened_at"] and r["clicked_at"] for r in rows)
    assert await con.fetchval("SELECT sum(clicks) FROM link_clicks WHERE key = $1", key.key) == 360
    assert {r["clicks"] for r in await con.fetch("SELECT clicks FROM link_clicks WHERE key = $1 AND link = 1",
                                                  key.key)} == {6}


async def test_a_message_never_sent_or_a_retired_key_records_nothing(settings, con):
    broadcast_id = uuid.uuid4()
    await ledger(con, broadcast_id, 1, {1: "sent", 2: "failed", 3: "sending"})
    key = await tracking_key(con, broadcast_id, 1)
    kid = await _kid(con)
    pool = await db.create_pool(settings.database_url, max_size=2)
    try:
        recorder = Recorder(pool)
        # In the ledger in any status (a click may come before the sender marked it sent): counted.
        assert await recorder.record(Engagement(key=key, contact_id=1, kid=kid, link=1)) == RECORDED
        assert await recorder.record(Engagement(key=key, contact_id=3, kid=kid, link=1)) == RECORDED
        assert await recorder.record(Engagement(key=key, contact_id=2, kid=kid)) == RECORDED
        # Not in the ledger (another run, another contact): nothing.
        other_run = TrackingKey(key=key.key, tenant_id=TENANT, broadcast_id=broadcast_id, run=2, channel="email")
        assert await recorder.record(Engagement(key=other_run, contact_id=1, kid=kid, link=1)) == NOT_SENT
        assert await recorder.record(Engagement(key=key, contact_id=99, kid=kid, link=1)) == NOT_SENT
        await signing.rotate_key(con)
        await signing.retire_key(con, kid)
        assert await recorder.record(Engagement(key=key, contact_id=1, kid=kid, link=2)) == RETIRED
        assert await recorder.record(Engagement(key=key, contact_id=99, kid=kid)) == RETIRED
    finally:
        await pool.close()
    assert await con.fetchval("SELECT clicks FROM engagement_counters WHERE broadcast_id = $1", broadcast_id) == 2
    assert await con.fetchval("SELECT opens FROM engagement_counters WHERE broadcast_id = $1", broadcast_id) == 1
    assert await con.fetchval("SELECT count(*) FROM message_engagement") == 3
    assert await con.fetchval("SELECT count(*) FROM link_clicks") == 2


async def test_when_postgres_cannot_commit_requests_fail_in_time_and_the_buffer_stays_bounded(settings, con):
    broadcast_id = uuid.uuid4()
    await ledger(con, broadcast_id, 1, {1: "sent"})
    key = await tracking_key(con, broadcast_id, 1)
    kid = await _kid(con)
    click = Engagement(key=key, contact_id=1, kid=kid, link=1)
    pool = await db.create_pool(settings.database_url, max_size=2)
    try:
        recorder = Recorder(pool, max_batch=2, max_held=4, timeout_s=0.5)
        assert await recorder.record(click) == RECORDED
        async with con.transaction():  # the counters row held: no batch can commit
            await con.execute("SELECT FROM engagement_counters WHERE broadcast_id = $1 FOR UPDATE", broadcast_id)
            results = await asyncio.gather(*(recorder.record(click) for _ in range(10)), return_exceptions=True)
            assert all(isinstance(r, RecorderUnavailable) for r in results), results
        for _ in range(100):  # the flusher drops what was given up, just after
            if recorder._held == 0:
                break
            await asyncio.sleep(0.01)
        assert recorder._held == 0  # nothing left behind
        assert await recorder.record(click) == RECORDED  # and it works again
    finally:
        await pool.close()
    # Those given up before their batch left were dropped; the batch cut by the timeout rolled back.
    assert await con.fetchval("SELECT clicks FROM engagement_counters WHERE broadcast_id = $1", broadcast_id) == 2
    with pytest.raises(ValueError):
        Recorder(pool, max_batch=10, max_held=5)


async def test_the_cache_reads_a_key_and_a_link_once_however_many_ask_at_once(settings, con):
    broadcast_id = uuid.uuid4()
    key = await tracking_key(con, broadcast_id, 1)
    pool = await db.create_pool(settings.database_url, max_size=2)
    try:
        cache = TrackingCache(pool, max_links=1)
        links = await asyncio.gather(*(cache.link(key.key, 1) for _ in range(50)))
        assert {link.url for link in links} == {"https://a.example"} and links[0].key == key
        assert cache.queries == 1
        assert (await cache.key(key.key)) == key and cache.queries == 1  # the link brought its key
        assert (await cache.link(key.key, 2)).url == "https://b.example"
        assert (await cache.link(key.key, 1)).url == "https://a.example" and cache.queries == 3  # one link kept
        assert await cache.link(key.key, 3) is None and await cache.key(key.key + 1) is None
    finally:
        await pool.close()


@pytest.mark.parametrize(("user_agent", "proxy"), [
    ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)", "gmail"),
    ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html", "yahoo"),
    ("Mozilla/5.0", "apple"),
    (" Mozilla/5.0 ", "apple"),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)", None),  # Apple Mail
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
     None),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
     None),
    ("Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)", None),
    ("Thunderbird/115.0", None),
    ("mozilla/5.0", None),  # not what Apple sends
    ("Mozilla/5.0 googleimageproxy", None),  # case-sensitive, as the proxies send it
    ("", None),
    (None, None),
])
def test_privacy_proxies_are_told_by_their_user_agent(user_agent, proxy):
    assert privacy_proxy(user_agent) == proxy


@pytest.mark.parametrize(("stored", "location"), [
    ("https://example.com/a?b=c&d=%20e#f", "https://example.com/a?b=c&d=%20e#f"),  # as it is, escapes kept
    ("https://example.com/ü ber", "https://example.com/%C3%BC%20ber"),
    ("https://x.example/\r\nSet-Cookie: a=b", "https://x.example/%0D%0ASet-Cookie:%20a=b"),  # no header of its own
    ("https://x.example/{a}|b\"<>", "https://x.example/%7Ba%7D%7Cb%22%3C%3E"),
    ("https://[::1]:8080/p;q=1/*+$,!'()~", "https://[::1]:8080/p;q=1/*+$,!'()~"),
])
def test_a_stored_url_becomes_a_location_that_is_the_same_url(stored, location):
    assert as_location(stored) == location


# -- unsubscribed ------------------------------------------------------------------------------------


class Env(TenantEnv):
    async def contact(self, email: str) -> int:
        return await self.sql("fetchval", "INSERT INTO contacts (tenant_id, email) VALUES ($1, $2) RETURNING id",
                              self.tenant_id, email)

    async def unsubscribe(self, broadcast_id: uuid.UUID, contact_id: int) -> None:
        con = await db.connect(self.database_url)
        try:
            code = (await signing.load_signer(con)).unsubscribe_code(self.tenant_id, broadcast_id, contact_id, "email")
        finally:
            await con.close()
        r = await self.http.post(f"/u/{code}", content="List-Unsubscribe=One-Click")
        assert r.status_code == 200, r.text

    async def unsubscribed(self, broadcast_id: uuid.UUID) -> dict[int, int]:
        rows = await self.sql("fetch", "SELECT run, unsubscribed FROM engagement_counters WHERE broadcast_id = $1",
                              broadcast_id)
        return {r["run"]: r["unsubscribed"] for r in rows if r["unsubscribed"]}


@pytest.fixture
async def env(settings) -> AsyncIterator[Env]:
    async with tenant_env(settings, Env) as e:
        yield e


async def test_a_first_unsubscribe_counts_once_for_the_latest_run_that_sent_to_the_contact(env):
    ann, bob, cid, dan, eve = [await env.contact(f"{n}@example.com") for n in ("ann", "bob", "cid", "dan", "eve")]
    news, other = uuid.uuid4(), uuid.uuid4()
    con = await db.connect(env.database_url)
    try:
        # Run 1 reached ann, bob, dan and eve, not cid; run 2 (a recurring occurrence) reached ann, not bob.
        await ledger(con, news, 1, {ann: "sent", bob: "sent", cid: "failed", dan: "unknown", eve: "sent"},
                     tenant_id=env.tenant_id)
        await ledger(con, news, 2, {ann: "sent", bob: "failed", cid: "suppressed"}, tenant_id=env.tenant_id)
        await ledger(con, other, 1, {ann: "sent"}, tenant_id=env.tenant_id)
    finally:
        await con.close()

    await env.unsubscribe(news, ann)
    assert await env.unsubscribed(news) == {2: 1}  # the latest run that sent to ann
    await env.unsubscribe(news, ann)  # again: nothing new
    await env.unsubscribe(other, ann)  # another broadcast's link while suppressed: not a new unsubscribe
    await env.unsubscribe(news, bob)  # run 2 failed for bob: run 1 sent to him
    await env.unsubscribe(news, dan)  # unknown: it may have arrived
    assert await env.unsubscribed(news) == {1: 2, 2: 1} and await env.unsubscribed(other) == {}
    await env.unsubscribe(news, cid)  # never reached: suppressed, counted nowhere
    assert await env.count("SELECT count(*) FROM suppressions WHERE contact_id = $1", cid) == 1
    assert await env.unsubscribed(news) == {1: 2, 2: 1}
    # The person's click and the mailbox provider's one-click POST at once: one unsubscribe.
    con = await db.connect(env.database_url)
    try:
        code = (await signing.load_signer(con)).unsubscribe_code(env.tenant_id, news, eve, "email")
    finally:
        await con.close()
    answers = await asyncio.gather(*(env.http.post(f"/u/{code}", content="List-Unsubscribe=One-Click")
                                     for _ in range(5)))
    assert {r.status_code for r in answers} == {200}
    assert await env.unsubscribed(news) == {1: 3, 2: 1}
    # Through the API: the broadcast's counters sum the runs (the broadcast row is the view's; none here).
    con = await db.connect(env.database_url)
    try:
        assert (await counters_of(con, [news]))[news].unsubscribed == 4
    finally:
        await con.close()
