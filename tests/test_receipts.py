"""Delivery receipts (POST /v1/receipts/{provider_id}): each provider kind's signed callbacks move
the ledger on, counted once in engagement_counters, never back; hard bounces and complaints
suppress; a bad or missing signature is a 401 that changes nothing, an id that takes no receipts
the same 404 whatever it is; failures are rate limited.

The ledger rows come from real sends through the local peers (tests/twilio_peer.py,
whatsapp_peer.py, smtp_peer.py), whose ids the callbacks then name, as the providers would. The
tests of the tenant wall, the limits and the handshake insert a few `sent` rows of a draft
broadcast instead: they are about the endpoint, and a send would only add seconds."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx
import msgspec
from standardwebhooks import Webhook

from shared.channels.smtp import message_id_of
from shared.channels.webhook import new_secret
from shared.platform import db
from shared.platform.settings import Settings
from shared.tenants import store as tenants
from shared.tracking import early_receipts
from shared.tracking.receipt_kinds import (
    email_receipt,
    twilio_receipt,
    whatsapp_receipt,
    whatsapp_time,
)
from shared.tracking.receipt_signatures import (
    meta_verified,
    standard_webhook_verified,
    twilio_signature,
    twilio_verified,
)
from shared.tracking.receipt_statuses import LedgerState, Receipt, fold
from shared.tracking.receipts import apply_receipts, email_ledger_key
from tests.api_helpers import assert_problem
from tests.smtp_peer import SmtpPeer
from tests.stack import Api, api_for, sender_in_process
from tests.twilio_peer import AUTH_TOKEN, TwilioPeer
from tests.whatsapp_peer import WhatsappPeer

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
APP_SECRET, VERIFY_TOKEN = "meta-app-secret-4f2a9c", "crier-verify-7e1d"
RECEIPT_SECRET = new_secret()
ENDED = {"completed", "partially_failed", "failed"}


# -- what a receipt does to a row (pure) -------------------------------------------------------------

def r(status: str, minute: int = 0, *, hard: bool = False, error: str | None = None) -> Receipt:
    return Receipt(provider_message_id="x", status=status, at=T0 + timedelta(minutes=minute),  # type: ignore[arg-type]
                   hard=hard, error=error)


SENT = LedgerState(status="sent")


def test_a_status_moves_on_never_back_and_the_same_receipt_twice_counts_once():
    delivered = fold(SENT, [r("delivered", 1)])
    assert delivered is not None and (delivered.state.status, delivered.delivered, delivered.read) == ("delivered", 1, 0)
    assert delivered.state.delivered_at == T0 + timedelta(minutes=1)
    assert fold(delivered.state, [r("delivered", 2)]) is None  # a replay
    read = fold(delivered.state, [r("read", 3)])
    assert read is not None and (read.state.status, read.delivered, read.read) == ("read", 0, 1)
    assert read.state.delivered_at == T0 + timedelta(minutes=1)  # kept
    assert fold(read.state, [r("delivered", 4)]) is None  # late: stays read


def test_out_of_order_receipts_end_where_the_later_state_is_and_terminal_ones_are_final():
    both = fold(SENT, [r("read", 2), r("delivered", 1)])
    assert both is not None and both.state.status == "read" and (both.delivered, both.read) == (1, 1)
    assert both.state.delivered_at == both.state.read_at == T0 + timedelta(minutes=2)
    bounced = fold(SENT, [r("bounced", 1, hard=True, error="twilio undelivered: error 30005"), r("delivered", 2)])
    assert bounced is not None and bounced.state.status == "bounced" and bounced.suppress == "bounced"
    assert (bounced.delivered, bounced.bounced) == (0, 1) and bounced.state.error == "twilio undelivered: error 30005"
    assert fold(bounced.state, [r("complained"), r("read")]) is None
    assert fold(LedgerState(status="read"), [r("bounced", hard=True)]) is None  # read: it arrived
    late = fold(LedgerState(status="delivered", delivered_at=T0), [r("bounced")])
    assert late is not None and late.state.status == "bounced" and late.suppress is None  # soft: no suppression
    complaint = fold(SENT, [r("complained", 5)])
    assert complaint is not None and (complaint.delivered, complaint.complained, complaint.suppress) == (1, 1, "complained")
    for status in ("failed", "unknown", "sending", "suppressed", "skipped"):  # never handed over
        assert fold(LedgerState(status=status), [r("delivered"), r("bounced", hard=True)]) is None


def test_each_providers_words():
    assert twilio_receipt("SM1", "sent", None, T0) is None and twilio_receipt("SM1", "queued", None, T0) is None
    assert twilio_receipt("SM1", "delivered", None, T0).status == "delivered"  # type: ignore[union-attr]
    soft, hard = twilio_receipt("SM1", "undelivered", "30003", T0), twilio_receipt("SM1", "failed", "30005", T0)
    assert (soft.status, soft.hard, soft.error) == ("bounced", False, "twilio undelivered: error 30003")  # type: ignore[union-attr]
    assert (hard.status, hard.hard, hard.error) == ("bounced", True, "twilio failed: error 30005")  # type: ignore[union-attr]
    failed = whatsapp_receipt("wamid.1", "failed", T0, [(131026, "Message undeliverable")])
    assert (failed.status, failed.hard, failed.error) == (  # type: ignore[union-attr]
        "bounced", True, "whatsapp failed: code 131026: Message undeliverable")
    assert whatsapp_receipt("wamid.1", "sent", T0, []) is None and whatsapp_receipt("wamid.1", "deleted", T0, []) is None
    assert whatsapp_time("1764590400", T0) == datetime(2025, 12, 1, 12, 0, tzinfo=timezone.utc)
    assert whatsapp_time("soon", T0) == whatsapp_time("9" * 30, T0) == whatsapp_time(None, T0) == T0
    bounce = email_receipt("<a.1.2.email@crier>", "bounced", "hard", T0, "550 5.1.1 no such user")
    assert (bounce.provider_message_id, bounce.hard, bounce.error) == (
        "a.1.2.email@crier", True, "bounced (hard): 550 5.1.1 no such user")


def test_an_email_receipt_finds_its_row_by_the_message_id_crier_set():
    broadcast = uuid.uuid4()
    message_id = message_id_of(f"{broadcast}:3:42:email")  # as the smtp provider sets it
    key = email_ledger_key(message_id[1:-1])
    assert key is not None and (key.broadcast_id, key.run, key.contact_id, key.channel) == (broadcast, 3, 42, "email")
    for other in ("abc@example.com", f"{broadcast}.3.42.email@example.com", f"{broadcast}.x.42.email@crier",
                  "not-a-uuid.3.42.email@crier", f"{broadcast}.3.42@crier", ""):
        assert email_ledger_key(other) is None


# -- the signatures (pure) ---------------------------------------------------------------------------

def test_twilio_signatures_match_twilios_documented_example_and_nothing_else():
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = [("CallSid", "CA1234567890ABCDE"), ("Caller", "+12349013030"), ("Digits", "1234"),
              ("From", "+12349013030"), ("To", "+18005551212")]
    assert twilio_signature(url, params, "12345") == "0/KCTR6DLpKmkAf8muzZqo1nDgQ=" == twilio_signature(
        url, list(reversed(params)), "12345")  # Twilio's security docs
    assert twilio_verified(url, params, "12345", "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
    ported = twilio_signature("https://mycompany.com:443/myapp.php?foo=1&bar=2", params, "12345")
    assert twilio_verified(url, params, "12345", ported)  # a default port or none: both are tried
    for wrong in (None, "", "0/KCTR6DLpKmkAf8muzZqo1nDgQ", twilio_signature(url, params, "54321")):
        assert not twilio_verified(url, params, "12345", wrong)
    assert not twilio_verified(url, params[:-1], "12345", "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
    assert not twilio_verified(url, params, None, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")  # no token: nothing verifies


def test_meta_and_standard_webhooks_signatures():
    body = b'{"object":"whatsapp_business_account"}'
    good = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert meta_verified(body, APP_SECRET, good) and meta_verified(body, APP_SECRET, good.upper().replace("SHA", "sha"))
    flipped = good[:-1] + ("1" if good[-1] == "0" else "0")
    for wrong in (None, "", good[7:], "sha1=" + good[7:], flipped):
        assert not meta_verified(body, APP_SECRET, wrong)
    assert not meta_verified(body + b" ", APP_SECRET, good) and not meta_verified(body, None, good)
    signer = Webhook(RECEIPT_SECRET)
    now = datetime.now(timezone.utc)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": signer.sign("msg_1", now, body.decode())}
    assert standard_webhook_verified(body, RECEIPT_SECRET, headers)
    old = now - timedelta(minutes=6)
    for broken in ({**headers, "webhook-signature": "v1"}, {**headers, "webhook-signature": "v1,!!"},
                   {**headers, "webhook-timestamp": "nan"}, {**headers, "webhook-id": "msg_2"},
                   {**headers, "webhook-timestamp": str(int(old.timestamp())),
                    "webhook-signature": signer.sign("msg_1", old, body.decode())},
                   {k: v for k, v in headers.items() if k != "webhook-signature"}):
        assert not standard_webhook_verified(body, RECEIPT_SECRET, broken), broken
    assert not standard_webhook_verified(b"\xff" + body, RECEIPT_SECRET, headers)
    assert not standard_webhook_verified(body, None, headers) and not standard_webhook_verified(body, "whsec_x", headers)


# -- the endpoint on the real stack --------------------------------------------------------------------

@dataclass
class Sent:
    broadcast_id: str
    provider_id: str
    ids: list[str]  # each recipient's provider message id, in the order of `addresses`
    addresses: list[str]


class Receipts:
    """Posts callbacks to /v1/receipts/{provider_id} as each provider signs them (no token)."""

    def __init__(self, api: Api, settings: Settings) -> None:
        self.http, self.settings = api.client, settings

    async def twilio(self, provider_id: str, form: dict[str, str], *, token: str = AUTH_TOKEN,
                     signature: str | None = "sign", url: str | None = None) -> httpx.Response:
        path = f"/v1/receipts/{provider_id}"
        # Signed over the deployment's public URL, never the address the test reached the server by
        signed = twilio_signature(url or self.settings.public_base_url + path, form.items(), token)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signature is not None:
            headers["X-Twilio-Signature"] = signed if signature == "sign" else signature
        return await self.http.post(path, content=urlencode(form), headers=headers)

    async def whatsapp(self, provider_id: str, statuses: list[dict[str, Any]], *, secret: str = APP_SECRET,
                       signature: str | None = "sign", body: bytes | None = None) -> httpx.Response:
        body = body if body is not None else whatsapp_body(statuses)
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["X-Hub-Signature-256"] = ("sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
                                              if signature == "sign" else signature)
        return await self.http.post(f"/v1/receipts/{provider_id}", content=body, headers=headers)

    async def email(self, provider_id: str, receipts: Any, *, secret: str = RECEIPT_SECRET, signed: bool = True,
                    at: datetime | None = None) -> httpx.Response:
        body = msgspec.json.encode(receipts)
        at = at or datetime.now(timezone.utc)
        msg_id = f"msg_{uuid.uuid4().hex}"
        headers = {"Content-Type": "application/json", "webhook-id": msg_id,
                   "webhook-timestamp": str(int(at.timestamp()))}
        if signed:
            headers["webhook-signature"] = Webhook(secret).sign(msg_id, at, body.decode())
        return await self.http.post(f"/v1/receipts/{provider_id}", content=body, headers=headers)


def whatsapp_body(statuses: list[dict[str, Any]]) -> bytes:
    """Meta's webhook shape, with an incoming message beside the statuses (not Crier's: ignored)."""
    return msgspec.json.encode({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [
        {"field": "messages", "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1"},
                                        "statuses": statuses}},
        {"field": "messages", "value": {"messages": [{"from": "4915100000001", "id": "wamid.in", "type": "text"}]}},
    ]}]})


def wa_status(wamid: str, status: str, *, code: int | None = None) -> dict[str, Any]:
    status_item: dict[str, Any] = {"id": wamid, "status": status, "timestamp": str(int(T0.timestamp())),
                                   "recipient_id": "4915100000001"}
    if code is not None:
        status_item["errors"] = [{"code": code, "title": "Message undeliverable"}]
    return status_item


async def ledger(settings: Settings, broadcast_id: str) -> dict[str, asyncpg.Record]:
    """The broadcast's ledger rows by provider message id."""
    con = await db.connect(settings.database_url)
    try:
        rows = await con.fetch("SELECT * FROM messages WHERE broadcast_id = $1", uuid.UUID(broadcast_id))
    finally:
        await con.close()
    return {row["provider_message_id"]: row for row in rows}


async def counters_match_the_ledger(settings: Settings, broadcast_id: str) -> dict[str, int]:
    """engagement_counters equal what the ledger says, per run and channel; returns the broadcast's sums."""
    con = await db.connect(settings.database_url)
    try:
        counted = {(r["run"], r["channel"]): tuple(r)[2:] for r in await con.fetch(
            """SELECT run, channel, delivered, read, bounced, complained FROM engagement_counters
               WHERE broadcast_id = $1 AND delivered + read + bounced + complained > 0""", uuid.UUID(broadcast_id))}
        said = {(r["run"], r["channel"]): tuple(r)[2:] for r in await con.fetch(
            """SELECT run, channel, count(delivered_at) AS delivered, count(read_at) AS read,
                      count(*) FILTER (WHERE status = 'bounced') AS bounced,
                      count(*) FILTER (WHERE status = 'complained') AS complained
               FROM messages WHERE broadcast_id = $1 GROUP BY run, channel
               HAVING count(delivered_at) + count(read_at) + count(*) FILTER (WHERE status IN ('bounced', 'complained')) > 0""",
            uuid.UUID(broadcast_id))}
    finally:
        await con.close()
    assert counted == said
    names = ("delivered", "read", "bounced", "complained")
    return {name: sum(values[i] for values in said.values()) for i, name in enumerate(names)}


async def stored_config(settings: Settings, provider_id: str, *names: str) -> dict[str, bool]:
    """How the provider's `names` are stored: {"$sealed": True} when each is a sealed value only."""
    con = await db.connect(settings.database_url)
    try:
        config = await con.fetchval("SELECT config FROM providers WHERE id = $1", uuid.UUID(provider_id))
    finally:
        await con.close()
    shapes = {tuple(config[name]) for name in names}
    return {key: True for shape in shapes for key in shape}


async def suppressed(settings: Settings, channel: str) -> set[tuple[str | None, int | None, str]]:
    con = await db.connect(settings.database_url)
    try:
        rows = await con.fetch("SELECT address, contact_id, reason FROM suppressions WHERE channel = $1", channel)
    finally:
        await con.close()
    return {(row["address"], row["contact_id"], row["reason"]) for row in rows}


async def start_sending(api: Api, people: list[dict[str, Any]], provider: dict[str, Any], channels: list[str],
                        content: dict[str, Any]) -> tuple[str, str]:
    """A broadcast to `people` through a new provider, sent: (its id, the provider's id)."""
    ids = (await api.post("/v1/contacts", people))["ids"]
    lst = await api.post("/v1/lists", {"name": "receivers"})
    await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
    created = await api.post("/v1/providers", {"name": "p", "batch_size": 10, "batch_delay_ms": 0, "rate_limits": [],
                                               **provider})
    broadcast = await api.post("/v1/broadcasts", {"name": "b", "list_id": lst["id"], "channels": channels,
                                                  "provider_id": created["id"], "content": content})
    await api.post(f"/v1/broadcasts/{broadcast['id']}/send", expect=202)
    return broadcast["id"], created["id"]


async def send_to(api: Api, people: list[dict[str, Any]], provider: dict[str, Any], channels: list[str],
                  content: dict[str, Any]) -> tuple[str, str]:
    """As start_sending, once the broadcast completed."""
    broadcast_id, provider_id = await start_sending(api, people, provider, channels, content)
    done = await api.wait_for_status(broadcast_id, ENDED)
    assert done["status"] == "completed", done
    return broadcast_id, provider_id


def refused(*responses: httpx.Response) -> None:
    """Each response a 401 problem about the signature."""
    for response in responses:
        assert "signature" in assert_problem(response, 401, "unauthorized")["detail"]


async def test_twilio_status_callbacks(settings):
    numbers = [f"+4915200{i:06d}" for i in range(4)]
    with TwilioPeer() as twilio:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id, provider_id = await send_to(
                api, [{"phone": n} for n in numbers], {"kind": "twilio", **twilio.provider_config()},
                ["sms"], {"sms": {"body": "Hi"}})
            sid = {n: twilio.received_by(n)[0].sid for n in numbers}
            post = Receipts(api, settings)

            def form(number: str, status: str, code: str | None = None) -> dict[str, str]:
                fields = {"AccountSid": twilio.account_sid, "MessageSid": sid[number], "SmsSid": sid[number],
                          "MessageStatus": status, "SmsStatus": status, "To": number, "From": "+15005550006",
                          "ApiVersion": "2010-04-01"}
                return {**fields, "ErrorCode": code} if code else fields

            # Given a delivered receipt, twice: it moves the message once
            first = await post.twilio(provider_id, form(numbers[0], "delivered"))
            again = await post.twilio(provider_id, form(numbers[0], "delivered"))
            assert (first.status_code, first.json(), again.json()) == (
                200, {"received": 1, "applied": 1, "held": 0}, {"received": 1, "applied": 0, "held": 0})
            # Statuses the ledger knows already (queued, sent) are taken and ignored
            assert (await post.twilio(provider_id, form(numbers[0], "sent"))).json() == {"received": 0, "applied": 0, "held": 0}
            # Read, then a late delivered: stays read (and counts as delivered too)
            await post.twilio(provider_id, form(numbers[1], "read"))
            late = await post.twilio(provider_id, form(numbers[1], "delivered"))
            assert late.json() == {"received": 1, "applied": 0, "held": 0}
            # Undelivered: bounced with its code; only a code naming the number suppresses it
            await post.twilio(provider_id, form(numbers[2], "undelivered", "30003"))
            await post.twilio(provider_id, form(numbers[3], "failed", "30005"))
            after = await post.twilio(provider_id, form(numbers[3], "delivered"))  # after a bounce: stays bounced
            assert after.json() == {"received": 1, "applied": 0, "held": 0}
            rows = await ledger(settings, broadcast_id)
            # Signatures that do not verify change nothing: a wrong one, none, another token's, and one
            # over the URL the test reached the server by (its Host) rather than CRIER_PUBLIC_URL
            refused(await post.twilio(provider_id, form(numbers[0], "read"), signature="bm9wZQ=="),
                    await post.twilio(provider_id, form(numbers[0], "read"), signature=None),
                    await post.twilio(provider_id, form(numbers[0], "read"), token="another-token"),
                    await post.twilio(provider_id, form(numbers[0], "read"),
                                      url=f"{api.client.base_url}/v1/receipts/{provider_id}"))
            assert await ledger(settings, broadcast_id) == rows
            # A signed callback without the message's id is a 422 naming the field
            missing = await post.twilio(provider_id, {"MessageStatus": "delivered"})
            assert assert_problem(missing, 422)["errors"] == [{"field": "MessageSid", "reason": "required field missing"}]
            # A top-up leaves them all out: delivered, read and bounced were all reached
            top_up = await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            shown = await api.get(f"/v1/broadcasts/{broadcast_id}")
            by_status = {m["address"]: m["status"] for m in await api.all_messages(broadcast_id)}

    assert [rows[sid[n]]["status"] for n in numbers] == ["delivered", "read", "bounced", "bounced"]
    assert rows[sid[numbers[1]]]["delivered_at"] is not None and rows[sid[numbers[1]]]["read_at"] is not None
    assert [rows[sid[n]]["error"] for n in numbers[2:]] == ["twilio undelivered: error 30003", "twilio failed: error 30005"]
    assert await counters_match_the_ledger(settings, broadcast_id) == {"delivered": 2, "read": 1, "bounced": 2,
                                                                       "complained": 0}
    assert await suppressed(settings, "sms") == {(numbers[3], None, "bounced")}
    assert top_up["queued"] == 0
    assert (shown["counters"]["sent"], shown["counters"]["failed"]) == (4, 0)  # the send counters never move
    assert by_status == dict(zip(numbers, ["delivered", "read", "bounced", "bounced"]))


async def test_whatsapp_status_webhooks_and_the_verification_handshake(settings):
    numbers = [f"+4915100{i:06d}" for i in range(3)]
    with WhatsappPeer() as whatsapp:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id, provider_id = await send_to(
                api, [{"whatsapp": n} for n in numbers],
                {"kind": "whatsapp_cloud", **whatsapp.provider_config(), "app_secret": APP_SECRET,
                 "verify_token": VERIFY_TOKEN},
                ["whatsapp"], {"whatsapp": {"template_name": "hello_world", "language": "en_US"}})
            shown = await api.get(f"/v1/providers/{provider_id}")
            wamid = {n: whatsapp.received_by(n)[0].wamid for n in numbers}
            post = Receipts(api, settings)
            a, b, c = (wamid[n] for n in numbers)
            # Given one webhook with many statuses: sent, delivered and read of one message, delivered
            # of another, a failure naming the number, and one of a message that is not Crier's
            batch = [wa_status(a, "sent"), wa_status(a, "delivered"), wa_status(a, "read"), wa_status(b, "delivered"),
                     wa_status(c, "failed", code=131026), wa_status("wamid.not-ours", "delivered")]
            first = await post.whatsapp(provider_id, batch)
            replayed = await post.whatsapp(provider_id, batch)
            out_of_order = await post.whatsapp(provider_id, [wa_status(b, "read"), wa_status(b, "delivered")])
            rows = await ledger(settings, broadcast_id)
            refused(await post.whatsapp(provider_id, [wa_status(a, "failed")], signature="sha256=00"),
                    await post.whatsapp(provider_id, [wa_status(a, "failed")], signature=None),
                    await post.whatsapp(provider_id, [wa_status(a, "failed")], secret="another-secret"))
            assert await ledger(settings, broadcast_id) == rows
            # A signed body that is not JSON is a 400; one of another shape a 422 naming the field
            assert_problem(await post.whatsapp(provider_id, [], body=b"{not json"), 400)
            wrong = await post.whatsapp(provider_id, [], body=b'{"entry": [{"changes": [{"value": {"statuses": [{}]}}]}]}')
            assert assert_problem(wrong, 422)["errors"] == [
                {"field": "entry[0].changes[0].value.statuses[0].id", "reason": "required field missing"}]
            # Meta's handshake
            path = f"/v1/receipts/{provider_id}"
            hello = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
            handshake = await api.client.get(path, params=hello)
            guessed = await api.client.get(path, params={**hello, "hub.verify_token": "guess-guess"})

    # (the status of a message that is not Crier's is held, in case it is one not written yet; once)
    assert (first.json(), replayed.json(), out_of_order.json()) == (
        {"received": 5, "applied": 3, "held": 1}, {"received": 5, "applied": 0, "held": 0},
        {"received": 2, "applied": 1, "held": 0})
    assert [rows[w]["status"] for w in (a, b, c)] == ["read", "read", "bounced"]
    assert rows[a]["read_at"] == rows[a]["delivered_at"] == T0  # Meta's own timestamps
    assert rows[c]["error"] == "whatsapp failed: code 131026: Message undeliverable"
    assert await counters_match_the_ledger(settings, broadcast_id) == {"delivered": 2, "read": 2, "bounced": 1,
                                                                       "complained": 0}
    assert await suppressed(settings, "whatsapp") == {(numbers[2], None, "bounced")}
    assert (shown["app_secret_set"], shown["verify_token_set"]) == (True, True)
    assert APP_SECRET not in str(shown) and VERIFY_TOKEN not in str(shown)
    assert await stored_config(settings, provider_id, "app_secret", "verify_token") == {"$sealed": True}
    assert (handshake.status_code, handshake.text) == (200, "1158201444")
    assert handshake.headers["content-type"].startswith("text/plain")
    assert_problem(guessed, 401)


async def test_email_relay_receipts(settings):
    addresses = [f"r{i}@example.com" for i in range(4)]
    with SmtpPeer() as smtp:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id, provider_id = await send_to(
                api, [{"email": a} for a in addresses],
                {"kind": "smtp", "channel": "email", **smtp.provider_config(), "receipt_secret": RECEIPT_SECRET},
                ["email"], {"subject": "Hi", "text": "Hello"})
            shown = await api.get(f"/v1/providers/{provider_id}")
            message_id = {a: str(smtp.received_by(a)[0].message_id) for a in addresses}  # <...@crier>, as sent
            contact = {m["address"]: m["contact_id"] for m in await api.all_messages(broadcast_id)}
            post = Receipts(api, settings)
            hard_bounce = {"type": "bounced", "bounce": "hard", "message_id": message_id[addresses[1]],
                           "reason": "550 5.1.1 no such user", "address": addresses[1]}
            batch = [{"type": "delivered", "message_id": message_id[addresses[0]], "at": "2026-12-01T12:00:00Z"},
                     hard_bounce,
                     {"type": "bounced", "bounce": "soft", "message_id": message_id[addresses[2]].strip("<>")},
                     {"type": "complained", "message_id": message_id[addresses[3]]},
                     {"type": "delivered", "message_id": "<someone-else@example.com>"}]
            first = await post.email(provider_id, batch)
            replayed = await post.email(provider_id, batch)
            late = await post.email(provider_id, {"type": "delivered", "message_id": message_id[addresses[1]]})
            rows = await ledger(settings, broadcast_id)
            refused(await post.email(provider_id, hard_bounce | {"message_id": message_id[addresses[0]]},
                                     signed=False),
                    await post.email(provider_id, [], secret=new_secret()),
                    await post.email(provider_id, [], at=datetime.now(timezone.utc) - timedelta(minutes=10)))
            assert await ledger(settings, broadcast_id) == rows
            no_bounce = await post.email(provider_id, [{"type": "delivered", "message_id": "<x@crier>"},
                                                       {"type": "bounced", "message_id": "<x@crier>"}])
            unknown = await post.email(provider_id, {"type": "opened", "message_id": "<x@crier>"})

    by_address = {row["address"]: row for row in rows.values()}
    assert (first.json(), replayed.json(), late.json()) == (
        {"received": 5, "applied": 4, "held": 0}, {"received": 5, "applied": 0, "held": 0}, {"received": 1, "applied": 0, "held": 0})
    assert [by_address[a]["status"] for a in addresses] == ["delivered", "bounced", "bounced", "complained"]
    assert by_address[addresses[0]]["delivered_at"] == T0
    assert by_address[addresses[1]]["error"] == "bounced (hard): 550 5.1.1 no such user"
    assert await counters_match_the_ledger(settings, broadcast_id) == {"delivered": 2, "read": 0, "bounced": 2,
                                                                       "complained": 1}
    # A hard bounce suppresses the address; a complaint the person and the address; a soft bounce nothing
    assert await suppressed(settings, "email") == {(addresses[1], None, "bounced"),
                                                   (addresses[3], contact[addresses[3]], "complained")}
    assert shown["receipt_secret_set"] is True and RECEIPT_SECRET not in str(shown)
    assert await stored_config(settings, provider_id, "receipt_secret") == {"$sealed": True}
    assert [e["field"] for e in assert_problem(no_bounce, 422)["errors"]] == ["[1].bounce"]
    assert [e["field"] for e in assert_problem(unknown, 422)["errors"]] == ["type"]


async def test_a_receipt_that_comes_while_its_batch_still_sends_counts_as_sent(settings):
    # Given a batch of six sent one at a time (each written to the ledger as it goes), 0.3 s apart
    numbers = [f"+4915300{i:06d}" for i in range(6)]
    with TwilioPeer(delay=0.3) as twilio:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id, provider_id = await start_sending(
                api, [{"phone": n} for n in numbers], {"kind": "twilio", **twilio.provider_config(), "concurrency": 1},
                ["sms"], {"sms": {"body": "Hi"}})
            # When the first one's delivery receipt comes before the batch is through
            deadline = time.monotonic() + 30
            while not (sent := [i for i, row in (await ledger(settings, broadcast_id)).items() if row["status"] == "sent"]):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            answer = await Receipts(api, settings).twilio(provider_id, {"MessageSid": sent[0], "MessageStatus": "delivered"})
            unfinished = len(await ledger(settings, broadcast_id)) < 6
            done = await api.wait_for_status(broadcast_id, ENDED)
    # Then the batch still counts it as sent: the run completes with all six sent
    assert answer.json() == {"received": 1, "applied": 1, "held": 0} and unfinished
    assert done["status"] == "completed" and (done["counters"]["sent"], done["counters"]["failed"]) == (6, 0)
    assert await counters_match_the_ledger(settings, broadcast_id) == {"delivered": 1, "read": 0, "bounced": 0,
                                                                       "complained": 0}


async def test_a_receipt_that_comes_before_its_message_is_written_is_held_and_applied_once_it_is(settings):
    async with two_tenants(settings) as (one, _, post):
        config = {"kind": "twilio", "name": "t", "account_sid": "AC" + "0" * 32, "auth_token": AUTH_TOKEN,
                  "from_number": "+15005550006"}
        provider_id = (await one.post("/v1/providers", config))["id"]
        early_sid, strangers_sid = "SM" + "b" * 32, "SM" + "c" * 32
        # Given a delivered receipt for a message whose outcome is not written yet, and one that will
        # never name a message of ours (another system's, on the same account)
        early = await post.twilio(provider_id, {"MessageSid": early_sid, "MessageStatus": "delivered"})
        stranger = await post.twilio(provider_id, {"MessageSid": strangers_sid, "MessageStatus": "read"})
        # When the sender writes the message (its SID first known then)
        broadcast_id = await a_sent_message(settings, one, provider_id, "sms", early_sid)
        # Then within seconds the held receipt moves it and counts, as if it had come after
        deadline = time.monotonic() + 20
        while (await ledger(settings, broadcast_id))[early_sid]["status"] != "delivered":
            assert time.monotonic() < deadline, "the held receipt was never applied"
            await asyncio.sleep(0.1)
        con = await db.connect(settings.database_url)
        try:
            still_held = await con.fetch("SELECT receipt->>'provider_message_id' AS sid FROM early_receipts")
            # and the stranger's, held meanwhile, is dropped once older than its time
            await con.execute("UPDATE early_receipts SET received_at = received_at - interval '11 minutes'")
            retried = await early_receipts.apply_again(con)
            left = await con.fetchval("SELECT count(*) FROM early_receipts")
        finally:
            await con.close()
    assert early.json() == stranger.json() == {"received": 1, "applied": 0, "held": 1}
    assert [r["sid"] for r in still_held] == [strangers_sid]
    assert (retried.applied, retried.expired, left) == (0, 1, 0)
    assert await counters_match_the_ledger(settings, broadcast_id) == {"delivered": 1, "read": 0, "bounced": 0,
                                                                       "complained": 0}


async def test_a_tenants_pile_of_held_receipts_holds_up_neither_another_tenant_nor_its_own_newest(settings):
    # The housekeeping's passes are run by hand here, one at a time
    settings = msgspec.structs.replace(settings, run_background=False)
    config = {"kind": "twilio", "name": "t", "account_sid": "AC" + "0" * 32, "auth_token": AUTH_TOKEN,
              "from_number": "+15005550006"}
    async with two_tenants(settings) as (one, two, post):
        ones, twos = (await one.post("/v1/providers", config))["id"], (await two.post("/v1/providers", config))["id"]
        # Given tenant two holding 500 receipts that will never name a message, tenant one 300, and then
        # one receipt each of tenant one and two whose messages are written afterwards
        con = await db.connect(settings.database_url)
        try:
            tenant_of = {p: await con.fetchval("SELECT tenant_id FROM providers WHERE id = $1", uuid.UUID(p))
                         for p in (ones, twos)}
            for provider_id, n in ((twos, 500), (ones, 300)):
                await apply_receipts(con, tenant_of[provider_id], "sms", [
                    Receipt(provider_message_id=f"SMnever{provider_id[:4]}{i:05d}", status="delivered",
                            at=datetime.now(timezone.utc)) for i in range(n)])
            for api, provider_id, sid in ((one, ones, "SM" + "d" * 32), (two, twos, "SM" + "e" * 32)):
                assert (await post.twilio(provider_id, {"MessageSid": sid, "MessageStatus": "delivered"})).json() == {
                    "received": 1, "applied": 0, "held": 1}
            written = {sid: await a_sent_message(settings, api, provider_id, "sms", sid)
                       for api, provider_id, sid in ((one, ones, "SM" + "d" * 32), (two, twos, "SM" + "e" * 32))}
            # When a pass runs: it takes 200 of each tenant's, the untried first, newest first
            first = await early_receipts.apply_again(con)
            tried = await con.fetchval("SELECT count(*) FROM early_receipts WHERE tried_at IS NOT NULL")
            # and the next ones the untried, then the least recently tried
            second = await early_receipts.apply_again(con)
            third = await early_receipts.apply_again(con)
            untried = await con.fetchval("SELECT count(*) FROM early_receipts WHERE tried_at IS NULL")
            held = await con.fetchval("SELECT count(*) FROM early_receipts")
        finally:
            await con.close()
        statuses = {sid: (await ledger(settings, b))[sid]["status"] for sid, b in written.items()}
    # Then both newest are applied on the first pass, whatever the piles; the never-matching ones stay
    # held till they expire, each tried in turn
    assert (first.applied, second.applied, third.applied, tried, untried, held) == (2, 0, 0, 398, 0, 800)
    assert statuses == {"SM" + "d" * 32: "delivered", "SM" + "e" * 32: "delivered"}


async def test_an_email_receipt_for_a_message_id_crier_did_not_set_is_not_held(settings):
    async with api_for(settings) as api:
        provider_id = (await api.post("/v1/providers", {
            "kind": "smtp", "channel": "email", "name": "relay", "host": "smtp.example.com", "port": 587,
            "from_email": "news@example.com", "receipt_secret": RECEIPT_SECRET}))["id"]
        post = Receipts(api, settings)
        theirs = await post.email(provider_id, {"type": "delivered", "message_id": "<abc@mail.example.com>"})
        ours = await post.email(provider_id, {"type": "delivered",
                                              "message_id": f"<{uuid.uuid4()}.1.42.email@crier>"})
    assert theirs.json() == {"received": 1, "applied": 0, "held": 0}
    assert ours.json() == {"received": 1, "applied": 0, "held": 1}


# -- the endpoint's walls, on ledger rows written directly ------------------------------------------

@asynccontextmanager
async def two_tenants(settings: Settings) -> AsyncIterator[tuple[Api, Api, Receipts]]:
    """The API for tenant one (`api`) and a writer of tenant two, and a poster of receipts."""
    async with api_for(settings) as api:
        con = await db.connect(settings.database_url)
        try:
            two = await tenants.create_tenant(con, "two")
            token = (await tenants.create_token(con, two.id, "write")).token
        finally:
            await con.close()
        yield api, Api(api.client, token), Receipts(api, settings)


async def a_sent_message(settings: Settings, api: Api, provider_id: str, channel: str, sid: str) -> str:
    """A draft broadcast of the tenant's with one `sent` ledger row (provider message id `sid`)."""
    broadcast = await api.post("/v1/broadcasts", {"name": "b", "provider_id": provider_id, "channels": [channel],
                                                  "content": {"sms": {"body": "Hi"}}, "list_id": (
        await api.post("/v1/lists", {"name": f"l{uuid.uuid4().hex[:6]}"}))["id"]})
    con = await db.connect(settings.database_url)
    try:
        await con.execute(
            """INSERT INTO messages (broadcast_id, run, contact_id, channel, batch_seq, address, status, attempts,
                                     provider_message_id, sent_at)
               VALUES ($1, 1, 1, $2, 0, '+4915200000001', 'sent', 1, $3, now())""",
            uuid.UUID(broadcast["id"]), channel, sid)
    finally:
        await con.close()
    return broadcast["id"]


async def test_a_receipt_reaches_only_its_providers_tenant_and_any_id_that_takes_none_is_the_same_404(settings):
    async with two_tenants(settings) as (one, two, post):
        config = {"kind": "twilio", "name": "t", "account_sid": "AC" + "0" * 32, "auth_token": AUTH_TOKEN,
                  "from_number": "+15005550006"}
        mine = (await one.post("/v1/providers", config))["id"]
        theirs = (await two.post("/v1/providers", config))["id"]  # the same account and token, another tenant
        broadcast_id = await a_sent_message(settings, one, mine, "sms", "SM" + "a" * 32)
        # Tenant two's provider, correctly signed, naming tenant one's message: taken, nothing changes
        crossed = await post.twilio(theirs, {"MessageSid": "SM" + "a" * 32, "MessageStatus": "delivered"})
        before = await ledger(settings, broadcast_id)
        # Ids that take no receipts: none, not an id, deleted, a kind without receipts
        gone = (await one.post("/v1/providers", config))["id"]
        await one.call("DELETE", f"/v1/providers/{gone}")
        null = (await one.post("/v1/providers", {"kind": "null", "name": "n"}))["id"]
        answers = [await post.twilio(pid, {"MessageSid": "SM1", "MessageStatus": "delivered"})
                   for pid in (str(uuid.uuid4()), "not-an-id", gone, null)]
        handshakes = [await post.http.get(f"/v1/receipts/{pid}", params={"hub.mode": "subscribe"})
                      for pid in (str(uuid.uuid4()), mine)]
        # Tenant one's own provider moves it
        mine_answer = await post.twilio(mine, {"MessageSid": "SM" + "a" * 32, "MessageStatus": "delivered"})
        after = await ledger(settings, broadcast_id)
    # Held under its own tenant (it may be a message of theirs not written yet), never applied to one's
    assert crossed.json() == {"received": 1, "applied": 0, "held": 1} and before["SM" + "a" * 32]["status"] == "sent"
    bodies = [assert_problem(a, 404) for a in answers + handshakes]
    assert len({msgspec.json.encode(b) for b in bodies}) == 1  # the same answer, byte for byte
    assert mine_answer.json() == {"received": 1, "applied": 1, "held": 0} and after["SM" + "a" * 32]["status"] == "delivered"
    await counters_match_the_ledger(settings, broadcast_id)


async def test_failures_are_rate_limited_per_address_and_a_wrong_secret_only_holds_its_own_provider(settings):
    settings = msgspec.structs.replace(settings, auth_failures_per_minute=3)
    async with two_tenants(settings) as (one, _, post):
        config = {"kind": "twilio", "name": "t", "account_sid": "AC" + "0" * 32, "auth_token": AUTH_TOKEN,
                  "from_number": "+15005550006"}
        misconfigured, fine = (await one.post("/v1/providers", config))["id"], (await one.post("/v1/providers", config))["id"]
        await a_sent_message(settings, one, fine, "sms", "SM" + "b" * 32)
        receipt = {"MessageSid": "SM" + "b" * 32, "MessageStatus": "delivered"}
        # A provider whose callbacks do not verify (its secret is wrong): past the burst, 429s
        wrong = [await post.twilio(misconfigured, receipt, token="rotated-token") for _ in range(4)]
        # while another provider's valid callbacks from the same address go through
        other = await post.twilio(fine, receipt)
        # Ids that are no provider count against the address itself
        probes = [await post.twilio(str(uuid.uuid4()), receipt) for _ in range(4)]
        held = await post.twilio(fine, receipt)
    assert [a.status_code for a in wrong] == [401, 401, 401, 429] and int(wrong[-1].headers["Retry-After"]) >= 1
    assert_problem(wrong[-1], 429, "rate_limited")
    assert other.json() == {"received": 1, "applied": 1, "held": 0}
    assert [a.status_code for a in probes] == [404, 404, 404, 429] and held.status_code == 429


async def test_a_body_over_the_limit_is_a_413_and_the_body_is_not_read_for_a_404(settings):
    async with two_tenants(settings) as (one, _, post):
        provider = (await one.post("/v1/providers", {
            "kind": "smtp", "name": "m", "host": "127.0.0.1", "from_email": "news@example.com",
            "receipt_secret": RECEIPT_SECRET}))["id"]
        big = [{"type": "delivered", "message_id": f"<{i:0900d}@example.com>"} for i in range(1200)]
        too_big = await post.email(provider, big)
        too_many = await post.email(provider, big[:1001])
        bad_secret = await one.call("POST", "/v1/providers", 422, json={
            "kind": "smtp", "name": "m", "host": "127.0.0.1", "from_email": "news@example.com",
            "receipt_secret": "whsec_" + base64.b64encode(b"16 bytes, short.").decode()})
        patched = await one.patch(f"/v1/providers/{provider}", {"receipt_secret": None})
        unsigned = await post.email(provider, [])
    assert_problem(too_big, 413)
    assert [e["field"] for e in assert_problem(too_many, 422)["errors"]] == ["body"]
    assert bad_secret["errors"][0]["field"] == "receipt_secret"
    assert patched["receipt_secret_set"] is False
    assert_problem(unsigned, 401)  # no secret: nothing verifies
