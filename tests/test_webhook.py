"""The webhook provider against a local Standard Webhooks receiver on loopback (tests/webhook_peer.py):
the signed request, the same webhook-id on every attempt, how each answer is classed, 429s,
redirects, bounded concurrency, commits, the address guard, secrets kept out of errors, and the
settings' checks (api_service/schemas/provider_webhook.py)."""
from __future__ import annotations

import asyncio
import base64
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import httpx
import msgspec
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from api_service.schemas.provider_webhook import (
    CONFIG_FIELDS,
    PATCH_FIELDS,
    SECRET_FIELDS,
    WebhookProvider,
    WebhookProviderCreate,
    check_webhook,
    webhook_response,
)
from shared.channels.provider import (
    AUTH_FAILED,
    DEFERRED,
    INVALID_MESSAGE,
    REJECTED,
    UNREACHABLE,
    OutgoingMessage,
    ProviderUnavailable,
    SmsContent,
    WebhookContent,
)
from shared.channels.registry import build_provider
from shared.channels.webhook import USER_AGENT, new_secret, secret_bytes
from shared.channels.webhook import WebhookProvider as WebhookSender
from shared.kernel.errors import Invalid
from tests.provider_helpers import (  # noqa: F401  (shared_clients_closed: autouse)
    RecordingCommit,
    check_a_failed_commit_ends_the_call,
    check_a_private_host_is_refused,
    check_a_withdrawn_message_is_never_sent,
    check_an_answer_is_read_up_to_a_bound_and_within_a_deadline,
    check_an_unreachable_api_is_retryable,
    check_in_flight_bounded_across_jobs,
    check_no_answer_is_an_unknown_outcome,
    job_sender,
    outcomes,
    raw_http,
    shared_clients_closed,
)
from tests.webhook_peer import webhook_peer  # noqa: F401  (the fixture)

RUN = uuid.UUID(int=7)


def hook(i: int, payload: Any = None) -> OutgoingMessage:
    payload = {"hello": f"contact {i}", "n": i} if payload is None else payload
    return OutgoingMessage(contact_id=i, to=str(i), idempotency_key=f"{RUN}:1:{i}:webhook",
                           content=WebhookContent(payload=payload))


send_job = job_sender("webhook")


# -- the request -------------------------------------------------------------------------------------


async def test_each_message_is_one_signed_json_post_that_standardwebhooks_verifies(webhook_peer):
    before = int(time.time())
    results = await send_job(webhook_peer, [hook(i) for i in range(5)], headers={"Authorization": "Bearer r-77"})
    assert [r.contact_id for r in results] == list(range(5)) and all(r.ok for r in results)
    got = {d.id: d for d in webhook_peer.received}
    assert set(got) == {f"{RUN}:1:{i}:webhook" for i in range(5)} and webhook_peer.refused == []
    d = got[f"{RUN}:1:3:webhook"]
    assert results[3].provider_message_id == d.id
    assert d.body["type"] == "broadcast.message" and d.body["timestamp"].endswith("Z")
    assert d.body["data"] == {"contact_id": 3, "payload": {"hello": "contact 3", "n": 3}}
    assert before <= d.timestamp <= time.time() and d.path == "/hooks/crier"
    assert d.headers["content-type"] == "application/json"
    assert d.headers["user-agent"] == USER_AGENT and "Crier" in USER_AGENT
    assert d.headers["authorization"] == "Bearer r-77"
    assert d.headers["webhook-signature"].startswith("v1,")
    # A receiver's own check, on what went over the wire
    assert Webhook(webhook_peer.secret).verify(d.raw, d.headers) == d.body


async def test_a_tampered_request_does_not_verify(webhook_peer):
    [result] = await send_job(webhook_peer, [hook(1)])
    assert result.ok
    [d] = webhook_peer.received
    verifier = Webhook(webhook_peer.secret)
    tampered_body = d.raw.replace(b"contact 1", b"contact 2")
    signature = d.headers["webhook-signature"]
    forged = signature[:-6] + ("A" if signature[-6] != "A" else "B") + signature[-5:]
    for raw, headers in [
        (tampered_body, d.headers),
        (d.raw, {**d.headers, "webhook-signature": forged}),
        (d.raw, {**d.headers, "webhook-id": d.id + "x"}),  # the id is signed: no replay under another id
        (d.raw, {**d.headers, "webhook-timestamp": str(d.timestamp + 1)}),
        (d.raw, {k: v for k, v in d.headers.items() if k != "webhook-signature"}),
    ]:
        with pytest.raises(WebhookVerificationError):
            verifier.verify(raw, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(d.raw, d.headers)


async def test_the_peer_refuses_a_bad_signature_and_a_stale_timestamp(webhook_peer):
    signer = Webhook(webhook_peer.secret)
    body = '{"type": "broadcast.message", "data": {}}'

    async def post(headers: dict[str, str]) -> int:
        async with httpx.AsyncClient(trust_env=False) as client:
            return (await client.post(webhook_peer.url, content=body, headers=headers)).status_code

    def signed(at: float) -> dict[str, str]:
        stamp = int(at)
        return {"webhook-id": "msg_1", "webhook-timestamp": str(stamp),
                "webhook-signature": signer.sign("msg_1", _utc(stamp), body)}

    assert await post(signed(time.time())) == 200
    assert await post(signed(time.time() - 301)) == 401  # signed right, but older than 5 minutes
    assert await post({**signed(time.time()), "webhook-signature": "v1,bm9wZQ=="}) == 401
    assert await post({**signed(time.time()), "webhook-signature": "garbage"}) == 401
    assert await post({}) == 401
    assert len(webhook_peer.received) == 1 and len(webhook_peer.refused) == 4


def _utc(stamp: int) -> datetime:
    return datetime.fromtimestamp(stamp, timezone.utc)


async def test_a_retried_message_carries_the_same_webhook_id_and_a_fresh_signature(webhook_peer):
    webhook_peer.configure(fail_transiently=1)
    message = hook(1)
    [first] = await send_job(webhook_peer, [message])
    assert outcomes([first]) == [(False, True, DEFERRED)] and first.error.startswith("webhook 500")
    [second] = await send_job(webhook_peer, [message])  # the worker's retry: the same message again
    assert second.ok and webhook_peer.ids == [message.idempotency_key] * 2
    [d] = webhook_peer.received
    assert d.id == message.idempotency_key == second.provider_message_id
    # Delivered twice (an outcome-unknown retried by hand, say): the receiver sees the same id and drops it
    await asyncio.sleep(0.01)
    [third] = await send_job(webhook_peer, [message])
    assert third.ok and webhook_peer.duplicates == 1
    earlier, again = webhook_peer.received
    # Signed anew at each attempt (its own time), under the same id
    assert again.id == earlier.id and again.body["timestamp"] > earlier.body["timestamp"]
    assert again.headers["webhook-signature"] != earlier.headers["webhook-signature"]


async def test_the_body_is_exactly_what_was_signed_whatever_the_payload(webhook_peer):
    payloads = ["plain", ["a", 1, None, True], {"ünïcødé": "👋 \"quoted\" \\ </script>"}, 12.5, None]
    results = await send_job(webhook_peer, [OutgoingMessage(contact_id=i, to=str(i), idempotency_key=f"k:{i}",
                                                            content=WebhookContent(payload=p))
                                            for i, p in enumerate(payloads)])
    assert all(r.ok for r in results) and webhook_peer.refused == []
    by_contact = {d.body["data"]["contact_id"]: d.body["data"]["payload"] for d in webhook_peer.received}
    assert by_contact == dict(enumerate(payloads))


async def test_a_job_reuses_the_accounts_connections_across_jobs(webhook_peer):
    for i in range(3):  # three jobs, each its own provider, as the workers build them
        assert (await send_job(webhook_peer, [hook(i)], concurrency=1))[0].ok
    assert webhook_peer.connections == 1


# -- how answers are classed -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, (True, False, None)), (201, (True, False, None)), (202, (True, False, None)), (204, (True, False, None)),
        (400, (False, False, REJECTED)), (404, (False, False, REJECTED)), (413, (False, False, REJECTED)),
        (422, (False, False, REJECTED)),
        (408, (False, True, DEFERRED)), (425, (False, True, DEFERRED)),
        (500, (False, True, DEFERRED)), (502, (False, True, DEFERRED)), (503, (False, True, DEFERRED)),
        (401, (False, False, AUTH_FAILED)), (403, (False, False, AUTH_FAILED)), (410, (False, False, REJECTED)),
        (301, (False, False, REJECTED)), (308, (False, False, REJECTED)),
    ],
)
async def test_each_answer_is_classed(webhook_peer, status, expected):
    webhook_peer.configure(status_for={f"{RUN}:1:1:webhook": status})
    results = await send_job(webhook_peer, [hook(1), hook(2)], concurrency=1)
    assert outcomes(results)[0] == expected
    if expected[0]:
        assert results[0].provider_message_id == f"{RUN}:1:1:webhook"
    else:
        assert results[0].error.startswith(f"webhook {status}")
    # Only a refused login and a removed endpoint end the job; any other answer is this message's alone
    assert results[1].ok is (status not in (401, 403, 410))


async def test_a_removed_endpoint_or_a_refused_signature_ends_the_job(webhook_peer):
    webhook_peer.configure(gone_after=2)
    results = await send_job(webhook_peer, [hook(i) for i in range(5)], concurrency=1)
    assert outcomes(results) == [(True, False, None)] * 2 + [(False, False, REJECTED)] * 3
    assert results[2].error.startswith("webhook 410") and results[3].error.startswith("not sent: webhook 410")
    assert webhook_peer.requests == 3 and len(webhook_peer.received) == 2

    webhook_peer.clear()
    webhook_peer.configure(gone_after=None)
    wrong = new_secret()
    results = await send_job(webhook_peer, [hook(i) for i in range(4)], secret=wrong, concurrency=1)
    assert outcomes(results) == [(False, False, AUTH_FAILED)] * 4
    assert webhook_peer.requests == 1 and webhook_peer.refused == ["No matching signature found"]


async def test_a_rate_limited_message_waits_and_goes_without_costing_an_attempt(webhook_peer):
    webhook_peer.configure(rate_limit=2, retry_after="0.3")
    commit = RecordingCommit()
    started = time.monotonic()
    [result] = await send_job(webhook_peer, [hook(1)], commit)
    assert result.ok and time.monotonic() - started >= 0.6
    assert webhook_peer.attempts(f"{RUN}:1:1:webhook") == 3 and len(webhook_peer.received) == 1
    assert [m.contact_id for m in commit.calls] == [1, 1, 1]  # committed again before each request


async def test_a_429_pauses_every_request_of_the_account(webhook_peer):
    webhook_peer.configure(rate_limit=1, retry_after="0.6")
    started = time.time()
    first = asyncio.create_task(send_job(webhook_peer, [hook(1)]))
    while webhook_peer.requests < 1:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # its 429 is in: the account is paused
    [other] = await send_job(webhook_peer, [hook(2)])  # another job of the same account
    [result] = await first
    assert result.ok and other.ok and webhook_peer.requests == 3
    # Nothing reached the peer while the account was paused
    assert min(d.at for d in webhook_peer.received) - started >= 0.55


async def test_a_redirect_is_not_followed(webhook_peer):
    webhook_peer.configure(redirect="/hooks/elsewhere")
    [result] = await send_job(webhook_peer, [hook(1)])
    assert outcomes([result]) == [(False, False, REJECTED)] and "redirects are not followed" in result.error
    assert webhook_peer.requests == 1 and webhook_peer.received == []


async def test_a_request_without_an_answer_is_an_unknown_outcome_not_resent(webhook_peer):
    await check_no_answer_is_an_unknown_outcome(webhook_peer, send_job, hook)


async def test_an_unreachable_endpoint_is_retryable(webhook_peer):
    await check_an_unreachable_api_is_retryable(webhook_peer, send_job, hook)


async def test_what_is_not_a_webhook_or_not_json_fails_alone(webhook_peer):
    sms = OutgoingMessage(contact_id=1, to="1", idempotency_key="k1", content=SmsContent(body="hi"))
    results = await send_job(webhook_peer, [sms, hook(2, {"x": object()}), hook(3)])
    assert outcomes(results) == [(False, False, INVALID_MESSAGE)] * 2 + [(True, False, None)]
    assert webhook_peer.requests == 1


def raw_config(url: str, **overrides: Any) -> dict[str, Any]:
    return {"url": url, "secret": new_secret(), "allow_insecure": True, **overrides}


async def test_an_answer_is_read_up_to_a_bound_and_within_a_deadline():
    taken = await check_an_answer_is_read_up_to_a_bound_and_within_a_deadline(
        "webhook", lambda url: raw_config(f"{url}/hook"), hook(1))
    assert taken.ok  # taken; the rest of the answer is not read


async def test_secrets_never_reach_an_error_even_when_the_receiver_echoes_them():
    async def echo(head: bytes, writer: asyncio.StreamWriter) -> None:  # a debugging endpoint, failing
        writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(head) + head)

    config = raw_config("", headers={"X-Api-Key": "key-9f8e7d6c5b4a"})
    async with raw_http(echo) as url:
        provider = build_provider("webhook", {**config, "url": f"{url}/hook"}, allow_private_networks=True)
        [result] = await provider.send([hook(1)])
        await provider.close()
    assert outcomes([result]) == [(False, True, DEFERRED)] and "x-api-key: ***" in result.error.lower()
    assert "key-9f8e7d6c5b4a" not in result.error
    # A secret that is not one, and a refused connection: neither text holds it
    secret = config["secret"]
    bad = build_provider("webhook", {**config, "url": "http://127.0.0.1:9/h", "secret": "whsec_!" + secret[7:]},
                         allow_private_networks=True)
    with pytest.raises(ProviderUnavailable) as raised:
        await bad.open()
    assert raised.value.failure == AUTH_FAILED and secret[7:] not in str(raised.value)
    assert raised.value.__cause__ is None
    gone = build_provider("webhook", {**config, "url": "http://127.0.0.1:9/h"}, allow_private_networks=True)
    [result] = await gone.send([hook(1)])
    assert result.failure == UNREACHABLE and secret not in result.error and "key-9f8e7d6c5b4a" not in result.error


# -- concurrency and commits -------------------------------------------------------------------------


async def test_requests_in_flight_are_bounded_per_account_even_across_jobs(webhook_peer):
    await check_in_flight_bounded_across_jobs(webhook_peer, send_job, hook)


async def test_a_withdrawn_message_is_never_sent_and_commits_go_one_at_a_time(webhook_peer):
    await check_a_withdrawn_message_is_never_sent(webhook_peer, send_job, hook, lambda m: m.idempotency_key)


async def test_a_commit_that_fails_ends_the_call_and_nothing_more_is_sent(webhook_peer):
    await check_a_failed_commit_ends_the_call(webhook_peer, send_job, hook, lambda m: m.idempotency_key)


# -- the outbound address check and the settings -----------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "10.0.0.1"])
async def test_a_private_host_is_refused_unless_allowed(webhook_peer, host):
    await check_a_private_host_is_refused(webhook_peer, "webhook", hook(1),
                                          url=f"http://{host}:{webhook_peer.port}/h")


async def test_plain_http_needs_allow_insecure(webhook_peer):
    provider = build_provider("webhook", webhook_peer.provider_config(allow_insecure=False),
                              allow_private_networks=True)
    with pytest.raises(ProviderUnavailable) as raised:
        await provider.open()
    assert raised.value.failure == REJECTED and "allow_insecure" in str(raised.value)
    assert webhook_peer.requests == 0


def test_a_new_secret_is_a_standard_webhooks_secret():
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("whsec_") and len(secret_bytes(a)) == 32
    assert Webhook(a).sign("id", _utc(1), "{}") == Webhook(secret_bytes(a)).sign("id", _utc(1), "{}")
    for bad in ("whsec_" + base64.b64encode(b"x" * 23).decode(), "whsec_" + base64.b64encode(b"x" * 65).decode(),
                base64.b64encode(b"x" * 32).decode(), "whsec_" + "!" * 44, "whsec_abcde"):
        with pytest.raises(ValueError) as raised:
            secret_bytes(bad)
        assert bad[6:] not in str(raised.value)


SECRET = new_secret()
BODY = {"kind": "webhook", "name": "hooks", "url": "https://hooks.example.com/crier?tenant=7", "secret": SECRET}


def create(**change: Any) -> WebhookProviderCreate:
    data = msgspec.convert({k: v for k, v in {**BODY, **change}.items() if v is not None}, WebhookProviderCreate)
    check_webhook(data)
    return data


def test_valid_settings_and_their_defaults():
    data = create(headers={"Authorization": "Bearer x", "X-Tenant": "7"})
    assert (data.channel, data.concurrency, data.timeout_s, data.allow_insecure) == ("webhook", 10, 10.0, False)
    assert create(url="http://hooks.example.com/h", allow_insecure=True).url.startswith("http://")
    assert CONFIG_FIELDS == ("rate_limits", "on_unknown", "weight", "url", "secret", "headers", "allow_insecure",
                             "concurrency", "timeout_s")
    assert set(SECRET_FIELDS) <= set(CONFIG_FIELDS) and set(PATCH_FIELDS) == set(CONFIG_FIELDS) - {"rate_limits", "on_unknown", "weight"}  # every kind's


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"url": "http://hooks.example.com/h"}, "url"),  # clear text, not said
        ({"url": "ftp://hooks.example.com/h"}, "url"),
        ({"url": "https://user:pw@hooks.example.com/h"}, "url"),
        ({"url": "https://hooks.example.com/h#frag"}, "url"),
        ({"url": "https://hooks.example.com:99999/h"}, "url"),
        ({"url": None}, "url"),
        ({"secret": None}, "secret"),  # the tenant gives it
        ({"secret": SECRET[6:]}, "secret"),
        ({"secret": "whsec_" + base64.b64encode(b"s" * 16).decode()}, "secret"),
        ({"secret": "whsec_" + base64.b64encode(b"s" * 23).decode()}, "secret"),
        ({"secret": "whsec_" + "A" * 33}, "secret"),  # not whole base64
        ({"headers": {"Host": "evil.example.com"}}, "headers"),
        ({"headers": {"content-length": "1"}}, "headers"),
        ({"headers": {"Webhook-Signature": "v1,x"}}, "headers"),
        ({"headers": {"User-Agent": "x"}}, "headers"),
        ({"headers": {"X-A": "1", "x-a": "2"}}, "headers"),
        ({"headers": {"X Y": "1"}}, "headers"),
        ({"headers": {"X-Y": "a\r\nHost: evil"}}, "headers"),
        ({"headers": {"X-Y": "é"}}, "headers"),
        ({"headers": {f"X-{i}": "1" for i in range(11)}}, "headers"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 101}, "concurrency"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"channel": "email"}, "channel"),
        ({"host": "smtp.example.com"}, "host"),  # a setting of another kind
    ],
)
def test_invalid_settings_name_the_field_and_never_the_secret(change, field):
    with pytest.raises((msgspec.ValidationError, Invalid)) as raised:
        create(**change)
    error = raised.value
    if isinstance(error, Invalid):
        assert error.field == field
    else:  # msgspec names the field's path, or the field itself when it is missing or unknown
        assert f"`$.{field}" in str(error) or f"field `{field}`" in str(error), str(error)
    assert SECRET[6:] not in str(error) and "evil" not in str(error)


def test_the_answer_holds_no_secret():
    data = create(headers={"Authorization": "Bearer hidden-1234"})
    common = dict(id=uuid.uuid4(), name="hooks", channel="webhook", batch_size=50, batch_delay_ms=5000,
                  max_retries=3, created_at=_utc(0), updated_at=_utc(0))
    answer = webhook_response(common, {f: getattr(data, f) for f in CONFIG_FIELDS})
    assert isinstance(answer, WebhookProvider) and answer.secret_set and answer.header_names == ["Authorization"]
    text = msgspec.json.encode(answer).decode()
    assert SECRET[6:] not in text and "hidden-1234" not in text and '"kind":"webhook"' in text
    # Nor does a repr, should one be logged
    config = {f: getattr(data, f) for f in CONFIG_FIELDS}
    for shown in (repr(data), repr(WebhookSender(config).config)):
        assert SECRET[6:] not in shown and "hidden-1234" not in shown and "hooks.example.com" in shown
