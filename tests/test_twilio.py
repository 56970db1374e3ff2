"""The twilio provider against a local Twilio peer on loopback (tests/twilio_peer.py): the request
it sends, how each answer is classed, 429s, bounded concurrency, commits, the address guard, and
the provider's settings through /v1/providers."""
from __future__ import annotations

import asyncio
import time
import uuid
from email.utils import formatdate
from typing import Any

import httpx
import msgspec
import pytest

from shared.channels import accounts, http_client
from shared.channels.http_send import retry_after_s
from shared.channels.provider import (
    AUTH_FAILED,
    DEFERRED,
    INVALID_MESSAGE,
    REJECTED,
    EmailContent,
    OutgoingMessage,
    SmsContent,
)
from shared.channels.registry import build_provider
from shared.channels.twilio import ADDRESS_DEAD
from shared.platform import db, netguard
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
    shared_clients_closed,
)
from tests.tenant_env import tenant_env
from tests.twilio_peer import (  # noqa: F401  (twilio_peer: the fixture)
    ACCOUNT_SID,
    AUTH_TOKEN,
    FROM_NUMBER,
    twilio_peer,
)

SERVICE_SID = "MG" + "ab" * 16
KEY_SID, KEY_SECRET = "SK" + "cd" * 16, "key-secret-91e2"


def sms(i: int, to: str | None = None, body: str | None = None) -> OutgoingMessage:
    return OutgoingMessage(contact_id=i, to=to or f"+1555000{i:04d}", content=SmsContent(body=f"Hi {i}" if body is None else body),
                           idempotency_key=f"{uuid.UUID(int=7)}:1:{i}:sms")


send_job = job_sender("twilio")


# -- the request -------------------------------------------------------------------------------------


async def test_each_message_is_one_form_post_with_basic_auth_and_the_sid_comes_back(twilio_peer):
    callback = "https://crier.example.com/v1/receipts/twilio"
    results = await send_job(twilio_peer, [sms(i) for i in range(5)], status_callback_url=callback)
    assert [r.contact_id for r in results] == list(range(5)) and all(r.ok for r in results)
    [got] = twilio_peer.received_by("+15550000003")
    assert (got.to, got.body, got.from_, got.status_callback) == ("+15550000003", "Hi 3", FROM_NUMBER, callback)
    assert got.auth == (ACCOUNT_SID, AUTH_TOKEN) and got.messaging_service_sid is None
    assert set(got.form) == {"To", "Body", "From", "StatusCallback"}
    assert results[3].provider_message_id == got.sid and got.sid.startswith("SM") and len(got.sid) == 34
    assert twilio_peer.requests == 5


async def test_a_messaging_service_and_an_api_key(twilio_peer):
    twilio_peer.api_keys[KEY_SID] = KEY_SECRET
    [result] = await send_job(twilio_peer, [sms(1, body="Grüße 👋")], from_number=None,
                              messaging_service_sid=SERVICE_SID, auth_token=None, api_key_sid=KEY_SID,
                              api_key_secret=KEY_SECRET)
    assert result.ok, result
    [got] = twilio_peer.received
    assert got.form == {"To": "+15550000001", "Body": "Grüße 👋", "MessagingServiceSid": SERVICE_SID}
    assert got.auth == (KEY_SID, KEY_SECRET)


async def test_a_job_reuses_the_accounts_connections_across_jobs(twilio_peer):
    for i in range(3):  # three jobs, each its own provider, as the workers build them
        assert (await send_job(twilio_peer, [sms(i)], concurrency=1))[0].ok
    assert twilio_peer.connections == 1


# -- how answers are classed -------------------------------------------------------------------------


async def test_recipient_failures_are_final_and_a_dead_number_says_so(twilio_peer):
    twilio_peer.configure(fail_permanently={"+15550000001": 21211, "+15550000002": 21610, "+15550000003": 21614,
                                            "+15550000004": 21408})
    results = await send_job(twilio_peer, [sms(i) for i in range(1, 6)] + [sms(6, to="0155 5000")])
    assert [(r.ok, r.retryable, r.failure) for r in results] == [
        (False, False, ADDRESS_DEAD), (False, False, ADDRESS_DEAD), (False, False, INVALID_MESSAGE),
        (False, False, REJECTED), (True, False, None), (False, False, ADDRESS_DEAD)]
    assert results[0].error.startswith("twilio 400 code 21211: The 'To' number +15550000001 is not a valid")
    assert results[1].error.startswith("twilio 400 code 21610")
    assert twilio_peer.attempts("0155 5000") == 0 and twilio_peer.requests == 5  # not E.164: never sent


async def test_a_server_error_is_retryable_and_the_retry_goes_through(twilio_peer):
    twilio_peer.configure(fail_transiently={"+15550000001": 1})
    first = await send_job(twilio_peer, [sms(1), sms(2)])
    assert [(r.ok, r.retryable, r.failure) for r in first] == [(False, True, DEFERRED), (True, False, None)]
    assert first[0].error.startswith("twilio 500 code 20500")
    [again] = await send_job(twilio_peer, [sms(1)])
    assert again.ok and len(twilio_peer.received_by("+15550000001")) == 1


async def test_bad_credentials_fail_the_rest_of_the_job_without_sending_it(twilio_peer):
    results = await send_job(twilio_peer, [sms(i) for i in range(6)], auth_token="wrong-token-77", concurrency=1)
    assert {(r.ok, r.retryable, r.failure) for r in results} == {(False, False, AUTH_FAILED)}
    assert twilio_peer.requests == 1 and results[0].error.startswith("twilio 401 code 20003")
    assert not any("wrong-token-77" in r.error for r in results)

    twilio_peer.clear()
    twilio_peer.configure(revoke_after=2)  # the token is rotated mid-job
    results = await send_job(twilio_peer, [sms(i) for i in range(5)], concurrency=1)
    assert [r.failure for r in results] == [None, None, AUTH_FAILED, AUTH_FAILED, AUTH_FAILED]
    assert twilio_peer.requests == 3 and len(twilio_peer.received) == 2
    assert not any(AUTH_TOKEN in (r.error or "") for r in results)


async def test_a_rate_limited_message_waits_and_goes_without_costing_an_attempt(twilio_peer):
    twilio_peer.configure(rate_limit={"+15550000001": 2}, retry_after="0.3")
    commit = RecordingCommit()
    started = time.monotonic()
    [result] = await send_job(twilio_peer, [sms(1)], commit)
    assert result.ok and time.monotonic() - started >= 0.6
    assert twilio_peer.attempts("+15550000001") == 3 and len(twilio_peer.received) == 1
    assert [m.to for m in commit.calls] == ["+15550000001"] * 3  # committed again before each request


def test_retry_after_is_read_as_seconds_or_a_date_and_capped():
    assert retry_after_s("5") == 5 and retry_after_s("0.5") == 0.5 and retry_after_s("3600") == 60
    assert retry_after_s(None) == retry_after_s("soon") == 1 and retry_after_s("-4") == 0
    assert 8 <= retry_after_s(formatdate(time.time() + 10, usegmt=True)) <= 10


async def test_a_request_without_an_answer_is_an_unknown_outcome_not_resent(twilio_peer):
    await check_no_answer_is_an_unknown_outcome(twilio_peer, send_job, sms)


async def test_an_unreachable_api_is_retryable(twilio_peer):
    await check_an_unreachable_api_is_retryable(twilio_peer, send_job, sms)


async def test_what_is_not_an_sms_fails_alone(twilio_peer):
    email = OutgoingMessage(contact_id=1, to="+15550000001", idempotency_key="k", content=EmailContent(
        subject="s", html="", text="t", from_email="a@example.com"))
    results = await send_job(twilio_peer, [email, sms(2, body=""), sms(3)])
    assert [(r.ok, r.failure) for r in results] == [(False, INVALID_MESSAGE), (False, INVALID_MESSAGE), (True, None)]
    assert twilio_peer.requests == 1


async def test_an_answer_is_read_up_to_a_bound_and_within_a_deadline():
    def config(url: str) -> dict[str, Any]:
        return {"account_sid": ACCOUNT_SID, "auth_token": "t", "base_url": url, "from_number": FROM_NUMBER}

    taken = await check_an_answer_is_read_up_to_a_bound_and_within_a_deadline(
        "twilio", config, sms(1), status="201 Created", start=b'{"sid": "SM1", "x": "')
    assert (taken.ok, taken.provider_message_id) == (True, None)  # taken, its sid cut off


# -- concurrency and commits -------------------------------------------------------------------------


async def test_requests_in_flight_are_bounded_per_account_even_across_jobs(twilio_peer):
    await check_in_flight_bounded_across_jobs(twilio_peer, send_job, sms)


async def test_a_withdrawn_message_is_never_sent(twilio_peer):
    await check_a_withdrawn_message_is_never_sent(twilio_peer, send_job, sms, lambda m: m.to)


async def test_a_commit_that_fails_ends_the_call_and_nothing_more_is_sent(twilio_peer):
    await check_a_failed_commit_ends_the_call(twilio_peer, send_job, sms, lambda m: m.to)


# -- the outbound address check ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
async def test_a_private_api_host_is_refused_unless_allowed(twilio_peer, host):
    await check_a_private_host_is_refused(twilio_peer, "twilio", sms(1),
                                          base_url=f"http://{host}:{twilio_peer.port}")


async def test_every_connection_of_the_guarded_transport_is_checked(twilio_peer):
    # The wall under open(): a connection made later (a name that now resolves inside) is refused too.
    transport = http_client.guarded_transport(allow_private=False, max_connections=2)
    async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
        with pytest.raises(netguard.PrivateAddressRefused):
            await client.post(f"{twilio_peer.base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
    assert twilio_peer.connections == 0
    allowed = http_client.guarded_transport(allow_private=True, max_connections=2)
    async with httpx.AsyncClient(transport=allowed, trust_env=False) as client:
        r = await client.post(f"{twilio_peer.base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
    assert r.status_code == 401 and r.json()["code"] == 20003


async def test_the_client_cache_is_bounded_and_never_closes_a_client_in_use(monkeypatch):
    monkeypatch.setattr(http_client, "MAX_CLIENTS", 2)

    def make() -> http_client.SharedClient:
        return http_client.SharedClient(client=httpx.AsyncClient(), in_flight=asyncio.Semaphore(1))

    held = http_client.acquire("a", make)  # a job still sends through it
    idle = []
    for key in ("b", "c", "d"):
        idle.append(http_client.acquire(key, make))
        http_client.release(idle[-1])
    await asyncio.sleep(0.05)  # evicted clients close in the background
    assert list(http_client._caches[asyncio.get_running_loop()]) == ["a", "d"]
    assert [s.client.is_closed for s in (held, *idle)] == [False, True, True, False]
    assert http_client.acquire("a", make) is held


# -- the settings through the API --------------------------------------------------------------------

TWILIO_BODY = {
    "name": "texts", "kind": "twilio", "account_sid": ACCOUNT_SID, "auth_token": "tw-secret-0042",
    "from_number": "+14155550100",
}


@pytest.fixture
async def env(settings):
    async with tenant_env(settings) as e:
        yield e


async def test_a_twilio_provider_keeps_its_token_and_never_returns_it(env, twilio_peer):
    created = await env.writer.call("POST", "/v1/providers", 201, json=TWILIO_BODY)
    assert (created["kind"], created["channel"], created["base_url"]) == ("twilio", "sms", "https://api.twilio.com")
    assert (created["auth_token_set"], created["api_key_secret_set"], created["concurrency"]) == (True, False, 10)
    pid = created["id"]
    for method, kw in (("GET", {}), ("PATCH", {"json": {"concurrency": 20, "status_callback_url":
                                                        "https://crier.example.com/r"}})):
        r = await env.writer.http.request(method, f"/v1/providers/{pid}", headers=env.writer.headers, **kw)
        assert r.status_code == 200 and "tw-secret" not in r.text and '"auth_token"' not in r.text, r.text
    listed = await env.reader.http.get("/v1/providers?kind=twilio", headers=env.reader.headers)
    assert listed.json()["total"] == 1 and "tw-secret" not in listed.text
    config = await env.sql("fetchval", "SELECT config FROM providers WHERE id = $1", uuid.UUID(pid))
    assert set(config["auth_token"]) == {"$sealed"} and config["concurrency"] == 20  # sealed at rest
    # A stored config, opened as the sender loads it, is what the sender builds the provider from
    peer_config = twilio_peer.provider_config()
    pid = (await env.writer.call("POST", "/v1/providers", 201, json={**TWILIO_BODY, **peer_config}))["id"]
    con = await db.connect(env.database_url)
    try:
        config = (await accounts.get(con, env.tenant_id, uuid.UUID(pid))).config
    finally:
        await con.close()
    assert (await env.writer.call("POST", f"/v1/providers/{pid}/test", 200)) == {"ok": True, "failure": None}
    provider = build_provider("twilio", config, allow_private_networks=True)
    await provider.open()
    [result] = await provider.send([sms(1)])
    await provider.close()
    assert result.ok and twilio_peer.received[0].auth == (ACCOUNT_SID, AUTH_TOKEN)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"account_sid": "AC123"}, "account_sid"),
        ({"from_number": "4155550100"}, "from_number"),
        ({"from_number": None}, "from_number"),  # and no messaging service
        ({"messaging_service_sid": "MGxyz"}, "messaging_service_sid"),
        ({"auth_token": None}, "auth_token"),  # and no API key
        ({"auth_token": ""}, "auth_token"),
        ({"api_key_sid": KEY_SID}, "api_key_secret"),
        ({"api_key_secret": "s"}, "api_key_sid"),
        ({"channel": "email"}, "channel"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 101}, "concurrency"),
        ({"base_url": "http://api.example.com"}, "base_url"),  # the token in clear, not said
        ({"base_url": "ftp://api.example.com"}, "base_url"),
        ({"base_url": "https://user:pw@api.example.com"}, "base_url"),
        ({"base_url": "https://api.example.com/?x=1"}, "base_url"),
        ({"status_callback_url": "crier.example.com/r"}, "status_callback_url"),
        ({"host": "smtp.example.com"}, "host"),  # a setting of another kind
    ],
)
async def test_invalid_twilio_settings_are_422_naming_the_field(env, change, field):
    body = {k: v for k, v in {**TWILIO_BODY, **change}.items() if v is not None}
    assert field in await env.writer.fields("POST", "/v1/providers", json=body)


async def test_an_api_key_or_a_messaging_service_is_enough(env):
    created = await env.writer.call("POST", "/v1/providers", 201, json={
        **{k: v for k, v in TWILIO_BODY.items() if k not in ("auth_token", "from_number")},
        "api_key_sid": KEY_SID, "api_key_secret": KEY_SECRET, "messaging_service_sid": SERVICE_SID})
    assert (created["auth_token_set"], created["api_key_sid"], created["api_key_secret_set"]) == (False, KEY_SID, True)
    assert created["from_number"] is None and created["messaging_service_sid"] == SERVICE_SID
    pid = created["id"]
    assert "api_key_sid" in await env.writer.fields("PATCH", f"/v1/providers/{pid}", json={"api_key_sid": None})
    assert "from_email" in await env.writer.fields("PATCH", f"/v1/providers/{pid}", json={"from_email": "a@b.co"})


async def test_a_private_api_host_is_422_when_private_networks_are_not_allowed(settings):
    async with tenant_env(msgspec.structs.replace(settings, allow_private_networks=False)) as strict:
        for host in ("127.0.0.1", "localhost", "10.0.0.1"):
            body = {**TWILIO_BODY, "base_url": f"https://{host}:8443"}
            assert await strict.writer.fields("POST", "/v1/providers", json=body) == ["base_url"]
        assert (await strict.writer.call("GET", "/v1/providers", 200))["total"] == 0
