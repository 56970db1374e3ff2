"""The twilio provider against a local Twilio peer on loopback (tests/twilio_peer.py): the request
it sends, how each answer is classed, 429s, bounded concurrency, commits, the address guard, and
the provider's settings through /v1/providers."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.utils import formatdate
from typing import Any

import httpx
import msgspec
import pytest

from shared.channels import accounts, http_client, registry
from shared.channels.provider import (
    AUTH_FAILED,
    DEFERRED,
    INVALID_MESSAGE,
    OUTCOME_UNKNOWN,
    REFUSED_PRIVATE_ADDRESS,
    REJECTED,
    UNREACHABLE,
    WITHDRAWN,
    CommitFailed,
    EmailContent,
    OutgoingMessage,
    ProviderUnavailable,
    SmsContent,
)
from shared.channels.registry import build_provider
from shared.channels.twilio import ADDRESS_DEAD, TwilioProvider, retry_after_s
from shared.platform import db, netguard
from tests.tenant_env import tenant_env
from tests.twilio_peer import (  # noqa: F401  (twilio_peer: the fixture)
    ACCOUNT_SID,
    AUTH_TOKEN,
    FROM_NUMBER,
    TwilioPeer,
    twilio_peer,
)

SERVICE_SID = "MG" + "ab" * 16
KEY_SID, KEY_SECRET = "SK" + "cd" * 16, "key-secret-91e2"


@pytest.fixture(autouse=True)
async def twilio_registered(monkeypatch):
    """The kind as the registry will have it; each test's shared clients closed with its loop."""
    monkeypatch.setitem(registry.KINDS, "twilio", TwilioProvider)
    yield
    await http_client.close_all()


def sms(i: int, to: str | None = None, body: str | None = None) -> OutgoingMessage:
    return OutgoingMessage(contact_id=i, to=to or f"+1555000{i:04d}", content=SmsContent(body=f"Hi {i}" if body is None else body),
                           idempotency_key=f"{uuid.UUID(int=7)}:1:{i}:sms")


async def send_job(peer: TwilioPeer, messages: list[OutgoingMessage], commit=None, **config: Any):
    provider = build_provider("twilio", peer.provider_config(**config), allow_private_networks=True)
    await provider.open()
    try:
        return await provider.send(messages, commit)
    finally:
        await provider.close()


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
    commits: list[str] = []

    async def commit(m: OutgoingMessage) -> bool:
        commits.append(m.to)
        return True

    started = time.monotonic()
    [result] = await send_job(twilio_peer, [sms(1)], commit)
    assert result.ok and time.monotonic() - started >= 0.6
    assert twilio_peer.attempts("+15550000001") == 3 and len(twilio_peer.received) == 1
    assert commits == ["+15550000001"] * 3  # committed again before each request


def test_retry_after_is_read_as_seconds_or_a_date_and_capped():
    assert retry_after_s("5") == 5 and retry_after_s("0.5") == 0.5 and retry_after_s("3600") == 60
    assert retry_after_s(None) == retry_after_s("soon") == 1 and retry_after_s("-4") == 0
    assert 8 <= retry_after_s(formatdate(time.time() + 10, usegmt=True)) <= 10


async def test_a_request_without_an_answer_is_an_unknown_outcome_not_resent(twilio_peer):
    twilio_peer.configure(delay=1.0)
    [result] = await send_job(twilio_peer, [sms(1)], timeout_s=0.3)
    assert (result.ok, result.retryable, result.failure) == (False, False, OUTCOME_UNKNOWN)
    assert "ReadTimeout" in result.error
    await twilio_peer.wait_for(1)  # Twilio had it all along


async def test_an_unreachable_api_is_retryable(twilio_peer):
    twilio_peer.stop()
    results = await send_job(twilio_peer, [sms(1), sms(2)], timeout_s=2.0)
    assert [(r.ok, r.retryable, r.failure) for r in results] == [(False, True, UNREACHABLE)] * 2


async def test_what_is_not_an_sms_fails_alone(twilio_peer):
    email = OutgoingMessage(contact_id=1, to="+15550000001", idempotency_key="k", content=EmailContent(
        subject="s", html="", text="t", from_email="a@example.com"))
    results = await send_job(twilio_peer, [email, sms(2, body=""), sms(3)])
    assert [(r.ok, r.failure) for r in results] == [(False, INVALID_MESSAGE), (False, INVALID_MESSAGE), (True, None)]
    assert twilio_peer.requests == 1


@asynccontextmanager
async def raw_http(answer: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> AsyncIterator[str]:
    """An HTTP server on loopback that reads a request's head and lets `answer` write what it likes."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await answer(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_an_answer_is_read_up_to_a_bound_and_within_a_deadline():
    async def huge(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 8000000\r\n\r\n" + b'{"sid": "SM1", "x": "')
        for _ in range(1000):
            writer.write(b"x" * 8000)
            await writer.drain()

    async def drip(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with raw_http(huge) as url:
        provider = build_provider("twilio", {"account_sid": ACCOUNT_SID, "auth_token": "t", "base_url": url,
                                             "from_number": FROM_NUMBER}, allow_private_networks=True)
        [result] = await provider.send([sms(1)])
        assert (result.ok, result.provider_message_id) == (True, None)  # taken, its sid cut off
        await provider.close()
    async with raw_http(drip) as url:
        provider = build_provider("twilio", {"account_sid": ACCOUNT_SID, "auth_token": "t", "base_url": url,
                                             "from_number": FROM_NUMBER, "timeout_s": 0.2},
                                  allow_private_networks=True)
        started = time.monotonic()
        [result] = await provider.send([sms(1)])
        assert (result.ok, result.retryable, result.failure) == (False, False, OUTCOME_UNKNOWN)
        assert time.monotonic() - started < 1.5
        await provider.close()


# -- concurrency and commits -------------------------------------------------------------------------


async def test_requests_in_flight_are_bounded_per_account_even_across_jobs(twilio_peer):
    twilio_peer.configure(delay=0.1)
    started = time.monotonic()
    results = await send_job(twilio_peer, [sms(i) for i in range(12)], concurrency=3)
    assert [r.contact_id for r in results] == list(range(12)) and all(r.ok for r in results)
    assert twilio_peer.max_in_flight == 3 and time.monotonic() - started < 12 * 0.1
    twilio_peer.clear()
    # Two jobs of the same account at once share its bound
    both = await asyncio.gather(send_job(twilio_peer, [sms(i) for i in range(8)], concurrency=3),
                                send_job(twilio_peer, [sms(i) for i in range(8, 16)], concurrency=3))
    assert all(r.ok for job in both for r in job) and twilio_peer.max_in_flight == 3


async def test_a_withdrawn_message_is_never_sent(twilio_peer):
    in_commit = 0
    overlapped = False

    async def commit(m: OutgoingMessage) -> bool:
        nonlocal in_commit, overlapped
        in_commit += 1
        overlapped |= in_commit > 1
        await asyncio.sleep(0.01)
        in_commit -= 1
        return m.contact_id != 2

    results = await send_job(twilio_peer, [sms(i) for i in range(1, 6)], commit, concurrency=5)
    assert [(r.ok, r.failure) for r in results] == [(True, None), (False, WITHDRAWN), (True, None), (True, None),
                                                    (True, None)]
    assert twilio_peer.received_by("+15550000002") == [] and len(twilio_peer.received) == 4
    assert not overlapped  # commits run one at a time (a commit may hold one database connection)


async def test_a_commit_that_fails_ends_the_call_and_nothing_more_is_sent(twilio_peer):
    async def commit(m: OutgoingMessage) -> bool:
        if m.contact_id == 3:
            raise ConnectionRefusedError("postgres is away")
        return True

    with pytest.raises(CommitFailed) as raised:
        await send_job(twilio_peer, [sms(i) for i in range(1, 7)], commit, concurrency=1)
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    assert [r.to for r in twilio_peer.received] == ["+15550000001", "+15550000002"]


# -- the outbound address check ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
async def test_a_private_api_host_is_refused_unless_allowed(twilio_peer, host):
    provider = build_provider("twilio", twilio_peer.provider_config(base_url=f"http://{host}:{twilio_peer.port}"))
    with pytest.raises(ProviderUnavailable) as raised:
        await provider.open()
    assert (raised.value.retryable, raised.value.failure) == (False, REFUSED_PRIVATE_ADDRESS)
    [result] = await provider.send([sms(1)])
    assert (result.ok, result.retryable, result.failure) == (False, False, REFUSED_PRIVATE_ADDRESS)
    await provider.close()
    assert twilio_peer.requests == 0 and twilio_peer.connections == 0


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
