"""End to end through each HTTP provider at its local peer: a `crier sender` SIGKILLed in the middle
of a broadcast's jobs, another sender taking them over, and nobody sent twice.

As tests/test_send_e2e.py does for SMTP: the peer answers each request only after a delay, so the
victim has requests in flight (`concurrency` per account and process) when it dies, and groups of
several jobs claimed whose outcomes are not written yet. Those recipients were handed over (or about
to be) with no outcome in the ledger: the sender that takes the jobs over marks them `unknown` and
does not send them again; everyone else gets exactly one request.

Each request is traced to its recipient by the contact id the content carries, not only by the
address the peer records (a webhook's peer keys requests by webhook-id).
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from sender_service.worker import UNKNOWN_OUTCOME
from tests.fcm_peer import FcmPeer, device_token
from tests.http_peer import HttpPeer
from tests.stack import Api, api_for, sender_in_process, sender_process
from tests.telegram_peer import TelegramPeer
from tests.twilio_peer import TwilioPeer
from tests.webhook_peer import WebhookPeer
from tests.whatsapp_peer import WhatsappPeer

N = 200  # recipients
BATCH_SIZE = 20  # 10 jobs
CONCURRENCY = 4  # requests in flight per account and sender process (a group of 4 per job)
DELAY_S = 0.1  # per request at the peer: 4 in flight at once send the whole broadcast in ~5 s
KILL_AFTER = 40  # requests the peer has accepted when the sender is killed
FINAL = {"completed", "partially_failed", "failed"}


@dataclass(frozen=True)
class Kind:
    """A provider kind, its channel and peer, what its contacts hold, its content, and how to read
    a request the peer recorded: (the contact id its content carries, the address it went to)."""

    channel: str
    peer: Callable[[], HttpPeer[Any]]
    contact: Callable[[int], dict[str, Any]]
    content: dict[str, Any]
    traced: Callable[[Any], tuple[int, str]]
    address: Callable[[dict[str, Any]], str]  # a contact's address as the peer records it


def _phone(i: int) -> str:
    return f"+49152{i:08d}"


KINDS = {
    "twilio": Kind(
        "sms", lambda: TwilioPeer(delay=DELAY_S), lambda i: {"phone": _phone(i)},
        {"sms": {"body": "n{{ contact_id }}"}},
        lambda r: (int(r.body.removeprefix("n")), r.to), lambda c: c["phone"]),
    "whatsapp_cloud": Kind(
        "whatsapp", lambda: WhatsappPeer(delay=DELAY_S), lambda i: {"phone": _phone(i)},
        {"whatsapp": {"template_name": "greeting", "language": "en", "parameters": {"1": "{{ contact_id }}"}}},
        lambda r: (int(r.parameters[0]), r.to), lambda c: c["phone"].removeprefix("+")),
    "telegram_bot": Kind(
        "telegram", lambda: TelegramPeer(delay=DELAY_S), lambda i: {"telegram_chat_id": str(7_000_000 + i)},
        {"telegram": {"text": "n{{ contact_id }}"}},
        lambda r: (int(r.text.removeprefix("n")), r.chat_id), lambda c: c["telegram_chat_id"]),
    "fcm": Kind(
        "push", lambda: FcmPeer(delay=DELAY_S), lambda i: {"push_tokens": [device_token(i)]},
        {"push": {"title": "News", "body": "n{{ contact_id }}"}},
        lambda r: (int(r.message["notification"]["body"].removeprefix("n")), r.token),
        lambda c: c["push_tokens"][0]),
    "webhook": Kind(
        "webhook", lambda: WebhookPeer(delay=DELAY_S), lambda i: {},
        {"webhook": {"payload": {"contact": "{{ contact_id }}"}}},
        # the envelope names the contact too: both must agree; the address is the contact id
        lambda r: (int(r.body["data"]["payload"]["contact"]), str(r.body["data"]["contact_id"])),
        lambda c: str(c["id"])),
}


def sends(peer: HttpPeer[Any]) -> int:
    """Requests to send a message the peer took (FCM's token requests are not)."""
    return peer.counts()["send"] if isinstance(peer, FcmPeer) else peer.requests


async def broadcast(api: Api, kind: str, peer: HttpPeer[Any]) -> tuple[str, dict[int, dict[str, Any]]]:
    """A broadcast on the kind's channel to N contacts, through a provider at `peer`; and the
    contacts by id."""
    spec = KINDS[kind]
    people = [{"external_id": f"k{i}", **spec.contact(i)} for i in range(N)]
    ids = (await api.post("/v1/contacts", people))["ids"]
    contacts = {cid: {"id": cid, **person} for cid, person in zip(ids, people, strict=True)}
    lst = await api.post("/v1/lists", {"name": "everyone"})
    await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
    provider = await api.post("/v1/providers", {
        "name": kind, "kind": kind, **peer.provider_config(), "batch_size": BATCH_SIZE, "batch_delay_ms": 0,
        "concurrency": CONCURRENCY, "rate_limits": []})
    created = await api.post("/v1/broadcasts", {"name": f"{kind} crash", "list_id": lst["id"],
                                                "channels": [spec.channel], "provider_id": provider["id"],
                                                "content": spec.content})
    return created["id"], contacts


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_sender_killed_mid_broadcast_sends_nobody_twice_and_misses_nobody(settings, kind, record_property):
    spec = KINDS[kind]
    settings = msgspec.structs.replace(settings, job_ack_wait_s=3.0)
    started = time.monotonic()
    # Given a peer that answers each request after a delay, and a broadcast to N recipients through it
    with spec.peer() as peer:
        async with api_for(settings) as api:
            broadcast_id, contacts = await broadcast(api, kind, peer)
            victim = sender_process(settings, CRIER_JOB_ACK_WAIT_S="3")
            try:
                # When a sender process is SIGKILLed while it sends (requests in flight)
                await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
                await peer.wait_for(KILL_AFTER, timeout=60)
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait()
                killed_at = len(peer.received)
                assert killed_at < N, "the victim finished before it was killed: make the peer slower"
                # and another sender takes its jobs over
                async with sender_in_process(settings):
                    done = await api.wait_for_status(broadcast_id, FINAL, 60)
                    messages = await api.all_messages(broadcast_id)
            finally:
                if victim.poll() is None:
                    victim.kill()
                    victim.wait()
        received, requests = peer.received, sends(peer)

    # Then every request the peer took was accepted, each for the recipient its content names
    assert requests == len(received), f"{requests - len(received)} requests were refused by the peer"
    traced = [spec.traced(r) for r in received]
    assert all(address == spec.address(contacts[cid]) for cid, address in traced), "a request went astray"
    # and nobody received more than one
    per_contact = Counter(cid for cid, _ in traced)
    twice = {cid: n for cid, n in per_contact.items() if n > 1}
    assert not twice, f"sent more than once (contact id: requests): {twice}"
    if isinstance(peer, WebhookPeer):
        assert peer.duplicates == 0 and len(set(peer.ids)) == len(received)
    # The ledger: everyone sent, but for the few the victim had handed over without an answer
    assert len(messages) == N and {m["contact_id"] for m in messages} == set(contacts)
    by_status = Counter(m["status"] for m in messages)
    assert set(by_status) <= {"sent", "unknown"}, by_status
    unknown = {m["contact_id"] for m in messages if m["status"] == "unknown"}
    assert all(m["error"] == UNKNOWN_OUTCOME for m in messages if m["status"] == "unknown")
    # at most what the victim had claimed and not yet recorded: a group of `concurrency` per job,
    # for each job it worked on at once (its requests in flight are fewer: `concurrency` per account)
    assert len(unknown) <= CONCURRENCY * settings.sender_concurrency, unknown
    # everyone else received exactly one request
    assert set(per_contact) | unknown == set(contacts)
    sent = {m["contact_id"] for m in messages if m["status"] == "sent"}
    # an unknown one may have arrived (the kill fell between the request and the ledger's write)
    assert sent <= set(per_contact) and set(per_contact) - sent <= unknown
    counters = done["counters"]
    assert counters["total"] == N and counters["queued"] == 0 and counters["failed"] == 0
    assert counters["sent"] == len(sent) and counters["unknown"] == len(unknown)
    assert done["status"] == ("completed" if not unknown else "partially_failed"), done

    record_property("killed_at", killed_at)
    record_property("unknown", len(unknown))
    record_property("unknown_received", len(unknown & set(per_contact)))
    record_property("received", len(received))
    record_property("seconds", round(time.monotonic() - started, 1))
