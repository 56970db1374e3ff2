"""The whatsapp_cloud provider against a local Cloud API peer on loopback (tests/whatsapp_peer.py):
the request it sends, how each Graph error is classed, rate limits, bounded concurrency, commits,
the address guard, secrets; and the kind's API schema (api_service/schemas/provider_whatsapp.py)."""
from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import msgspec
import pytest
import structlog

from api_service.schemas.provider_whatsapp import (
    CONFIG_FIELDS,
    PATCH_FIELDS,
    SECRET_FIELDS,
    WhatsappProviderCreate,
    check_whatsapp,
    whatsapp_response,
)
from shared.channels import http_send, whatsapp_cloud
from shared.channels.http_send import parse_retry_after
from shared.channels.provider import (
    ADDRESS_DEAD,
    AUTH_FAILED,
    DEFERRED,
    INVALID_MESSAGE,
    REJECTED,
    TLS_UNAVAILABLE,
    OutgoingMessage,
    ProviderUnavailable,
    SmsContent,
    WhatsappContent,
)
from shared.channels.registry import build_provider
from shared.channels.whatsapp_cloud import (
    TemplateError,
    WhatsappCloudProvider,
    template_payload,
)
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
from tests.whatsapp_peer import (  # noqa: F401  (whatsapp_peer: the fixture)
    ACCESS_TOKEN,
    PHONE_NUMBER_ID,
    whatsapp_peer,
)


def number(i: int) -> str:
    return f"+1555000{i:04d}"


def wa(i: int, to: str | None = None, template: str = "order_update", language: str = "en",
       parameters: dict[str, str] | None = None) -> OutgoingMessage:
    if parameters is None:
        parameters = {"1": f"Ann {i}", "2": f"A-{i}", "button_url": f"track/{i}"}
    return OutgoingMessage(contact_id=i, to=to or number(i), idempotency_key=f"{uuid.UUID(int=7)}:1:{i}:whatsapp",
                           content=WhatsappContent(template_name=template, language=language, parameters=parameters))


send_job = job_sender("whatsapp_cloud")


def recorded(message: OutgoingMessage) -> str:
    """The message's recipient as the peer records it: digits, without the "+"."""
    return message.to.removeprefix("+")


# -- the request -------------------------------------------------------------------------------------


async def test_each_message_is_one_template_post_with_the_bearer_token_and_the_wamid_comes_back(whatsapp_peer):
    results = await send_job(whatsapp_peer, [wa(i) for i in range(5)])
    assert [r.contact_id for r in results] == list(range(5)) and all(r.ok for r in results)
    [got] = whatsapp_peer.received_by(number(3))
    assert got.body == {
        "messaging_product": "whatsapp", "recipient_type": "individual", "to": "15550000003", "type": "template",
        "template": {"name": "order_update", "language": {"code": "en"}, "components": [
            {"type": "body", "parameters": [{"type": "text", "text": "Ann 3"}, {"type": "text", "text": "A-3"}]},
            {"type": "button", "sub_type": "url", "index": "0", "parameters": [{"type": "text", "text": "track/3"}]},
        ]},
    }
    assert (got.to, got.template, got.language, got.parameters, got.buttons) == (
        "15550000003", "order_update", "en", ["Ann 3", "A-3"], {0: "track/3"})
    assert got.auth == ACCESS_TOKEN
    assert results[3].provider_message_id == got.wamid and got.wamid.startswith("wamid.")
    assert whatsapp_peer.requests == 5


async def test_named_parameters_and_a_template_without_any(whatsapp_peer):
    named = wa(1, template="named_greeting", parameters={"first_name": "Ann", "order_id": "A-1"})
    bare = wa(2, template="hello_world", language="en_US", parameters={})
    assert all(r.ok for r in await send_job(whatsapp_peer, [named, bare]))
    [got] = whatsapp_peer.received_by(number(1))
    assert got.named == {"first_name": "Ann", "order_id": "A-1"} and got.parameters == []
    assert got.body["template"]["components"] == [{"type": "body", "parameters": [
        {"type": "text", "parameter_name": "first_name", "text": "Ann"},
        {"type": "text", "parameter_name": "order_id", "text": "A-1"}]}]
    assert "components" not in whatsapp_peer.received_by(number(2))[0].body["template"]


def test_parameters_become_components():
    ten = {str(i): f"v{i}" for i in range(10, 0, -1)}  # numeric order, not text order: 1, 2, ... 10
    body = template_payload("+4915112345678", WhatsappContent(template_name="t", language="de", parameters=ten))
    assert body["to"] == "4915112345678"
    assert [p["text"] for p in body["template"]["components"][0]["parameters"]] == [f"v{i}" for i in range(1, 11)]
    buttons = template_payload("+1555", WhatsappContent(template_name="t", language="en", parameters={
        "button.2": "c", "button_url_1": "b", "button_url": "a"}))["template"]["components"]
    assert [(b["type"], b["sub_type"], b["index"], b["parameters"][0]["text"]) for b in buttons] == [
        ("button", "url", "0", "a"), ("button", "url", "1", "b"), ("button", "url", "2", "c")]
    for parameters, why in (({"1": "a", "name": "b"}, "mixed"), ({"1": "a", "3": "c"}, "without gaps"),
                            ({"1": ""}, "rendered empty")):
        with pytest.raises(TemplateError, match=why):
            template_payload("+1555", WhatsappContent(template_name="t", language="en", parameters=parameters))


async def test_what_cannot_be_sent_fails_alone_before_any_request(whatsapp_peer):
    messages = [
        OutgoingMessage(contact_id=1, to=number(1), idempotency_key="k", content=SmsContent(body="hi")),
        wa(2, to="0155 5000"),
        wa(3, to=number(3) + "\n"),
        wa(4, parameters={"1": "a", "first_name": "b"}),
        wa(5, parameters={"1": "Ann", "2": "", "button_url": "x"}),
        wa(6),
    ]
    results = await send_job(whatsapp_peer, messages)
    assert outcomes(results) == [(False, False, INVALID_MESSAGE), (False, False, ADDRESS_DEAD),
                                (False, False, ADDRESS_DEAD), (False, False, INVALID_MESSAGE),
                                (False, False, INVALID_MESSAGE), (True, False, None)]
    assert whatsapp_peer.requests == 1


async def test_the_accounts_connections_are_reused_across_jobs(whatsapp_peer):
    for i in range(3):  # three jobs, each its own provider, as the workers build them
        assert (await send_job(whatsapp_peer, [wa(i)], concurrency=1))[0].ok
    assert whatsapp_peer.connections == 1


# -- how answers are classed -------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "expected"), [
    (131026, (False, False, ADDRESS_DEAD)),  # not on WhatsApp, or cannot take it
    (131021, (False, False, ADDRESS_DEAD)),  # the recipient is the sender
    (131047, (False, False, REJECTED)),  # re-engagement: outside the 24 h window
    (131049, (False, False, REJECTED)),  # Meta chose not to deliver
    (100, (False, False, INVALID_MESSAGE)),
    (131008, (False, False, INVALID_MESSAGE)),
    (131009, (False, False, INVALID_MESSAGE)),
    (132005, (False, False, INVALID_MESSAGE)),
    (132007, (False, False, INVALID_MESSAGE)),
    (132012, (False, False, INVALID_MESSAGE)),
    (1, (False, True, DEFERRED)),
    (2, (False, True, DEFERRED)),
    (131000, (False, True, DEFERRED)),
    (131016, (False, True, DEFERRED)),
])
async def test_graph_error_codes_are_classed(whatsapp_peer, code, expected):
    whatsapp_peer.configure(fail_permanently={"15550000001": code})
    results = await send_job(whatsapp_peer, [wa(1), wa(2)])
    assert outcomes(results) == [expected, (True, False, None)]
    assert results[0].error.startswith(f"whatsapp 400 code {code}: (#{code})")
    assert "fbtrace_id" in results[0].error


async def test_the_peers_own_refusals_are_classed_like_metas(whatsapp_peer):
    whatsapp_peer.configure(not_on_whatsapp={"15550000001"})
    results = await send_job(whatsapp_peer, [
        wa(1),
        wa(2, template="no_such_template"),  # 404 code 132001
        wa(3, language="fr"),  # 132001 too: no such translation
        wa(4, parameters={"1": "only one", "button_url": "x"}),  # 132000: the template takes two
        wa(5),
    ])
    assert outcomes(results) == [(False, False, ADDRESS_DEAD)] + [(False, False, INVALID_MESSAGE)] * 3 + [
        (True, False, None)]
    assert results[0].error.startswith("whatsapp 400 code 131026: (#131026) Message undeliverable")
    assert results[1].error.startswith("whatsapp 404 code 132001")
    assert results[3].error.startswith("whatsapp 400 code 132000")


async def test_a_server_error_is_retryable_and_the_retry_goes_through(whatsapp_peer):
    whatsapp_peer.configure(fail_transiently={"15550000001": 1})
    first = await send_job(whatsapp_peer, [wa(1), wa(2)])
    assert outcomes(first) == [(False, True, DEFERRED), (True, False, None)]
    assert first[0].error.startswith("whatsapp 500 code 131000")
    [again] = await send_job(whatsapp_peer, [wa(1)])
    assert again.ok and len(whatsapp_peer.received_by(number(1))) == 1


async def test_a_bad_token_fails_the_rest_of_the_job_without_sending_it(whatsapp_peer):
    results = await send_job(whatsapp_peer, [wa(i) for i in range(6)], access_token="EAAwrong-token-77",
                             concurrency=1)
    assert set(outcomes(results)) == {(False, False, AUTH_FAILED)}
    assert whatsapp_peer.requests == 1 and results[0].error.startswith("whatsapp 401 code 190")
    assert results[1].error.startswith("not sent: whatsapp 401 code 190")

    whatsapp_peer.clear()
    whatsapp_peer.configure(revoke_after=2)  # the token expires mid-job
    results = await send_job(whatsapp_peer, [wa(i) for i in range(5)], concurrency=1)
    assert [r.failure for r in results] == [None, None, AUTH_FAILED, AUTH_FAILED, AUTH_FAILED]
    assert whatsapp_peer.requests == 3 and len(whatsapp_peer.received) == 2


@pytest.mark.parametrize("code", [10, 200, 131031, 368])
async def test_permission_and_account_errors_stop_the_job(whatsapp_peer, code):
    whatsapp_peer.configure(fail_permanently={"15550000000": code})
    results = await send_job(whatsapp_peer, [wa(i) for i in range(4)], concurrency=1)
    assert set(outcomes(results)) == {(False, False, AUTH_FAILED)} and whatsapp_peer.requests == 1


async def test_a_phone_number_id_the_token_cannot_use_stops_the_job(whatsapp_peer):
    results = await send_job(whatsapp_peer, [wa(i) for i in range(3)], phone_number_id="999", concurrency=1)
    assert set(outcomes(results)) == {(False, False, AUTH_FAILED)} and whatsapp_peer.requests == 1
    assert results[0].error.startswith("whatsapp 400 code 100/33: Unsupported post request")


# -- rate limits ---------------------------------------------------------------------------------------


async def test_a_429_waits_as_asked_and_goes_without_costing_an_attempt(whatsapp_peer):
    whatsapp_peer.configure(rate_limit={"15550000001": 2}, retry_after="0.3")
    commit = RecordingCommit()
    started = time.monotonic()
    [result] = await send_job(whatsapp_peer, [wa(1)], commit)  # one send(): the worker counts one attempt
    assert result.ok and time.monotonic() - started >= 0.6
    assert whatsapp_peer.attempts(number(1)) == 3 and len(whatsapp_peer.received) == 1
    assert [m.to for m in commit.calls] == [number(1)] * 3  # committed again right before each request


@pytest.mark.parametrize("code", [130429, 4, 80007, 131048])
async def test_throttling_errors_without_retry_after_back_off(whatsapp_peer, monkeypatch, code):
    monkeypatch.setattr(whatsapp_cloud, "BACKOFF_S", 0.1)
    whatsapp_peer.configure(rate_limit={"15550000001": 2}, rate_limit_status=400, rate_limit_code=code,
                            retry_after=None)
    started = time.monotonic()
    [result] = await send_job(whatsapp_peer, [wa(1)])
    assert result.ok and time.monotonic() - started >= 0.1 + 0.2  # 0.1, then doubled
    assert whatsapp_peer.attempts(number(1)) == 3


async def test_a_rate_limit_pauses_the_whole_account(whatsapp_peer):
    whatsapp_peer.configure(rate_limit={"15550000001": 1}, retry_after="0.5", delay=0.05)
    started = time.time()
    results = await send_job(whatsapp_peer, [wa(1)] + [wa(i) for i in range(2, 6)], concurrency=2)
    assert all(r.ok for r in results)
    # The first of the others may have gone with the 429; the ones after it waited for the pause.
    assert whatsapp_peer.received_by(number(5))[0].at - started >= 0.5


async def test_a_pair_rate_limit_holds_only_that_recipient(whatsapp_peer, monkeypatch):
    monkeypatch.setattr(whatsapp_cloud, "BACKOFF_S", 0.5)
    whatsapp_peer.configure(rate_limit={"15550000001": 1}, rate_limit_status=400, rate_limit_code=131056,
                            retry_after=None)
    started = time.time()
    results = await send_job(whatsapp_peer, [wa(1)] + [wa(i) for i in range(2, 6)], concurrency=2)
    assert all(r.ok for r in results)
    [first], [last] = whatsapp_peer.received_by(number(1)), whatsapp_peer.received_by(number(5))
    assert first.at - started >= 0.5 and first.at - last.at >= 0.3  # the others went on meanwhile


async def test_a_message_rate_limited_too_often_fails_retryable(whatsapp_peer, monkeypatch):
    monkeypatch.setattr(http_send, "MAX_RATE_LIMITED", 3)
    whatsapp_peer.configure(rate_limit={"15550000001": 5}, retry_after="0")
    [result] = await send_job(whatsapp_peer, [wa(1)])
    assert (result.ok, result.retryable, result.failure) == (False, True, DEFERRED)
    assert whatsapp_peer.attempts(number(1)) == 3


def test_retry_after_is_read_as_seconds_or_a_date_and_capped():
    assert parse_retry_after("5") == 5 and parse_retry_after("0.5") == 0.5 and parse_retry_after("3600") == 60
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("-4") == 0
    assert 8 <= parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10


# -- no answer -----------------------------------------------------------------------------------------


async def test_a_request_without_an_answer_is_an_unknown_outcome_not_resent(whatsapp_peer):
    await check_no_answer_is_an_unknown_outcome(whatsapp_peer, send_job, wa)


async def test_an_unreachable_api_is_retryable(whatsapp_peer):
    await check_an_unreachable_api_is_retryable(whatsapp_peer, send_job, wa)


def raw_config(url: str, **overrides: Any) -> dict[str, Any]:
    return {"phone_number_id": PHONE_NUMBER_ID, "access_token": ACCESS_TOKEN, "base_url": url,
            "allow_insecure_auth": True, **overrides}


async def test_an_answer_is_read_up_to_a_bound_and_within_a_deadline():
    taken = await check_an_answer_is_read_up_to_a_bound_and_within_a_deadline(
        "whatsapp_cloud", raw_config, wa(1), start=b'{"messages": [{"id": "wamid.1", "x": "')
    assert (taken.ok, taken.provider_message_id) == (True, None)  # taken, its id cut off


# -- concurrency and commits -------------------------------------------------------------------------


async def test_requests_in_flight_are_bounded_per_number_even_across_jobs(whatsapp_peer):
    await check_in_flight_bounded_across_jobs(whatsapp_peer, send_job, wa)


async def test_a_withdrawn_message_is_never_sent(whatsapp_peer):
    await check_a_withdrawn_message_is_never_sent(whatsapp_peer, send_job, wa, recorded)


async def test_a_commit_that_fails_ends_the_call_and_nothing_more_is_sent(whatsapp_peer):
    await check_a_failed_commit_ends_the_call(whatsapp_peer, send_job, wa, recorded)


# -- the outbound address check and the settings --------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
async def test_a_private_api_host_is_refused_unless_allowed(whatsapp_peer, host):
    await check_a_private_host_is_refused(whatsapp_peer, "whatsapp_cloud", wa(1),
                                          base_url=f"http://{host}:{whatsapp_peer.port}")


@pytest.mark.parametrize(("change", "failure"), [
    ({"allow_insecure_auth": False}, TLS_UNAVAILABLE),  # http: the token would go in clear
    ({"phone_number_id": "../../me"}, REJECTED),
    ({"api_version": "v21.0/../x"}, REJECTED),
    ({"base_url": "ftp://example.com"}, REJECTED),
])
async def test_settings_that_would_misuse_the_token_send_nothing(whatsapp_peer, change, failure):
    provider = build_provider("whatsapp_cloud", whatsapp_peer.provider_config(**change), allow_private_networks=True)
    with pytest.raises(ProviderUnavailable) as raised:
        await provider.open()
    assert (raised.value.retryable, raised.value.failure) == (False, failure)
    await provider.close()
    assert whatsapp_peer.requests == 0


async def test_the_token_is_never_in_a_result_or_a_log(whatsapp_peer):
    async def echo(head: bytes, writer: asyncio.StreamWriter) -> None:  # a server that repeats the token back
        body = ('{"error": {"message": "bad token %s", "code": 131009}}' % ACCESS_TOKEN).encode()
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    whatsapp_peer.configure(rate_limit={"15550000002": 1}, retry_after="0")
    with structlog.testing.capture_logs() as logs:
        results = await send_job(whatsapp_peer, [wa(1), wa(2)], access_token=ACCESS_TOKEN + "x", concurrency=1)
        results += await send_job(whatsapp_peer, [wa(1), wa(2)])
        async with raw_http(echo) as url:
            provider = build_provider("whatsapp_cloud", raw_config(url), allow_private_networks=True)
            results += await provider.send([wa(3)])
            await provider.close()
    assert [r.failure for r in results] == [AUTH_FAILED, AUTH_FAILED, None, None, INVALID_MESSAGE]
    assert results[-1].error == "whatsapp 400 code 131009: bad token [access_token]"
    assert logs and not any(ACCESS_TOKEN in repr(entry) for entry in logs)
    assert not any(ACCESS_TOKEN in (r.error or "") for r in results)


# -- the schema ------------------------------------------------------------------------------------------

BODY = {"kind": "whatsapp_cloud", "name": "wa", "phone_number_id": PHONE_NUMBER_ID, "access_token": ACCESS_TOKEN}


def test_a_create_takes_the_defaults_and_splits_config_from_columns():
    data = msgspec.convert(BODY, WhatsappProviderCreate)
    check_whatsapp(data)
    assert (data.channel, data.api_version, data.base_url, data.concurrency, data.allow_insecure_auth) == (
        "whatsapp", "v21.0", "https://graph.facebook.com", 10, False)
    assert CONFIG_FIELDS == ("rate_limits", "on_unknown", "weight", "phone_number_id", "access_token", "app_secret",
                             "verify_token", "api_version", "base_url", "allow_insecure_auth", "concurrency", "timeout_s")
    assert SECRET_FIELDS == ("access_token", "app_secret", "verify_token") and set(PATCH_FIELDS) <= set(CONFIG_FIELDS)
    # The stored config is what the provider is built from
    config = {f: getattr(data, f) for f in CONFIG_FIELDS}
    assert WhatsappCloudProvider(config).config.access_token == ACCESS_TOKEN


@pytest.mark.parametrize(("change", "field"), [
    ({"phone_number_id": "12a"}, "phone_number_id"),
    ({"phone_number_id": ""}, "phone_number_id"),
    ({"access_token": ""}, "access_token"),
    ({"access_token": "EAA bad"}, "access_token"),
    ({"access_token": "EAA\r\nX-Evil: 1"}, "access_token"),
    ({"api_version": "21.0"}, "api_version"),
    ({"api_version": "v21"}, "api_version"),
    ({"channel": "sms"}, "channel"),
    ({"concurrency": 0}, "concurrency"),
    ({"concurrency": 101}, "concurrency"),
    ({"batch_size": 0}, "batch_size"),
    ({"base_url": "graph.facebook.com"}, "base_url"),
    ({"account_sid": "AC1"}, "account_sid"),  # a setting of another kind
])
def test_invalid_settings_name_the_field(change, field):
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.convert({**BODY, **change}, WhatsappProviderCreate)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode({**BODY, **change}), type=WhatsappProviderCreate)


@pytest.mark.parametrize("base_url", ["http://graph.example.com", "https://graph.example.com/?x=1",
                                      "https://graph.example.com/#x", "https://user:pw@graph.example.com"])
def test_cross_field_rules_of_the_base_url(base_url):
    with pytest.raises(Invalid) as raised:
        check_whatsapp(msgspec.convert({**BODY, "base_url": base_url}, WhatsappProviderCreate))
    assert raised.value.field == "base_url"


def test_http_needs_allow_insecure_auth_and_the_response_never_holds_the_token():
    check_whatsapp(msgspec.convert({**BODY, "base_url": "http://127.0.0.1:8098", "allow_insecure_auth": True},
                                   WhatsappProviderCreate))
    stored = {f: getattr(msgspec.convert(BODY, WhatsappProviderCreate), f) for f in CONFIG_FIELDS}
    for name, kind in PATCH_FIELDS.items():  # a PATCH takes what a create takes
        assert msgspec.convert(stored[name], kind) == stored[name]
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert("not valid!", kind)
    common = dict(id=uuid.uuid4(), name="wa", channel="whatsapp", batch_size=50, batch_delay_ms=0, max_retries=3,
                  created_at=datetime.now(timezone.utc), updated_at=datetime.now(timezone.utc))
    shown = msgspec.json.encode(whatsapp_response(common, {k: v for k, v in BODY.items() if k in CONFIG_FIELDS}))
    assert ACCESS_TOKEN.encode() not in shown and b'"access_token_set":true' in shown
    assert b'"kind":"whatsapp_cloud"' in shown and b'"api_version":"v21.0"' in shown
