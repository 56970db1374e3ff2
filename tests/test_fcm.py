"""The fcm provider against a local FCM and token endpoint peer on loopback (tests/fcm_peer.py): the
request it sends, the access token (made once, shared by jobs, replaced on a 401 and before it
expires), how each answer is classed, 429s, bounded concurrency, commits, the address guard, that
no secret reaches an error or a log, and the provider's create body (api_service/schemas/provider_fcm.py)."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api_service.schemas import providers as provider_schemas  # noqa: F401  (first: the cycle with provider_fcm)
from api_service.schemas.provider_fcm import (
    CONFIG_FIELDS,
    FcmProviderCreate,
    check_fcm,
    endpoint_hosts,
    fcm_response,
)
from shared.channels.http_send import retry_after_s
from shared.channels.provider import (
    ADDRESS_DEAD,
    AUTH_FAILED,
    DEFERRED,
    INVALID_MESSAGE,
    REFUSED_PRIVATE_ADDRESS,
    REJECTED,
    TIMEOUT,
    TLS_UNAVAILABLE,
    OutgoingMessage,
    ProviderUnavailable,
    PushContent,
    SmsContent,
)
from shared.channels.registry import build_provider
from shared.kernel.errors import Invalid
from tests.fcm_peer import (  # noqa: F401  (fcm_peer: the fixture)
    PROJECT_ID,
    FcmPeer,
    device_token,
    fcm_peer,
    new_private_key,
    pem,
    rpc_error,
)
from tests.provider_helpers import (  # noqa: F401  (shared_clients_closed: autouse)
    RecordingCommit,
    check_a_failed_commit_ends_the_call,
    check_a_private_host_is_refused,
    check_a_withdrawn_message_is_never_sent,
    check_an_unreachable_api_is_retryable,
    check_in_flight_bounded_across_jobs,
    check_no_answer_is_an_unknown_outcome,
    job_sender,
    outcomes,
    shared_clients_closed,
)


def push(i: int, token: str | None = None, **content: Any) -> OutgoingMessage:
    return OutgoingMessage(contact_id=i, to=device_token(i) if token is None else token,
                           content=PushContent(**{"title": f"Hi {i}", "body": f"News {i}", **content}),
                           idempotency_key=f"{uuid.UUID(int=7)}:1:{i}:push")


send_job = job_sender("fcm", opened=False)


def assert_no_secret(peer: FcmPeer, *texts: str | None) -> None:
    """No line of the private key, no JWT (an assertion starts with the base64 of '{"typ"'), no access token."""
    key_lines = [line for line in pem(peer.private_key).splitlines() if len(line) > 40]
    for text in texts:
        for secret in (*key_lines, *peer.issued, "eyJ0eXAi", "ya29."):
            assert secret not in (text or ""), f"a secret in {text!r}"


# -- the request -------------------------------------------------------------------------------------


async def test_each_message_is_one_json_post_with_a_bearer_token_and_its_name_comes_back(fcm_peer):
    messages = [push(i) for i in range(4)]
    messages.append(push(4, image_url="https://cdn.example.com/a.png", url="https://example.com/sale",
                         data={"campaign": "spring", "n": "1"}))
    messages.append(push(5, url="http://example.com/plain", data={"url": "app://own"}))
    results = await send_job(fcm_peer, messages)
    assert [r.contact_id for r in results] == list(range(6)) and all(r.ok for r in results)
    [plain] = fcm_peer.received_by(device_token(2))
    assert plain.message == {"token": device_token(2), "notification": {"title": "Hi 2", "body": "News 2"}}
    assert results[2].provider_message_id == plain.name and plain.name.startswith(f"projects/{PROJECT_ID}/messages/")
    [rich] = fcm_peer.received_by(device_token(4))
    assert rich.notification == {"title": "Hi 4", "body": "News 4", "image": "https://cdn.example.com/a.png"}
    assert rich.data == {"campaign": "spring", "n": "1", "url": "https://example.com/sale"}
    assert rich.message["webpush"] == {"fcm_options": {"link": "https://example.com/sale"}}
    [http] = fcm_peer.received_by(device_token(5))
    assert http.data == {"url": "app://own"} and "webpush" not in http.message  # FCM takes only https links
    assert {r.access_token for r in fcm_peer.received} == set(fcm_peer.issued) and fcm_peer.token_requests == 1


async def test_what_cannot_be_sent_fails_alone_without_a_request(fcm_peer):
    sms = OutgoingMessage(contact_id=1, to=device_token(1), idempotency_key="k", content=SmsContent(body="hi"))
    results = await send_job(fcm_peer, [sms, push(2, token=""), push(3, token=device_token(3) + "\n"),
                                        push(4, title="", body=""), push(5)])
    assert outcomes(results) == [(False, False, INVALID_MESSAGE), (False, False, ADDRESS_DEAD),
                                 (False, False, ADDRESS_DEAD), (False, False, INVALID_MESSAGE), (True, False, None)]
    assert fcm_peer.counts()["send"] == 1


# -- the access token --------------------------------------------------------------------------------


async def test_the_token_is_made_once_and_shared_by_every_job(fcm_peer):
    # A cold start with ten requests at once still asks once: they all wait for that one answer.
    assert all(r.ok for r in await send_job(fcm_peer, [push(i) for i in range(20)], concurrency=10))
    for job in range(3):
        assert all(r.ok for r in await send_job(fcm_peer, [push(100 + job)]))
    both = await asyncio.gather(send_job(fcm_peer, [push(i) for i in range(200, 205)]),
                                send_job(fcm_peer, [push(i) for i in range(300, 305)]))
    assert all(r.ok for job in both for r in job)
    assert fcm_peer.token_requests == 1 and len(fcm_peer.received) == 33
    assert {r.access_token for r in fcm_peer.received} == {fcm_peer.issued[0]}


async def test_a_token_fcm_refuses_is_replaced_once_for_everyone(fcm_peer):
    assert (await send_job(fcm_peer, [push(1)]))[0].ok
    fcm_peer.expire_tokens()  # as if it had been revoked early
    results = await send_job(fcm_peer, [push(i) for i in range(2, 8)], concurrency=3)
    assert all(r.ok for r in results) and len(fcm_peer.received) == 7
    # Up to three requests went out with the old token; one new token served them all.
    assert fcm_peer.token_requests == 2 and 1 <= fcm_peer.counts()["unauthorized"] <= 3
    assert {r.access_token for r in fcm_peer.received[1:]} == {fcm_peer.issued[1]}


async def test_a_token_is_replaced_before_it_expires(fcm_peer):
    fcm_peer.configure(expires_in=2)  # renewed at half its life when that is under ten minutes
    assert (await send_job(fcm_peer, [push(1)]))[0].ok
    assert (await send_job(fcm_peer, [push(2)]))[0].ok
    await asyncio.sleep(1.1)
    assert (await send_job(fcm_peer, [push(3)]))[0].ok
    assert fcm_peer.counts() == {"requests": 5, "send": 3, "token": 2, "unauthorized": 0}


async def test_access_revoked_mid_job_stops_it_after_one_new_token(fcm_peer):
    fcm_peer.configure(revoke_after=2)
    results = await send_job(fcm_peer, [push(i) for i in range(1, 6)], concurrency=1)
    assert [r.failure for r in results] == [None, None, AUTH_FAILED, AUTH_FAILED, AUTH_FAILED]
    assert not any(r.retryable for r in results) and results[2].error.startswith("fcm 401 UNAUTHENTICATED")
    # The third message: a 401, a new token, a 401 again. The rest are not sent.
    assert fcm_peer.counts() == {"requests": 6, "send": 4, "token": 2, "unauthorized": 2}
    assert len(fcm_peer.received) == 2
    assert_no_secret(fcm_peer, *(r.error for r in results))


@pytest.mark.parametrize("refusal", ["deleted key", "another private key"])
async def test_a_key_the_token_endpoint_refuses_fails_the_job_and_sends_nothing(fcm_peer, refusal):
    commit = RecordingCommit()
    config: dict[str, Any] = {}
    if refusal == "deleted key":
        fcm_peer.configure(refuse_key=True)
    else:  # same account, a key Google never saw: the signature does not verify
        config["service_account_key"] = json.dumps(fcm_peer.service_account_info(private_key=pem(new_private_key())))
    results = await send_job(fcm_peer, [push(i) for i in range(6)], commit, concurrency=3, **config)
    assert set(outcomes(results)) == {(False, False, AUTH_FAILED)}
    assert results[0].error.startswith("fcm token endpoint 400: invalid_grant")
    assert "Signature" in results[0].error if refusal == "another private key" else "not found" in results[0].error
    assert fcm_peer.counts()["token"] == 1 and fcm_peer.counts()["send"] == 0 and commit.calls == []
    assert_no_secret(fcm_peer, *(r.error for r in results))


async def test_opening_tries_the_key_without_sending_anything(fcm_peer):
    provider = build_provider("fcm", fcm_peer.provider_config(), allow_private_networks=True)
    await provider.open()  # what POST /v1/providers/{id}/test does
    await provider.close()
    assert fcm_peer.counts() == {"requests": 1, "send": 0, "token": 1, "unauthorized": 0}
    other_key = fcm_peer.service_account_key(private_key=pem(new_private_key()))  # one Google never saw
    refused = build_provider("fcm", fcm_peer.provider_config(service_account_key=other_key),
                             allow_private_networks=True)
    with pytest.raises(ProviderUnavailable) as raised:
        await refused.open()
    assert (raised.value.retryable, raised.value.failure) == (False, AUTH_FAILED)
    assert str(raised.value).startswith("fcm token endpoint 400: invalid_grant")
    assert fcm_peer.counts()["send"] == 0 and fcm_peer.token_requests == 2


async def test_a_token_endpoint_without_an_answer_is_retryable_and_nothing_is_committed(fcm_peer):
    fcm_peer.configure(token_delay=1.0)
    commit = RecordingCommit()
    results = await send_job(fcm_peer, [push(1), push(2)], commit, timeout_s=0.3)
    assert outcomes(results) == [(False, True, TIMEOUT)] * 2 and commit.calls == []
    assert fcm_peer.counts()["send"] == 0 and fcm_peer.token_requests == 1  # both waited for the same request


# -- how answers are classed -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "message", "expected", "text"),
    [
        ({"unregistered": {device_token(1)}}, push(1), (False, False, ADDRESS_DEAD), "fcm 404 UNREGISTERED"),
        ({"mismatched": {device_token(1)}}, push(1), (False, False, ADDRESS_DEAD), "fcm 403 SENDER_ID_MISMATCH"),
        ({}, push(1, token="not-a-real-token"), (False, False, ADDRESS_DEAD),
         "fcm 400 INVALID_ARGUMENT: The registration token is not a valid"),
        ({}, push(1, data={"from": "me"}), (False, False, INVALID_MESSAGE), "fcm 400 INVALID_ARGUMENT: Invalid data"),
        ({}, push(1, body="x" * 5000), (False, False, INVALID_MESSAGE), "fcm 400 INVALID_ARGUMENT: Message is too big"),
        ({"third_party_auth": {device_token(1)}}, push(1), (False, False, AUTH_FAILED),
         "fcm 401 THIRD_PARTY_AUTH_ERROR"),
        ({"fail_transiently": {device_token(1): 1}}, push(1), (False, True, DEFERRED), "fcm 503 UNAVAILABLE"),
        ({"fail_transiently": {device_token(1): 1}, "transient_status": 500}, push(1), (False, True, DEFERRED),
         "fcm 500 INTERNAL"),
    ],
    ids=["unregistered", "sender_id_mismatch", "invalid_token", "reserved_data_key", "too_big", "third_party_auth",
         "unavailable", "internal"],
)
async def test_each_error_is_classed(fcm_peer, setup, message, expected, text):
    fcm_peer.configure(**setup)
    [result] = await send_job(fcm_peer, [message])
    assert outcomes([result]) == [expected] and result.error.startswith(text), result.error
    if expected[1]:  # transient: nothing was sent, the worker's retry goes through
        [again] = await send_job(fcm_peer, [message])
        assert again.ok and len(fcm_peer.received) == 1


async def test_a_refused_project_or_credential_stops_the_rest_of_the_job(fcm_peer):
    results = await send_job(fcm_peer, [push(i) for i in range(4)], concurrency=1, project_id="another-project")
    assert set(outcomes(results)) == {(False, False, AUTH_FAILED)}
    assert results[0].error.startswith("fcm 403 PERMISSION_DENIED") and results[1].error.startswith("not sent: ")
    assert fcm_peer.counts()["send"] == 1
    fcm_peer.clear()
    fcm_peer.configure(third_party_auth={device_token(0)})
    results = await send_job(fcm_peer, [push(i) for i in range(4)], concurrency=1)
    assert [r.failure for r in results] == [AUTH_FAILED] * 4 and fcm_peer.counts()["send"] == 1
    assert fcm_peer.token_requests == 0  # not our token's fault: the one it had is kept


async def test_a_not_found_that_is_not_unregistered_does_not_blame_the_token(fcm_peer):
    # A wrong base URL (or project path) answers 404 without an FcmError: the token stays on the contact.
    results = await send_job(fcm_peer, [push(1), push(2)], base_url=f"{fcm_peer.base_url}/nope")
    assert outcomes(results) == [(False, False, REJECTED)] * 2 and results[0].error.startswith("fcm 404 NOT_FOUND")


async def test_a_rate_limited_message_waits_and_goes_without_costing_an_attempt(fcm_peer):
    fcm_peer.configure(rate_limit={device_token(1): 2}, retry_after="0.3")
    commit = RecordingCommit()
    started = time.monotonic()
    [result] = await send_job(fcm_peer, [push(1)], commit)
    assert result.ok and time.monotonic() - started >= 0.6
    assert fcm_peer.attempts(device_token(1)) == 3 and len(fcm_peer.received) == 1
    assert [m.contact_id for m in commit.calls] == [1, 1, 1]  # committed again right before each request


async def test_an_unavailable_fcm_holds_the_account_as_long_as_it_asks(fcm_peer):
    fcm_peer.configure(fail_transiently={device_token(1): 1}, transient_retry_after="0.5")
    [result] = await send_job(fcm_peer, [push(1)])
    assert outcomes([result]) == [(False, True, DEFERRED)]
    started = time.monotonic()
    [again] = await send_job(fcm_peer, [push(1)])  # the worker's retry, or another job of the account
    assert again.ok and time.monotonic() - started >= 0.4


def test_retry_after_is_read_as_seconds_or_a_date_and_capped():
    assert retry_after_s("5") == 5 and retry_after_s("3600") == 60 and retry_after_s(None) == 1
    assert retry_after_s("soon") == 1 and retry_after_s("-4") == 0 and retry_after_s("nan") == 1


async def test_a_request_without_an_answer_is_an_unknown_outcome_not_resent(fcm_peer):
    await check_no_answer_is_an_unknown_outcome(fcm_peer, send_job, push)


async def test_an_unreachable_endpoint_is_retryable(fcm_peer):
    await check_an_unreachable_api_is_retryable(fcm_peer, send_job, push)


# -- concurrency and commits -------------------------------------------------------------------------


async def test_requests_in_flight_are_bounded_per_account_even_across_jobs(fcm_peer):
    await check_in_flight_bounded_across_jobs(fcm_peer, send_job, push, delay_s=0.2,
                                              within_s=12 * 0.2 / 2)  # serial would take 2.4 s


async def test_a_withdrawn_message_is_never_sent_and_commits_run_one_at_a_time(fcm_peer):
    await check_a_withdrawn_message_is_never_sent(fcm_peer, send_job, push, lambda m: m.to)


async def test_a_commit_that_fails_ends_the_call_and_nothing_more_is_sent(fcm_peer):
    await check_a_failed_commit_ends_the_call(fcm_peer, send_job, push, lambda m: m.to)


# -- the outbound address check and the settings at run time ------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
async def test_a_private_fcm_host_is_refused_unless_allowed(fcm_peer, host):
    await check_a_private_host_is_refused(fcm_peer, "fcm", push(1),
                                          base_url=f"http://{host}:{fcm_peer.port}")


async def test_a_private_token_endpoint_is_refused_too(fcm_peer):
    # A public base URL (a literal: nothing is resolved or connected), the key's token_uri on loopback.
    provider = build_provider("fcm", fcm_peer.provider_config(base_url="https://8.8.8.8"))
    with pytest.raises(ProviderUnavailable) as raised:
        await provider.open()
    assert (raised.value.retryable, raised.value.failure) == (False, REFUSED_PRIVATE_ADDRESS)
    assert "token_uri" in str(raised.value) and fcm_peer.requests == 0


async def test_credentials_go_over_http_only_when_allowed(fcm_peer):
    for config in ({"allow_insecure_auth": False},
                   {"base_url": "https://8.8.8.8", "allow_insecure_auth": False}):  # then the token_uri
        provider = build_provider("fcm", fcm_peer.provider_config(**config), allow_private_networks=True)
        with pytest.raises(ProviderUnavailable) as raised:
            await provider.open()
        assert (raised.value.retryable, raised.value.failure) == (False, TLS_UNAVAILABLE)
    assert fcm_peer.requests == 0


async def test_a_key_that_does_not_load_is_an_auth_failure_that_names_no_secret(fcm_peer):
    info = fcm_peer.service_account_info()
    broken = pem(fcm_peer.private_key).replace("\n", "").replace("-----BEGIN", "xx")
    for key in ("{not json", json.dumps({**info, "private_key": broken}), json.dumps({**info, "client_email": None})):
        provider = build_provider("fcm", fcm_peer.provider_config(service_account_key=key), allow_private_networks=True)
        [result] = await provider.send([push(1)])
        assert outcomes([result]) == [(False, False, AUTH_FAILED)]
        assert result.error.startswith("fcm service_account_key: ") and broken[20:60] not in result.error
        await provider.close()
    assert fcm_peer.requests == 0


# -- secrets ------------------------------------------------------------------------------------------


class EchoingPeer(FcmPeer):
    """A peer whose errors quote what it was sent: the assertion, the bearer token."""

    def _token(self, headers: Any, raw: bytes):
        if self.refuse_key:
            assertion = parse_qs(raw.decode())["assertion"][0]
            return 400, {"error": "invalid_grant", "error_description": f"bad assertion {assertion}"}, {}
        return super()._token(headers, raw)

    def _send(self, project: str, headers: Any, raw: bytes):
        answer = super()._send(project, headers, raw)
        if answer[0] != 200:
            return answer
        return rpc_error(400, "INVALID_ARGUMENT", f"cannot use {headers['Authorization']}")


async def test_no_key_assertion_or_access_token_reaches_an_error_or_a_log(capsys):
    with EchoingPeer() as peer:
        errors = [r.error for r in await send_job(peer, [push(1)])]
        peer.expire_tokens()  # a 401, then the token endpoint refuses the key
        peer.configure(refuse_key=True)
        errors += [r.error for r in await send_job(peer, [push(2)])]
        peer.configure(refuse_key=False, revoke_after=0)  # a 401, a new token, a 401
        errors += [r.error for r in await send_job(peer, [push(3)])]
        peer.configure(revoke_after=None)
        errors += [r.error for r in await send_job(peer, [push(4)], project_id="another-project")]
    assert errors[0] == "fcm 400 INVALID_ARGUMENT: cannot use Bearer [access_token]"
    assert errors[1] == "fcm token endpoint 400: invalid_grant (bad assertion [assertion])"
    assert errors[2].startswith("fcm 401 UNAUTHENTICATED") and errors[3].startswith("fcm 403 PERMISSION_DENIED")
    captured = capsys.readouterr()
    assert captured.err.count("fcm refused the credentials") == 3  # each logged once, with its error
    assert_no_secret(peer, *errors, captured.out, captured.err)


# -- the create body (api_service/schemas/provider_fcm.py) ----------------------------------------------

_AT = re.compile(r"at `\$\.([^`]*)`|unknown field `([^`]*)`")


def refused_field(peer: FcmPeer, **change: Any) -> str | None:
    """The field a create body with `change` is refused for (by its types or by check_fcm), or None."""
    key = peer.service_account_key(token_uri="https://oauth2.googleapis.com/token")
    body = {"kind": "fcm", "name": "push", "service_account_key": key, **change}
    try:
        data = msgspec.convert({k: v for k, v in body.items() if v is not None}, FcmProviderCreate)
    except msgspec.ValidationError as exc:
        m = _AT.search(str(exc))
        return (m.group(1) or m.group(2)) if m else "body"
    try:
        check_fcm(data)
    except Invalid as exc:
        assert "PRIVATE KEY" not in exc.reason and "eyJ" not in exc.reason
        return exc.field
    return None


def test_a_create_body_takes_the_key_file_as_text_with_defaults():
    peer = FcmPeer()
    key = peer.service_account_key(token_uri="https://oauth2.googleapis.com/token")
    data = msgspec.convert({"kind": "fcm", "name": "push", "service_account_key": key}, FcmProviderCreate)
    check_fcm(data)
    assert (data.channel, data.project_id, data.concurrency) == ("push", None, 10)
    assert data.base_url == "https://fcm.googleapis.com"
    assert CONFIG_FIELDS == ("rate_limits", "on_unknown", "weight", "service_account_key", "project_id", "base_url",
                             "allow_insecure_auth", "concurrency", "timeout_s")
    assert refused_field(peer, allow_insecure_auth=True) is None
    assert refused_field(peer, project_id="other-project", allow_insecure_auth=True) is None


def _ec_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"service_account_key": "{not json"}, "service_account_key"),
        ({"service_account_key": "[1, 2]"}, "service_account_key"),
        ({"key": {"client_email": None}}, "service_account_key"),
        ({"key": {"type": "authorized_user"}}, "service_account_key"),
        ({"key": {"private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"}},
         "service_account_key"),
        ({"key": {"private_key": "ec"}}, "service_account_key"),  # loads, but is no RSA key
        ({"key": {"token_uri": "ftp://oauth2.example.com/token"}}, "service_account_key"),
        ({"key": {"token_uri": "https://user:pw@oauth2.example.com/token"}}, "service_account_key"),
        ({"key": {"project_id": None}}, "project_id"),
        ({"key": {"project_id": "Bad Project"}}, "service_account_key"),
        ({"project_id": "Bad_Project"}, "project_id"),
        ({"project_id": "ok-project\n"}, "project_id"),
        ({"base_url": "http://fcm.example.com"}, "base_url"),  # the token in clear, not said
        ({"base_url": "https://fcm.example.com/?x=1"}, "base_url"),
        ({"service_account_key": "x" * 20000}, "service_account_key"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 101}, "concurrency"),
        ({"channel": "sms"}, "channel"),
        ({"auth_token": "t"}, "auth_token"),  # a setting of another kind
    ],
)
def test_invalid_fcm_settings_name_the_field(change, field):
    peer = FcmPeer()
    if "key" in change:
        override = {k: (_ec_pem() if v == "ec" else v) for k, v in change.pop("key").items()}
        info = {k: v for k, v in peer.service_account_info(**override).items() if v is not None}
        info["token_uri"] = override.get("token_uri", "https://oauth2.googleapis.com/token")
        change["service_account_key"] = json.dumps(info)
    assert refused_field(peer, **change) == field


def test_the_response_shows_who_the_key_is_never_the_key():
    peer = FcmPeer()
    now = datetime.now(timezone.utc)
    common = dict(id=uuid.uuid4(), name="push", channel="push", batch_size=50, batch_delay_ms=0, max_retries=3,
                  created_at=now, updated_at=now)
    config = {"service_account_key": peer.service_account_key(), "project_id": None, "base_url": peer.base_url,
              "allow_insecure_auth": True, "concurrency": 5, "timeout_s": 10.0}
    shown = fcm_response(common, config)
    assert (shown.service_account_key_set, shown.client_email) == (True, peer.client_email)
    assert shown.project_id == PROJECT_ID
    assert shown.private_key_id == peer.private_key_id and shown.concurrency == 5
    encoded = msgspec.json.encode(shown).decode()
    assert "PRIVATE KEY" not in encoded and '"kind":"fcm"' in encoded
    assert endpoint_hosts(config) == [("base_url", "127.0.0.1"), ("service_account_key", "127.0.0.1")]
    assert endpoint_hosts({"service_account_key": "{"}) == [("base_url", "fcm.googleapis.com")]


def test_the_schema_module_imports_first_or_second():
    # provider_fcm and providers.py import each other (once providers.py adds the kind): either order works.
    code = ("import msgspec, sys; import {first}; import {second}; from api_service.schemas.provider_fcm import "
            "FcmProviderCreate as C; "
            "print(msgspec.convert({{'name': 'n', 'service_account_key': '{{}}'}}, C).concurrency)")
    for first, second in (("api_service.schemas.provider_fcm", "api_service.schemas.providers"),
                          ("api_service.schemas.providers", "api_service.schemas.provider_fcm")):
        out = subprocess.run([sys.executable, "-c", code.format(first=first, second=second)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "10", out.stderr
