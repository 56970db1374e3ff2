"""Telegram through the Bot API: one JSON POST per message (sendMessage, or sendPhoto / sendVideo
with the text as the caption), a job's messages sent concurrently on a client kept per bot
(http_client.py). The address is the chat id.

The bot token is part of every URL path (/bot<token>/<method>), so any text that may hold a URL
(httpx's exception messages, httpx's own request log, an answer's description) is scrubbed of the
token before it leaves this module: errors, log lines and exception messages never carry it.

Telegram does not dedupe: a request that may have reached it and got no answer is never resent
(OUTCOME_UNKNOWN); only failures that prove nothing was sent are retryable.

A caption holds at most 1024 characters (as shown, after MarkdownV2 is parsed). Media whose text is
longer fails INVALID_MESSAGE rather than going out as the media and then the text as a second
message: two requests are not atomic (the text could fail for good after the media went out, and a
retry would send the media twice), and Crier sends each recipient a message once or not at all.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx
import msgspec

from shared.channels import http_client
from shared.channels.provider import (
    ADDRESS_DEAD,
    AUTH_FAILED,
    CONNECTION_LOST,
    DEFERRED,
    INVALID_MESSAGE,
    OUTCOME_UNKNOWN,
    REFUSED_PRIVATE_ADDRESS,
    REJECTED,
    TIMEOUT,
    TLS_FAILED,
    UNREACHABLE,
    WITHDRAWN,
    Commit,
    CommitFailed,
    OutgoingMessage,
    ProviderUnavailable,
    SendResult,
    TelegramContent,
)
from shared.platform import netguard
from shared.platform.logging import get_logger

DEFAULT_BASE_URL = "https://api.telegram.org"
# Telegram allows a bot about 30 messages a second to different chats: more in flight only earns 429s.
DEFAULT_CONCURRENCY, MAX_CONCURRENCY = 10, 30
MAX_RETRY_AFTER_S = 60.0  # a longer retry_after is cut to this (a further 429 then waits again)
DEFAULT_RETRY_AFTER_S = 1.0
MAX_RATE_LIMITED = 10  # 429s in a row one message takes within one send(); then it fails retryable
MAX_TEXT_CHARS, MAX_CAPTION_CHARS = 4096, 1024  # as shown, after MarkdownV2 is parsed
ERROR_TEXT_CHARS = 300
MAX_ANSWER_BYTES = 64 * 1024  # the base URL is the tenant's to set: an answer is not read without bound
MEDIA_METHODS = {"photo": "sendPhoto", "video": "sendVideo"}
# A chat id: an integer (negative for groups and channels), or a public channel's @username.
_CHAT_ID = re.compile(r"^-?[0-9]{1,20}$|^@[A-Za-z][A-Za-z0-9_]{3,31}$")
_NUMERIC = re.compile(r"^-?[0-9]+$")

# Telegram's descriptions that say this chat will never take a message from this bot (the
# error_code alone cannot: a 403 is also "not a member of the channel", a 400 any bad request).
_DEAD_403 = ("bot was blocked by the user", "user is deactivated", "bot was kicked",
             "bot can't send messages to bots")
_DEAD_400 = ("chat not found", "group chat was deactivated", "peer_id_invalid")

log = get_logger(__name__)


class _RedactBotTokens(logging.Filter):
    """httpx logs every request's URL (logger "httpx", INFO): a deployment that turns stdlib
    logging up must not get bot tokens with it."""

    _TOKEN = re.compile(r"/bot[^/\s\"']+")  # any shape: a malformed token is as secret

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot be formatted would be printed raw, URL and all
            message = "(an httpx log record that could not be formatted)"
        record.msg, record.args = self._TOKEN.sub("/bot<token>", message), None
        return True


if not any(isinstance(f, _RedactBotTokens) for f in logging.getLogger("httpx").filters):
    logging.getLogger("httpx").addFilter(_RedactBotTokens())


class TelegramBotConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The stored config of a telegram_bot provider (api_service/schemas/provider_telegram.py);
    unknown keys are ignored."""

    bot_token: str
    base_url: str = DEFAULT_BASE_URL
    concurrency: int = DEFAULT_CONCURRENCY
    timeout_s: float = 30.0
    allow_insecure_auth: bool = False
    link_previews: bool = True  # False: links in a text message get no preview

    def __repr__(self) -> str:  # a logged or raised repr must not carry the token
        shown = (f"{f}={'<secret>' if f == 'bot_token' else repr(getattr(self, f))}" for f in self.__struct_fields__)
        return f"TelegramBotConfig({', '.join(shown)})"

    @property
    def bounded_concurrency(self) -> int:
        return max(1, min(MAX_CONCURRENCY, self.concurrency))

    @property
    def bot_id(self) -> str:
        """The token's public part (the bot's user id): what logs name the bot by. A token of
        another shape is not split: all of it may be secret."""
        bot_id, colon, _ = self.bot_token.partition(":")
        return bot_id[:20] if colon and bot_id.isdigit() else "unknown"


def shown_length(text: str) -> int:
    """About how many characters MarkdownV2 `text` shows: escapes count once, markup and link
    targets not at all, the whitespace around it not at all (Telegram trims it). It errs short (a
    `*` inside code is counted as markup; code points, where Telegram may count UTF-16 units), so
    a text is never refused here that Telegram would take; Telegram's "too long" settles the rest."""
    text = text.strip()
    count, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            count, i = count + 1, i + 2
            continue
        if c == "(" and i > 0 and text[i - 1] == "]":  # a link's target
            while i < n and text[i] != ")":
                i += 2 if text[i] == "\\" else 1
        elif c == "`" and text.startswith("```", i):  # a pre block's language line is not shown
            m = re.match(r"```[A-Za-z0-9_+-]*\n?", text[i:])
            i += len(m.group(0)) - 1 if m else 2
        elif c == ">" and (i == 0 or text[i - 1] == "\n"):  # a quote's marker
            pass
        elif c not in "*_~|`[]!":
            count += 1
        i += 1
    return count


def _retry_after_s(parameters: Any, header: str | None) -> float:
    """Telegram's parameters.retry_after (else a Retry-After header) as a wait of at most MAX_RETRY_AFTER_S."""
    value = parameters.get("retry_after") if isinstance(parameters, dict) else None
    try:
        seconds = float(value if value is not None else header if header is not None else DEFAULT_RETRY_AFTER_S)
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER_S
    return DEFAULT_RETRY_AFTER_S if math.isnan(seconds) else min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def classify(status: int, description: str, parameters: Any) -> tuple[str, bool]:
    """(failure class, retryable) of an answer that is neither a success nor a 429."""
    words = description.lower()
    if status in (401, 404):  # a bad token; Telegram answers 404 for a bot that does not exist
        return AUTH_FAILED, False
    if status >= 500:
        return DEFERRED, True
    if status == 403:
        return (ADDRESS_DEAD if any(d in words for d in _DEAD_403) else REJECTED), False
    if status == 400:
        if isinstance(parameters, dict) and parameters.get("migrate_to_chat_id") is not None:
            return INVALID_MESSAGE, False  # the group became a supergroup: the contact needs the new id
        return (ADDRESS_DEAD if any(d in words for d in _DEAD_400) else INVALID_MESSAGE), False
    return REJECTED, False


def _failed(message: OutgoingMessage, error: str, retryable: bool, failure: str) -> SendResult:
    return SendResult(contact_id=message.contact_id, ok=False, error=error, retryable=retryable, failure=failure)


class _Answer(NamedTuple):
    """An HTTP answer, its body read up to MAX_ANSWER_BYTES."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> dict[str, Any]:
        try:
            body = json.loads(self.body)
        except ValueError:  # not JSON, cut short, or not UTF-8
            return {}
        return body if isinstance(body, dict) else {}


def _is_tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:  # httpx wraps httpcore's error, which wraps the ssl error
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(eq=False)
class _Call:
    """The shared state of one send(): commits go one at a time (a commit may use one database
    connection), and the first commit that raises stops every message not yet committed."""

    commit: Commit | None
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    commit_error: Exception | None = None


class TelegramBotProvider:
    dedupes = False  # a resent request is a second message

    def __init__(self, config: dict[str, Any], *, allow_private_networks: bool = False) -> None:
        self.config = msgspec.convert(config, TelegramBotConfig)
        # False: the API host must resolve to public addresses only (shared/platform/netguard.py).
        self.allow_private_networks = allow_private_networks
        self._base = self.config.base_url.rstrip("/")
        token = self.config.bot_token
        # Quoted so that a token that slipped past the API's pattern cannot reach another path.
        self._bot_url = f"{self._base}/bot{quote(token, safe=':')}"
        # Longest first: the whole token in every spelling a URL or a message may use, then its secret part.
        secret = token.partition(":")[2]
        self._token_forms = sorted({f for f in (token, quote(token, safe=""), quote(token, safe=":"), secret)
                                    if len(f) >= 6}, key=len, reverse=True)
        self._shared: http_client.SharedClient | None = None
        # Set by a 401/404: the rest of the job fails at once instead of trying a dead token again.
        self._auth_failure: str | None = None

    @property
    def concurrency(self) -> int:
        """Requests in flight at once (the worker hands a call about twice as many messages)."""
        return self.config.bounded_concurrency

    def scrub(self, text: str) -> str:
        """`text` without the bot token."""
        for form in self._token_forms:
            text = text.replace(form, "<token>")
        return text

    async def open(self) -> None:
        """Checks the API host (a private one is refused) and takes the bot's shared client.
        Nothing is sent: the token is first tried by the first message."""
        if self._shared is not None:
            return
        try:
            url = httpx.URL(self._base)
        except httpx.InvalidURL as exc:
            raise ProviderUnavailable(f"telegram base_url is not a URL: {self.scrub(str(exc))}", retryable=False,
                                      failure=REJECTED) from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ProviderUnavailable("telegram base_url must be an http(s) URL with a host", retryable=False,
                                      failure=REJECTED)
        if url.scheme == "http" and not self.config.allow_insecure_auth:  # the token would cross in clear
            raise ProviderUnavailable("telegram base_url is http and allow_insecure_auth is off", retryable=False,
                                      failure=REJECTED)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            await netguard.resolve(url.host, port, allow_private=self.allow_private_networks,
                                   timeout=self.config.timeout_s)
        except netguard.PrivateAddressRefused as exc:
            log.warning("telegram host refused: not a public address", host=url.host, kind=exc.why)
            raise ProviderUnavailable(f"telegram host refused: {exc}", retryable=False,
                                      failure=REFUSED_PRIVATE_ADDRESS) from exc
        except TimeoutError as exc:
            raise ProviderUnavailable(f"resolving telegram host {url.host} timed out", failure=TIMEOUT) from exc
        except (OSError, UnicodeError) as exc:
            raise ProviderUnavailable(f"cannot resolve telegram host {url.host}: {exc}", failure=UNREACHABLE) from exc
        self._shared = http_client.acquire(self._client_key(), self._make_client)

    def _client_key(self) -> tuple[Any, ...]:
        # The token only as a hash: a changed token is another client, and no key holds the token.
        return ("telegram_bot", self._base, hashlib.sha256(self.config.bot_token.encode()).hexdigest(),
                self.config.bounded_concurrency, self.allow_private_networks)

    def _make_client(self) -> http_client.SharedClient:
        concurrency = self.config.bounded_concurrency
        client = httpx.AsyncClient(
            transport=http_client.guarded_transport(allow_private=self.allow_private_networks,
                                                    max_connections=concurrency),
            trust_env=False,  # a proxy from the environment would connect around the address check
            headers={"User-Agent": "crier", "Accept": "application/json"},
        )
        return http_client.SharedClient(client=client, in_flight=asyncio.Semaphore(concurrency))

    async def send(self, messages: list[OutgoingMessage], commit: Commit | None = None) -> list[SendResult]:
        if not messages:
            return []
        try:
            await self.open()
        except ProviderUnavailable as exc:
            return [_failed(m, str(exc), exc.retryable, exc.failure) for m in messages]
        call = _Call(commit)
        results: list[SendResult | None] = [None] * len(messages)
        order = iter(range(len(messages)))

        # As many workers as requests may be in flight, each taking the next message: they go out
        # in order, and a big batch is not thousands of tasks.
        async def worker() -> None:
            for i in order:
                results[i] = await self._send_one(messages[i], call)

        async with asyncio.TaskGroup() as group:
            for _ in range(min(self.config.bounded_concurrency, len(messages))):
                group.create_task(worker())
        if call.commit_error is not None:
            raise CommitFailed(str(call.commit_error)) from call.commit_error
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def request(self, message: OutgoingMessage) -> tuple[str, dict[str, Any]] | SendResult:
        """The API method and JSON body of `message`, or its failure when it cannot be sent as given."""
        content = message.content
        if not isinstance(content, TelegramContent):
            return _failed(message, "not a Telegram message: telegram_bot sends TelegramContent", False,
                           INVALID_MESSAGE)
        if not _CHAT_ID.match(message.to):
            return _failed(message, f"not a Telegram chat id: {message.to!r}", False, ADDRESS_DEAD)
        chat_id: int | str = int(message.to) if _NUMERIC.match(message.to) else message.to
        body: dict[str, Any] = {"chat_id": chat_id}
        shown = shown_length(content.text)
        if content.media_url:
            method = MEDIA_METHODS.get(content.media_type or "")
            if method is None:
                return _failed(message, f"media_type must be photo or video, not {content.media_type!r}", False,
                               INVALID_MESSAGE)
            if shown > MAX_CAPTION_CHARS:
                return _failed(message, f"caption of about {shown} characters: a photo or video takes at most "
                                        f"{MAX_CAPTION_CHARS} (shorten the text, or send it without media)",
                               False, INVALID_MESSAGE)
            body[content.media_type or ""] = content.media_url
            if content.text:
                body.update(caption=content.text, parse_mode="MarkdownV2")
        else:
            method = "sendMessage"
            if not content.text.strip():
                return _failed(message, "empty message text", False, INVALID_MESSAGE)
            if shown > MAX_TEXT_CHARS:
                return _failed(message, f"text of about {shown} characters: Telegram takes at most {MAX_TEXT_CHARS}",
                               False, INVALID_MESSAGE)
            body.update(text=content.text, parse_mode="MarkdownV2")
            if not self.config.link_previews:
                body["link_preview_options"] = {"is_disabled": True}
        if content.button_label and content.button_url:
            body["reply_markup"] = {"inline_keyboard": [[{"text": content.button_label, "url": content.button_url}]]}
        return method, body

    async def _send_one(self, message: OutgoingMessage, call: _Call) -> SendResult | None:
        """The message's result; None once a commit raised (send() then raises)."""
        request = self.request(message)
        if isinstance(request, SendResult):
            return request
        method, body = request
        shared = self._shared
        assert shared is not None
        for _ in range(MAX_RATE_LIMITED):
            async with shared.in_flight:
                await shared.wait_if_paused()  # a 429 paused the bot: nobody sends meanwhile
                if call.commit_error is not None:
                    return None
                if self._auth_failure is not None:
                    return _failed(message, f"not sent: {self._auth_failure}", False, AUTH_FAILED)
                if call.commit is not None and (refusal := await self._commit(message, call)) is not True:
                    return refusal
                try:
                    answer = await self._post(shared, method, body)
                except (httpx.HTTPError, netguard.PrivateAddressRefused) as exc:
                    return self._transport_failure(message, exc)
                except TimeoutError:
                    return _failed(message, f"outcome unknown, not resent to avoid a duplicate: no whole answer "
                                            f"within {self._deadline_s:g} s", False, OUTCOME_UNKNOWN)
                except Exception as exc:  # anything else after the commit: it may have gone out
                    text = self.scrub(f"{type(exc).__name__}: {exc}")[:ERROR_TEXT_CHARS]
                    # No traceback: its exception messages may hold the URL, and so the token.
                    log.warning("telegram request failed unexpectedly", bot_id=self.config.bot_id, error=text)
                    return _failed(message, f"outcome unknown: {text}", False, OUTCOME_UNKNOWN)
            if answer.status != 429:
                return self._result(message, answer)
            # Telegram sent nothing: wait as asked (the whole bot waits) and send it again, which
            # is not another attempt.
            wait = _retry_after_s(answer.json().get("parameters"), answer.headers.get("retry-after"))
            log.info("telegram rate limited", bot_id=self.config.bot_id, retry_after_s=wait)
            shared.pause(wait)
        return _failed(message, f"telegram 429: rate limited {MAX_RATE_LIMITED} times in a row", True, DEFERRED)

    async def _commit(self, message: OutgoingMessage, call: _Call) -> SendResult | None | bool:
        """True to send; otherwise what _send_one returns (WITHDRAWN, or None when the commit raised)."""
        assert call.commit is not None
        async with call.commit_lock:
            if call.commit_error is not None:
                return None
            try:
                go = await call.commit(message)
            except Exception as exc:
                call.commit_error = exc
                return None
        return True if go else _failed(message, "withdrawn before it was handed over", False, WITHDRAWN)

    @property
    def _deadline_s(self) -> float:
        # httpx's timeouts bound each step (connect, each read), not the whole: a server dripping
        # its answer a byte at a time would hold a worker for ever without this.
        return self.config.timeout_s * 3

    async def _post(self, shared: http_client.SharedClient, method: str, body: dict[str, Any]) -> _Answer:
        async with asyncio.timeout(self._deadline_s):
            async with shared.client.stream("POST", f"{self._bot_url}/{method}", json=body,
                                            timeout=self.config.timeout_s) as response:
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) >= MAX_ANSWER_BYTES:  # Telegram's answers are ~1 KiB; the rest is not read
                        break
                return _Answer(response.status_code, response.headers, bytes(data[:MAX_ANSWER_BYTES]))

    def _transport_failure(self, message: OutgoingMessage, exc: Exception) -> SendResult:
        """A request that got no HTTP answer. Retryable only where Telegram cannot have the message."""
        text = self.scrub(f"telegram request failed: {type(exc).__name__}: {exc}")[:ERROR_TEXT_CHARS]
        if isinstance(exc, netguard.PrivateAddressRefused):  # the name now resolves inside (a new connection)
            return _failed(message, f"telegram host refused: {exc}", False, REFUSED_PRIVATE_ADDRESS)
        if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            return _failed(message, text, True, TIMEOUT)
        if isinstance(exc, httpx.ConnectError):
            tls = _is_tls_error(exc)
            return _failed(message, text, not tls, TLS_FAILED if tls else UNREACHABLE)
        if isinstance(exc, (httpx.WriteError, httpx.WriteTimeout)):
            # The request did not get out whole, and Telegram acts only on a complete one.
            return _failed(message, text, True, CONNECTION_LOST)
        if isinstance(exc, httpx.LocalProtocolError):  # refused by our own HTTP layer before sending
            return _failed(message, text, False, INVALID_MESSAGE)
        # A read timeout or a connection closed after the request went out: Telegram may have sent
        # the message, and would send it again.
        return _failed(message, f"outcome unknown, not resent to avoid a duplicate: {text}", False, OUTCOME_UNKNOWN)

    def _result(self, message: OutgoingMessage, answer: _Answer) -> SendResult:
        body = answer.json()
        if 200 <= answer.status < 300:
            result = body.get("result")
            message_id = result.get("message_id") if isinstance(result, dict) else None
            return SendResult(contact_id=message.contact_id, ok=True,
                              provider_message_id=f"{message.to}:{message_id}" if isinstance(message_id, int) else None)
        description = str(body.get("description") or answer.body[:ERROR_TEXT_CHARS].decode("utf-8", "replace"))
        parameters = body.get("parameters")
        failure, retryable = classify(answer.status, description, parameters)
        text = f"telegram {answer.status}"
        if isinstance(parameters, dict) and parameters.get("migrate_to_chat_id") is not None:
            # First, so the cut to ERROR_TEXT_CHARS keeps it: the contact needs this id instead.
            text += f" (the chat moved, its new chat id is {parameters['migrate_to_chat_id']})"
        text = self.scrub(f"{text}: {description}" if description else text)[:ERROR_TEXT_CHARS]
        if failure == AUTH_FAILED:
            if self._auth_failure is None:
                log.warning("telegram refused the bot token", bot_id=self.config.bot_id, status=answer.status)
            self._auth_failure = text
        return _failed(message, text, retryable, failure)

    async def close(self) -> None:
        """Gives the bot's client back: its connections stay open for the next job."""
        if self._shared is not None:
            http_client.release(self._shared)
            self._shared = None
