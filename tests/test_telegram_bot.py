"""The telegram_bot provider against a local Bot API peer on loopback (tests/telegram_peer.py): the
requests it makes, MarkdownV2 as Crier renders it, how each answer is classed, 429s, bounded
concurrency, commits, the address guard, the token kept out of every error and log line, and the
provider's settings (api_service/schemas/provider_telegram.py)."""
from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import httpx
import msgspec
import pytest

from api_service.schemas import provider_telegram as schema
from shared.channels import http_client
from shared.channels.accounts import DEFAULT_MAX_RETRIES
from shared.channels.provider import (
    ADDRESS_DEAD,
    AUTH_FAILED,
    DEFERRED,
    INVALID_MESSAGE,
    OUTCOME_UNKNOWN,
    REJECTED,
    UNREACHABLE,
    OutgoingMessage,
    ProviderUnavailable,
    SmsContent,
    TelegramContent,
)
from shared.channels.registry import build_provider
from shared.channels.telegram_bot import (
    MAX_CAPTION_CHARS,
    _asked_wait_s,
    classify,
    shown_length,
)
from shared.kernel.content import Content, TelegramPart
from shared.kernel.errors import Invalid
from shared.platform.logging import configure_logging
from shared.sending.render import ChannelRenderer
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
from tests.telegram_peer import (  # noqa: F401  (telegram_peer: the fixture)
    BOT_TOKEN,
    EntityError,
    check_markdown_v2,
    telegram_peer,
)

SECRET = BOT_TOKEN.partition(":")[2]


def tg(i: int, text: str | None = None, to: str | None = None, **content: Any) -> OutgoingMessage:
    return OutgoingMessage(contact_id=i, to=to or str(1000 + i), idempotency_key=f"{uuid.UUID(int=7)}:1:{i}:telegram",
                           content=TelegramContent(text=f"Hi {i}" if text is None else text, **content))


send_job = job_sender("telegram_bot")


# -- the requests ------------------------------------------------------------------------------------


async def test_a_text_with_a_button_is_one_send_message_and_the_message_id_comes_back(telegram_peer):
    results = await send_job(telegram_peer, [
        tg(1, "*Sale* today\\!", button_label="Shop", button_url="https://shop.example.com/?c=1"),
        tg(2, to="@crier_news"),
    ])
    assert [(r.ok, r.provider_message_id) for r in results] == [(True, "1001:1"), (True, "@crier_news:1")]
    [got] = telegram_peer.received_by("1001")
    assert (got.method, got.text, got.shown, got.parse_mode) == ("sendMessage", "*Sale* today\\!", "Sale today!",
                                                                  "MarkdownV2")
    assert got.button == ("Shop", "https://shop.example.com/?c=1") and got.encoding == "json"
    assert got.params["chat_id"] == 1001 and "link_preview_options" not in got.params  # an int, Telegram's type
    assert telegram_peer.received_by("@crier_news")[0].params["chat_id"] == "@crier_news"
    again = await send_job(telegram_peer, [tg(1)])
    assert again[0].provider_message_id == "1001:2"


async def test_photo_and_video_go_with_the_text_as_caption(telegram_peer):
    photo = "https://cdn.example.com/p.jpg"
    results = await send_job(telegram_peer, [
        tg(1, "A *photo*", media_url=photo, media_type="photo", button_label="Open", button_url="https://e.co/1"),
        tg(2, "A video\\.", media_url="https://cdn.example.com/v.mp4", media_type="video"),
        tg(3, "", media_url=photo, media_type="photo"),  # media alone: no caption
        tg(4, "x", media_url=photo, media_type="gif"),
    ])
    assert outcomes(results) == [(True, False, None)] * 3 + [(False, False, INVALID_MESSAGE)]
    one, two, three = (telegram_peer.received_by(c)[0] for c in ("1001", "1002", "1003"))
    assert (one.method, one.media_url, one.text, one.shown, one.button) == (
        "sendPhoto", photo, "A *photo*", "A photo", ("Open", "https://e.co/1"))
    assert one.params["parse_mode"] == "MarkdownV2" and "text" not in one.params
    assert (two.method, two.media_type, two.shown) == ("sendVideo", "video", "A video.")
    assert "caption" not in three.params and "parse_mode" not in three.params
    assert telegram_peer.requests == 3


async def test_link_previews_can_be_turned_off(telegram_peer):
    await send_job(telegram_peer, [tg(1, "see https://example\\.com")], link_previews=False)
    assert telegram_peer.received[0].params["link_preview_options"] == {"is_disabled": True}


async def test_a_job_reuses_the_bots_connections_across_jobs(telegram_peer):
    for i in range(3):  # three jobs, each its own provider, as the workers build them
        assert (await send_job(telegram_peer, [tg(i)], concurrency=1))[0].ok
    assert telegram_peer.connections == 1


# -- MarkdownV2 --------------------------------------------------------------------------------------


async def test_what_crier_renders_is_valid_markdown_v2_and_values_arrive_literally(telegram_peer):
    content = Content(telegram=TelegramPart(
        text="*Hello {{ name }}*\\! Your code: `{{ code }}` [details](https://example.com/{{ id }}) ~{{ n }}~",
        action_label="Open {{ name }}", action_url="https://example.com/o/{{ id }}"))
    rendered = ChannelRenderer(content, "telegram").render({"name": "*_[", "code": "a.b", "id": "7", "n": -1.5}, None)
    assert isinstance(rendered, TelegramContent) and "\\*\\_\\[" in rendered.text
    message = OutgoingMessage(contact_id=1, to="1001", idempotency_key="k", content=rendered)
    [result] = await send_job(telegram_peer, [message])
    assert result.ok, result
    [got] = telegram_peer.received
    assert got.text == rendered.text
    assert got.shown == "Hello *_[! Your code: a.b details -1.5"  # the value shows as typed, not as markup
    assert got.button == ("Open *_[", "https://example.com/o/7")


async def test_markup_telegram_cannot_parse_is_an_invalid_message(telegram_peer):
    results = await send_job(telegram_peer, [tg(1, "Sale ends at 5.30"), tg(2, "*never closed"),
                                             tg(3, "fine\\.")])
    assert outcomes(results) == [(False, False, INVALID_MESSAGE)] * 2 + [(True, False, None)]
    assert results[0].error == ("telegram 400: Bad Request: can't parse entities: Character '.' is reserved and "
                                "must be escaped with the preceding '\\'")
    assert "Can't find end of Bold entity at byte offset 0" in results[1].error


@pytest.mark.parametrize("text", [
    "plain", "*b* _i_ __u__ ~s~ ||sp||", "\\.\\!\\\\", "`co.de` and ```py\nx = 1.0\n```",
    "[a link](https://e.co/x\\)y) ![👍](tg://emoji?id=1)", ">quoted\n>lines", "Grüße 👋 \\- ok",
])
def test_the_shown_length_never_counts_more_than_telegram_shows(text):
    assert shown_length(text) <= len(check_markdown_v2(text))


def test_the_peer_refuses_what_telegram_refuses():
    for bad in ("a.b", "a-b", "(x)", "*a _b* c_", "`open", "[x](y", "x]", "tail\\"):
        with pytest.raises(EntityError):
            check_markdown_v2(bad)


async def test_a_caption_over_the_limit_fails_unsent_and_one_that_shows_shorter_goes(telegram_peer):
    photo = {"media_url": "https://cdn.example.com/p.jpg", "media_type": "photo"}
    long = "x" * (MAX_CAPTION_CHARS + 1)
    escaped = "\\." * MAX_CAPTION_CHARS  # 2048 characters of source, 1024 shown
    results = await send_job(telegram_peer, [tg(1, long, **photo), tg(2, escaped, **photo), tg(3, long),
                                             tg(4, "y" * 4097)])
    assert outcomes(results) == [(False, False, INVALID_MESSAGE), (True, False, None), (True, False, None),
                                 (False, False, INVALID_MESSAGE)]
    assert "at most 1024" in results[0].error and "at most 4096" in results[3].error
    assert telegram_peer.attempts("1001") == 0 and telegram_peer.attempts("1004") == 0  # refused before sending
    assert telegram_peer.received_by("1002")[0].shown == "." * MAX_CAPTION_CHARS


# -- how answers are classed -------------------------------------------------------------------------


async def test_chats_that_will_never_take_a_message_are_dead_addresses(telegram_peer):
    telegram_peer.configure(blocked={"1001"}, unknown={"1002"}, forbidden={
        "1003": "user is deactivated", "1004": "bot was kicked from the group chat",
        "1005": "bot is not a member of the channel chat"}, migrated={"-1006": -1001234567890})
    results = await send_job(telegram_peer, [tg(i) for i in range(1, 6)] + [tg(6, to="-1006"), tg(7),
                                                                              tg(8, to="not a chat")])
    assert outcomes(results) == [(False, False, ADDRESS_DEAD)] * 4 + [
        (False, False, REJECTED), (False, False, INVALID_MESSAGE), (True, False, None), (False, False, ADDRESS_DEAD)]
    assert results[0].error == "telegram 403: Forbidden: bot was blocked by the user"
    assert results[1].error == "telegram 400: Bad Request: chat not found"
    assert results[5].error.startswith("telegram 400 (the chat moved, its new chat id is -1001234567890): Bad ")
    assert telegram_peer.attempts("not a chat") == 0 and telegram_peer.requests == 7


async def test_a_server_error_is_retryable_and_the_retry_goes_through(telegram_peer):
    telegram_peer.configure(fail_transiently={"1001": 1})
    first = await send_job(telegram_peer, [tg(1), tg(2)])
    assert outcomes(first) == [(False, True, DEFERRED), (True, False, None)]
    assert first[0].error == "telegram 500: Internal Server Error"
    [again] = await send_job(telegram_peer, [tg(1)])
    assert again.ok and len(telegram_peer.received_by("1001")) == 1


async def test_a_refused_token_fails_the_rest_of_the_job_without_sending_it(telegram_peer):
    wrong = "7000001:AAH-wrong_token_0000000000000000000"
    results = await send_job(telegram_peer, [tg(i) for i in range(6)], bot_token=wrong, concurrency=1)
    assert set(outcomes(results)) == {(False, False, AUTH_FAILED)}
    assert telegram_peer.requests == 1 and results[0].error == "telegram 401: Unauthorized"
    assert results[1].error == "not sent: telegram 401: Unauthorized"

    telegram_peer.clear()
    telegram_peer.configure(revoke_after=2)  # the token is revoked mid-job
    results = await send_job(telegram_peer, [tg(i) for i in range(5)], concurrency=1)
    assert [r.failure for r in results] == [None, None, AUTH_FAILED, AUTH_FAILED, AUTH_FAILED]
    assert telegram_peer.requests == 3 and len(telegram_peer.received) == 2


async def test_a_bot_that_does_not_exist_is_a_refused_token(telegram_peer, all_logs):
    # Telegram answers 404 Not Found for a token that names no bot.
    results = await send_job(telegram_peer, [tg(1), tg(2)], bot_token="no-such-bot", concurrency=1)
    assert outcomes(results) == [(False, False, AUTH_FAILED)] * 2
    assert results[0].error == "telegram 404: Not Found" and telegram_peer.requests == 1
    logs = all_logs()
    assert "telegram refused the bot token" in logs and "/bot<token>/sendMessage" in logs
    assert "no-such-bot" not in logs  # a token of another shape is not split into a public part


@pytest.mark.parametrize(("status", "description", "parameters", "expected"), [
    (400, "Bad Request: chat not found", None, (ADDRESS_DEAD, False)),
    (400, "Bad Request: PEER_ID_INVALID", None, (ADDRESS_DEAD, False)),
    (400, "Bad Request: can't parse entities: x", None, (INVALID_MESSAGE, False)),
    (400, "Bad Request: wrong file identifier/HTTP URL specified", None, (INVALID_MESSAGE, False)),
    (400, "Bad Request: group chat was upgraded to a supergroup chat", {"migrate_to_chat_id": -100},
     (INVALID_MESSAGE, False)),
    (401, "Unauthorized", None, (AUTH_FAILED, False)),
    (404, "Not Found", None, (AUTH_FAILED, False)),
    (403, "Forbidden: bot was blocked by the user", None, (ADDRESS_DEAD, False)),
    (403, "Forbidden: user is deactivated", None, (ADDRESS_DEAD, False)),
    (403, "Forbidden: bot was kicked from the supergroup chat", None, (ADDRESS_DEAD, False)),
    (403, "Forbidden: bot can't initiate conversation with a user", None, (REJECTED, False)),
    (409, "Conflict", None, (REJECTED, False)),
    (502, "Bad Gateway", None, (DEFERRED, True)),
])
def test_each_answer_has_its_class(status, description, parameters, expected):
    assert classify(status, description, parameters) == expected


async def test_a_rate_limited_message_waits_and_goes_without_costing_an_attempt(telegram_peer):
    telegram_peer.configure(rate_limit={"1001": 2}, retry_after=0.3)
    commit = RecordingCommit()
    started = time.monotonic()
    [result] = await send_job(telegram_peer, [tg(1)], commit)
    assert result.ok and time.monotonic() - started >= 0.6
    assert telegram_peer.attempts("1001") == 3 and len(telegram_peer.received) == 1
    assert [m.to for m in commit.calls] == ["1001"] * 3  # committed again before each request


async def test_a_429_pauses_the_whole_bot_across_jobs(telegram_peer):
    telegram_peer.configure(rate_limit={"1001": 1}, retry_after=0.5)
    first = asyncio.create_task(send_job(telegram_peer, [tg(1)]))
    clients = http_client._caches
    while not any(s.resume_at for s in clients.get(asyncio.get_running_loop(), {}).values()):
        await asyncio.sleep(0.005)  # until the 429 paused the bot's shared client
    paused_at = time.time()
    [other] = await send_job(telegram_peer, [tg(2)])  # another job of the same bot, another chat
    assert other.ok and (await first)[0].ok
    assert telegram_peer.received_by("1002")[0].at - paused_at >= 0.4


async def test_rate_limited_too_often_in_a_row_is_retryable_later(telegram_peer):
    telegram_peer.configure(rate_limit={"1001": 50}, retry_after=0)
    [result] = await send_job(telegram_peer, [tg(1)])
    assert outcomes([result]) == [(False, True, DEFERRED)] and telegram_peer.attempts("1001") == 10


def test_retry_after_is_read_from_the_parameters_and_capped():
    assert _asked_wait_s({"retry_after": 5}, None) == 5 and _asked_wait_s({"retry_after": 3600}, None) == 60
    assert _asked_wait_s({}, "2") == 2 and _asked_wait_s(None, None) == 1
    assert _asked_wait_s({"retry_after": "x"}, None) == 1
    assert _asked_wait_s({"retry_after": -3}, None) == 0


async def test_a_request_without_an_answer_is_an_unknown_outcome_not_resent(telegram_peer):
    await check_no_answer_is_an_unknown_outcome(telegram_peer, send_job, tg)


async def test_an_unreachable_api_is_retryable(telegram_peer):
    await check_an_unreachable_api_is_retryable(telegram_peer, send_job, tg)


async def test_what_is_not_a_telegram_message_fails_alone(telegram_peer):
    sms = OutgoingMessage(contact_id=1, to="1001", idempotency_key="k", content=SmsContent(body="hi"))
    results = await send_job(telegram_peer, [sms, tg(2, "  "), tg(3)])
    assert outcomes(results) == [(False, False, INVALID_MESSAGE)] * 2 + [(True, False, None)]
    assert telegram_peer.requests == 1


# -- concurrency and commits -------------------------------------------------------------------------


async def test_requests_in_flight_are_bounded_per_bot_even_across_jobs(telegram_peer):
    await check_in_flight_bounded_across_jobs(telegram_peer, send_job, tg)
    provider = build_provider("telegram_bot", telegram_peer.provider_config(concurrency=500))
    assert provider.concurrency == 30  # Telegram's own bound, whatever the config says


async def test_a_withdrawn_message_is_never_sent_and_commits_go_one_at_a_time(telegram_peer):
    await check_a_withdrawn_message_is_never_sent(telegram_peer, send_job, tg, lambda m: m.to)


async def test_a_commit_that_fails_ends_the_call_and_nothing_more_is_sent(telegram_peer):
    await check_a_failed_commit_ends_the_call(telegram_peer, send_job, tg, lambda m: m.to)


# -- the outbound address check and plain http -------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
async def test_a_private_api_host_is_refused_unless_allowed(telegram_peer, host):
    await check_a_private_host_is_refused(telegram_peer, "telegram_bot", tg(1),
                                          base_url=f"http://{host}:{telegram_peer.port}")


async def test_plain_http_needs_allow_insecure_auth(telegram_peer):
    provider = build_provider("telegram_bot", telegram_peer.provider_config(allow_insecure_auth=False),
                              allow_private_networks=True)
    with pytest.raises(ProviderUnavailable):
        await provider.open()
    [result] = await provider.send([tg(1)])  # the worker's path: every message fails, none is sent
    await provider.close()
    assert outcomes([result]) == [(False, False, REJECTED)] and "allow_insecure_auth" in result.error
    assert telegram_peer.requests == 0


# -- the token stays secret --------------------------------------------------------------------------


@pytest.fixture
def all_logs(capsys):
    """Every structlog line (debug up) and every httpx log record, as text."""
    configure_logging("json", "debug")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    httpx_log, handler = logging.getLogger("httpx"), Keep()
    level = httpx_log.level
    httpx_log.setLevel(logging.DEBUG)
    httpx_log.addHandler(handler)
    try:
        yield lambda: capsys.readouterr().err + "\n".join(records)
    finally:
        httpx_log.removeHandler(handler)
        httpx_log.setLevel(level)
        configure_logging("console", os.environ.get("CRIER_TEST_LOG_LEVEL", "warning"))


async def test_the_token_is_in_no_error_and_no_log_line(telegram_peer, all_logs, monkeypatch):
    errors: list[str] = []
    telegram_peer.configure(rate_limit={"1001": 1}, retry_after=0, fail_transiently={"1002": 1})
    errors += [r.error or "" for r in await send_job(telegram_peer, [tg(1), tg(2), tg(3)])]
    telegram_peer.configure(revoke_after=0)
    errors += [r.error or "" for r in await send_job(telegram_peer, [tg(4), tg(5)])]
    telegram_peer.configure(revoke_after=None, delay=0.5)
    errors += [r.error or "" for r in await send_job(telegram_peer, [tg(6)], timeout_s=0.1)]  # a read timeout

    # Exceptions whose message holds the request's URL (httpx's do, for some): scrubbed too
    async def failing(message, request):
        method, body = request
        raise {"6": httpx.ConnectError, "7": RuntimeError}[str(body["chat_id"])[-1]](
            f"cannot POST {telegram_peer.base_url}/bot{BOT_TOKEN}/{method} ({SECRET})")

    provider = build_provider("telegram_bot", telegram_peer.provider_config(), allow_private_networks=True)
    monkeypatch.setattr(provider, "_post", failing)
    results = await provider.send([tg(6), tg(7)])
    await provider.close()
    assert outcomes(results) == [(False, True, UNREACHABLE), (False, False, OUTCOME_UNKNOWN)]
    assert "/bot<token>/sendMessage (<token>)" in results[0].error
    errors += [r.error or "" for r in results]
    telegram_peer.stop()
    errors += [r.error or "" for r in await send_job(telegram_peer, [tg(8)], timeout_s=1.0)]

    logs = all_logs()
    assert "telegram rate limited" in logs and "telegram refused the bot token" in logs
    assert "HTTP Request: POST" in logs and "/bot<token>/sendMessage" in logs  # httpx's own log, redacted
    for text in (*errors, logs):
        assert SECRET not in text and BOT_TOKEN not in text, text
    assert "7000001" in logs  # the bot is named by its public id


def test_no_repr_shows_the_token():
    config = build_provider("telegram_bot", {"bot_token": BOT_TOKEN}).config  # type: ignore[attr-defined]
    create = msgspec.convert({"kind": "telegram_bot", "name": "t", "bot_token": BOT_TOKEN},
                             schema.TelegramProviderCreate)
    for shown in (repr(config), str(config), repr(create), f"{create}"):
        assert SECRET not in shown and "bot_token=<secret>" in shown


# -- the settings ------------------------------------------------------------------------------------


def create(**fields: Any) -> schema.TelegramProviderCreate:
    data = msgspec.convert({"kind": "telegram_bot", "name": "bot", "bot_token": BOT_TOKEN, **fields},
                           schema.TelegramProviderCreate)
    schema.check_telegram(data)
    return data


def test_a_telegram_provider_has_defaults_and_keeps_its_config_apart():
    data = create()
    assert (data.channel, data.base_url, data.concurrency, data.allow_insecure_auth, data.link_previews) == (
        "telegram", "https://api.telegram.org", 10, False, True)
    assert schema.CONFIG_FIELDS == ("rate_limits", "on_unknown", "weight", "bot_token", "base_url",
                                    "allow_insecure_auth", "concurrency", "timeout_s", "link_previews")
    assert schema.SECRET_FIELDS == ("bot_token",) and set(schema.PATCH_FIELDS) == {"bot_token", "link_previews"}
    assert schema.ENDPOINT_FIELD == "base_url" and schema.endpoint_host({}) == "api.telegram.org"
    assert schema.endpoint_host({"base_url": "https://tg.example.com:8443/x"}) == "tg.example.com"
    create(base_url="http://127.0.0.1:8081", allow_insecure_auth=True)  # a local Bot API server, said out loud
    create(base_url="https://tg-proxy.example.com/telegram", concurrency=30)


@pytest.mark.parametrize(("change", "field"), [
    ({"bot_token": "123456"}, "bot_token"),
    ({"bot_token": "123456:short"}, "bot_token"),
    ({"bot_token": "abc:" + "A" * 35}, "bot_token"),
    ({"bot_token": "123456:" + "A" * 30 + "/x"}, "bot_token"),
    ({"concurrency": 0}, "concurrency"),
    ({"concurrency": 31}, "concurrency"),
    ({"channel": "sms"}, "channel"),
    ({"base_url": "http://api.example.com"}, "base_url"),  # the token in clear, not said
    ({"base_url": "ftp://api.example.com"}, "base_url"),
    ({"base_url": "https://user:pw@api.example.com"}, "base_url"),
    ({"base_url": "https://api.example.com/?x=1"}, "base_url"),
    ({"host": "smtp.example.com"}, "host"),  # a setting of another kind
    ({"batch_size": 0}, "batch_size"),  # the shared types of providers.py apply
    ({"timeout_s": 0}, "timeout_s"),
    ({"base_url": "https://" + "a" * 2048}, "base_url"),
])
def test_invalid_telegram_settings_name_the_field(change, field):
    with pytest.raises((msgspec.ValidationError, Invalid)) as raised:
        create(**change)
    where = raised.value.field if isinstance(raised.value, Invalid) else str(raised.value)
    assert field in where, where


def test_patch_fields_check_what_the_create_checks():
    for name, kind in schema.PATCH_FIELDS.items():
        value = getattr(create(), name)
        assert msgspec.convert(value, kind) == value
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert("not-a-token", schema.PATCH_FIELDS["bot_token"])


@pytest.mark.parametrize("first", ["provider_telegram", "providers"])
def test_either_schema_module_may_be_imported_first(first):
    # providers.py and this kind's module import each other (see provider_telegram's docstring)
    code = (f"import api_service.schemas.{first}; import msgspec; "
            "from api_service.schemas import provider_telegram as t; "
            f"d = msgspec.convert({{'kind': 'telegram_bot', 'name': 'n', 'bot_token': {BOT_TOKEN!r}}}, "
            "t.TelegramProviderCreate); t.check_telegram(d); print(d.timeout_s, d.max_retries)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["30.0", str(DEFAULT_MAX_RETRIES)], done.stderr


def test_the_response_says_whether_a_token_is_set_never_which():
    now = datetime.now(timezone.utc)
    common = dict(id=uuid.uuid4(), name="bot", channel="telegram", batch_size=50, batch_delay_ms=0, max_retries=3,
                  created_at=now, updated_at=now)
    config = {f: getattr(create(concurrency=20), f) for f in schema.CONFIG_FIELDS}
    response = schema.telegram_response(common, config)
    encoded = msgspec.json.encode(response).decode()
    assert response.bot_token_set and response.bot_id == "7000001" and response.concurrency == 20
    assert SECRET not in encoded and '"bot_token"' not in encoded and '"kind":"telegram_bot"' in encoded


# -- the peer speaks as Telegram does ----------------------------------------------------------------


def test_the_peer_takes_form_and_query_parameters_and_refuses_as_telegram(telegram_peer):
    url = f"{telegram_peer.base_url}/bot{BOT_TOKEN}"
    with httpx.Client(trust_env=False) as client:
        r = client.post(f"{url}/sendmessage", data={  # method names in any case; reply_markup as JSON text
            "chat_id": "1001", "text": "Hi\\!", "parse_mode": "MarkdownV2",
            "reply_markup": '{"inline_keyboard": [[{"text": "Go", "url": "https://e.co"}]]}'})
        assert r.json()["ok"] and r.json()["result"]["text"] == "Hi!"
        assert client.get(f"{url}/sendMessage", params={"chat_id": "1002", "text": "q"}).json()["ok"]
        assert client.get(f"{url}/getMe").json()["result"]["id"] == 7000001
        assert [(g.encoding, g.button) for g in telegram_peer.received] == [("form", ("Go", "https://e.co")),
                                                                            ("query", None)]

        def refused(path: str, **body: Any) -> tuple[int, str]:
            answer = client.post(f"{telegram_peer.base_url}{path}", json=body).json()
            assert answer["ok"] is False
            return answer["error_code"], answer["description"]

        assert refused(f"/bot{BOT_TOKEN[:-1]}x/sendMessage") == (401, "Unauthorized")
        assert refused("/botgarbage/sendMessage") == (404, "Not Found")
        assert refused(f"/bot{BOT_TOKEN}/sendMessage", chat_id=1, text="") == (
            400, "Bad Request: message text is empty")
        assert refused(f"/bot{BOT_TOKEN}/sendMessage", text="x")[1] == "Bad Request: chat_id is empty"
        assert refused(f"/bot{BOT_TOKEN}/sendPhoto", chat_id=1, photo="not a url")[1] == (
            "Bad Request: wrong file identifier/HTTP URL specified")
        assert refused(f"/bot{BOT_TOKEN}/sendPhoto", chat_id=1, photo="https://e.co/p.jpg", caption="c" * 1025)[1] == (
            "Bad Request: message caption is too long")
        assert refused(f"/bot{BOT_TOKEN}/sendMessage", chat_id=1, text="x",
                       reply_markup={"inline_keyboard": [{"text": "a"}]})[1].startswith('Bad Request: field "inline')
        assert refused(f"/bot{BOT_TOKEN}/sendMessage", chat_id=1, text="x",
                       reply_markup={"inline_keyboard": [[{"text": "a", "url": "javascript:x"}]]})[1] == (
            "Bad Request: BUTTON_URL_INVALID")
        assert refused(f"/bot{BOT_TOKEN}/sendMessage", chat_id=1, text="x", parse_mode="Nope")[1] == (
            "Bad Request: unsupported parse_mode")
