"""End to end, as the issue asks: a tracked email broadcast to 1,000 through an SMTP peer; 300
people open it (some twice, and mail privacy proxies fetch a few pixels too), 200 clicks go over
some of them and its links (some repeated), its relay posts 50 delivered receipts; then the
broadcast's counters, its stats (per link too) and the dashboard show exactly those numbers.

Every pixel and link is the one in the message the peer received (`{CRIER_PUBLIC_URL}/o/{code}`,
`/r/{code}`), requested from the API the test runs; every receipt names the Message-ID the peer
received and is signed the Standard Webhooks way. Expected figures come from what the test did."""
from __future__ import annotations

import asyncio
import random
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx
import msgspec
from standardwebhooks import Webhook

from shared.channels.webhook import new_secret
from shared.tracking.stats import CHANNEL_FIGURES
from tests.smtp_peer import Received, SmtpPeer
from tests.stack import Api, api_for, sender_in_process
from tests.test_send_e2e import audience

RECIPIENTS = 1000
URLS = ["https://shop.example.com/sale", "https://shop.example.com/faq?x=1&y=2", "https://blog.example.com/news"]
HTML = ("<p>Hello {{ first_name }}</p>"
        + "".join(f'<p><a href="{url.replace("&", "&amp;")}">link {i}</a></p>' for i, url in enumerate(URLS, 1))
        + '<p><a href="{{ unsubscribe_url }}">unsubscribe</a></p>')
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
PERSON = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
RECEIPT_SECRET = new_secret()
IN_FLIGHT = 16  # requests at once: quick, and within the recorder's batches


@dataclass(frozen=True)
class Tracked:
    """What one recipient's email carries: its open pixel, its links (by number), its Message-ID."""

    pixel: str  # the path, /o/{code}
    links: dict[int, str]  # link number -> /r/{code}
    message_id: str


def tracked(message: Received, public_url: str) -> Tracked:
    """The pixel and links of a received email, as paths on the API (each checked to be on the
    deployment's public URL), in the order the links are in the HTML (so numbered 1, 2, 3)."""
    assert message.html is not None and message.message_id is not None
    urls = re.findall(r'(?:href|src)="([^"]+)"', message.html)
    clicks = [u for u in urls if "/r/" in u]
    pixels = [u for u in urls if "/o/" in u]
    assert len(clicks) == len(URLS) and len(pixels) == 1, urls
    for url in clicks + pixels:
        assert re.fullmatch(re.escape(public_url) + r"/[ro]/[A-Za-z0-9_-]{44}", url), url
    return Tracked(pixel=pixels[0][len(public_url):], message_id=str(message.message_id),
                   links={n: url[len(public_url):] for n, url in enumerate(clicks, 1)})


async def bounded(calls: list, limit: int = IN_FLIGHT) -> list:
    """Run the coroutines with at most `limit` at once; their results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(call):  # type: ignore[no-untyped-def]
        async with gate:
            return await call

    return await asyncio.gather(*(one(c) for c in calls))


async def post_receipts(http: httpx.AsyncClient, provider_id: str, receipts: list[dict]) -> dict:
    """One relay request: a JSON array of receipts, signed the Standard Webhooks way."""
    body = msgspec.json.encode(receipts).decode()
    msg_id, at = f"msg_{uuid.uuid4().hex}", datetime.now(timezone.utc)
    r = await http.post(f"/v1/receipts/{provider_id}", content=body, headers={
        "Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(RECEIPT_SECRET).sign(msg_id, at, body)})
    assert r.status_code == 200, r.text
    return r.json()


async def sent_tracked_broadcast(api: Api, peer: SmtpPeer) -> tuple[str, str]:
    """A tracked broadcast to RECIPIENTS through the peer, sent and completed: (its id, its provider's)."""
    list_id = await audience(api, RECIPIENTS)
    provider = await api.post("/v1/providers", {
        "name": "relay", "channel": "email", "kind": "smtp", **peer.provider_config(), "batch_size": 100,
        "batch_delay_ms": 0, "rate_limits": [], "receipt_secret": RECEIPT_SECRET})
    made = await api.post("/v1/broadcasts", {
        "name": "Tracked sale", "list_id": list_id, "provider_id": provider["id"], "track_opens": True,
        "track_clicks": True, "content": {"subject": "Sale, {{ first_name }}", "html": HTML}})
    await api.post(f"/v1/broadcasts/{made['id']}/send", expect=202)
    done = await api.wait_for_status(made["id"], {"completed", "partially_failed", "failed"}, timeout=180)
    assert done["status"] == "completed", done
    return made["id"], provider["id"]


async def test_a_tracked_broadcast_to_1000_shows_exactly_its_opens_clicks_and_receipts(settings):
    rng = random.Random(20261201)
    with SmtpPeer() as peer:
        async with api_for(settings) as api:
            async with sender_in_process(settings):
                broadcast_id, provider_id = await sent_tracked_broadcast(api, peer)
            received = peer.received
            assert len(received) == RECIPIENTS
            mail = {m.rcpt_tos[0]: tracked(m, settings.public_base_url) for m in received}
            people = sorted(mail)

            # Given 300 people who open it, 40 of them twice; and privacy proxies that fetch 25
            # pixels of 20 messages, opened by their people or not (counted apart)
            openers = rng.sample(people, 300)
            person_loads = openers + openers[:40]
            proxied = rng.sample(people, 20)
            proxy_loads = proxied + proxied[:5]
            # and 200 clicks: each of 70 people clicks a link, then 130 more over them and the
            # links, repeats and all
            clickers = rng.sample(people, 70)
            clicks = [(p, rng.randint(1, len(URLS))) for p in clickers]
            clicks += [(rng.choice(clickers), rng.randint(1, len(URLS))) for _ in range(200 - len(clicks))]
            # and 50 delivered receipts
            delivered = rng.sample(people, 50)

            # When the mail clients, the people and the relay do so, all at once
            async with httpx.AsyncClient(base_url=str(api.client.base_url), timeout=60) as anyone:
                async def load(path: str, user_agent: str) -> int:
                    return (await anyone.get(path, headers={"user-agent": user_agent})).status_code

                async def click(path: str) -> str:
                    r = await anyone.get(path, headers={"user-agent": PERSON})
                    assert r.status_code == 302, r.text
                    return r.headers["location"]

                calls = ([load(mail[p].pixel, PERSON) for p in person_loads]
                         + [load(mail[p].pixel, GMAIL_PROXY) for p in proxy_loads])
                rng.shuffle(calls)
                assert await bounded(calls) == [200] * len(calls)
                locations = await bounded([click(mail[p].links[n]) for p, n in clicks])
                assert locations == [URLS[n - 1] for _, n in clicks]  # each to its own link's URL
                receipts = [{"type": "delivered", "message_id": mail[p].message_id} for p in delivered]
                applied = await bounded([post_receipts(anyone, provider_id, receipts[i:i + 10])
                                         for i in range(0, len(receipts), 10)])
                replayed = await post_receipts(anyone, provider_id, receipts[:10])  # a relay's retry

            counters = (await api.get(f"/v1/broadcasts/{broadcast_id}"))["counters"]
            stats = await api.get(f"/v1/broadcasts/{broadcast_id}/stats")
            board = await api.get("/v1/dashboard")

    # Then every figure is what was done
    assert applied == [{"received": 10, "applied": 10, "held": 0}] * 5
    assert replayed == {"received": 10, "applied": 0, "held": 0}
    engagement = {
        "delivered": 50, "read": 0,
        "opened": 300, "opens": 340,  # people: each message once, every load
        "proxy_opened": 20, "proxy_opens": 25,
        "clicked": len(set(clickers)), "clicks": 200,  # messages with a click, every click
        "bounced": 0, "complained": 0, "unsubscribed": 0,
    }
    assert engagement == {
        "delivered": len(set(delivered)), "read": 0, "opened": len(set(person_loads)), "opens": len(person_loads),
        "proxy_opened": len(set(proxy_loads)), "proxy_opens": len(proxy_loads),
        "clicked": len({p for p, _ in clicks}), "clicks": len(clicks), "bounced": 0, "complained": 0,
        "unsubscribed": 0}  # the figures above, from the lists the test used
    expected = {"total": RECIPIENTS, "queued": 0, "sent": RECIPIENTS, "failed": 0, "unknown": 0, "suppressed": 0,
                "dropped": 0, "skipped": 0, **engagement}
    assert counters == expected

    assert stats["channels"] == [{"channel": "email", "sent": RECIPIENTS, "failed": 0, "unknown": 0, "suppressed": 0,
                                  **engagement}]
    per_link = {URLS[n - 1]: {"clicked": len({p for p, m in clicks if m == n}),
                              "clicks": sum(1 for _, m in clicks if m == n)} for n in range(1, len(URLS) + 1)}
    assert {link["url"]: {"clicked": link["clicked"], "clicks": link["clicks"]} for link in stats["links"]} == per_link
    assert sum(f["clicks"] for f in per_link.values()) == 200
    assert sum(b["opened"] for b in stats["timeline"]) == 300 and sum(b["sent"] for b in stats["timeline"]) == 1000
    assert sum(b["clicked"] for b in stats["timeline"]) == engagement["clicked"]

    assert board["broadcasts"] == 1 and board["totals"] == expected
    assert board["channels"] == [{"channel": "email", "broadcasts": 1, **{f: engagement[f] for f in CHANNEL_FIGURES}}]
    [item] = board["items"]
    assert (item["id"], item["name"], item["channels"], item["status"]) == (broadcast_id, "Tracked sale", ["email"],
                                                                           "completed")
    assert item["counters"] == expected
