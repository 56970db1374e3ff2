"""Telegram through the Bot API: one JSON POST per message (sendMessage, or sendPhoto / sendVideo
with the text as the caption), a job's messages sent concurrently (http_send.py) on a client kept
per bot (http_client.py). The address is the chat id.

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

import hashlib
import logging
import math
import re
from typing import Any
from urllib.parse import quote

import msgspec

from shared.channels import http_client
from shared.channels.http_send import (
    DEFAULT_RETRY_AFTER_S,
    ERROR_TEXT_CHARS,
    MAX_RETRY_AFTER_S,
    Answer,
    HttpProvider,
    failed,
    post,
)
from shared.channels.provider import (
    ADDRESS_DEAD,
    AUTH_FAILED,
    DEFERRED,
    INVALID_MESSAGE,
    OUTCOME_UNKNOWN,
    REJECTED,
    OutgoingMessage,
    ProviderUnavailable,
    SendResult,
    TelegramContent,
)
from shared.platform.logging import get_logger

DEFAULT_BASE_URL = "https://api.telegram.org"
# Telegram allows a bot about 30 messages a second to different chats: more in flight only earns 429s.
DEFAULT_CONCURRENCY, MAX_CONCURRENCY = 10, 30
MAX_TEXT_CHARS, MAX_CAPTION_CHARS = 4096, 1024  # as shown, after MarkdownV2 is parsed
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


def _asked_wait_s(parameters: Any, header: str | None) -> float:
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


def _body(answer: Answer) -> dict[str, Any]:
    """The answer's JSON object (Telegram's answers are one), or {} for anything else."""
    body = answer.json()
    return body if isinstance(body, dict) else {}


class TelegramBotProvider(HttpProvider[tuple[str, dict[str, Any]]]):
    name = "telegram"

    def __init__(self, config: dict[str, Any], *, allow_private_networks: bool = False) -> None:
        self.config = msgspec.convert(config, TelegramBotConfig)
        super().__init__(allow_private_networks=allow_private_networks)
        self._base = self.config.base_url.rstrip("/")
        token = self.config.bot_token
        # Quoted so that a token that slipped past the API's pattern cannot reach another path.
        self._bot_url = f"{self._base}/bot{quote(token, safe=':')}"
        # Longest first: the whole token in every spelling a URL or a message may use, then its secret part.
        secret = token.partition(":")[2]
        self._token_forms = sorted({f for f in (token, quote(token, safe=""), quote(token, safe=":"), secret)
                                    if len(f) >= 6}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """`text` without the bot token."""
        for form in self._token_forms:
            text = text.replace(form, "<token>")
        return text

    @property
    def _log_fields(self) -> dict[str, Any]:
        return {"bot_id": self.config.bot_id}

    async def open(self) -> None:
        """Checks the API host (a private one is refused) and takes the bot's shared client.
        Nothing is sent: the token is first tried by the first message."""
        if self._shared is not None:
            return
        url = self._endpoint(self._base, "base_url")
        if url.scheme == "http" and not self.config.allow_insecure_auth:  # the token would cross in clear
            raise ProviderUnavailable("telegram base_url is http and allow_insecure_auth is off", retryable=False,
                                      failure=REJECTED)
        await self._resolve(url.host, url.port, url.scheme)
        self._shared = http_client.acquire(self._client_key(), self._make_client)

    def _client_key(self) -> tuple[Any, ...]:
        # The token only as a hash: a changed token is another client, and no key holds the token.
        return ("telegram_bot", self._base, hashlib.sha256(self.config.bot_token.encode()).hexdigest(),
                self.config.bounded_concurrency, self.allow_private_networks)

    def _request(self, message: OutgoingMessage) -> tuple[str, dict[str, Any]] | SendResult:
        """The API method and JSON body of `message`."""
        content = message.content
        if not isinstance(content, TelegramContent):
            return failed(message, "not a Telegram message: telegram_bot sends TelegramContent", False,
                          INVALID_MESSAGE)
        if not _CHAT_ID.match(message.to):
            return failed(message, f"not a Telegram chat id: {message.to!r}", False, ADDRESS_DEAD)
        chat_id: int | str = int(message.to) if _NUMERIC.match(message.to) else message.to
        body: dict[str, Any] = {"chat_id": chat_id}
        shown = shown_length(content.text)
        if content.media_url:
            method = MEDIA_METHODS.get(content.media_type or "")
            if method is None:
                return failed(message, f"media_type must be photo or video, not {content.media_type!r}", False,
                              INVALID_MESSAGE)
            if shown > MAX_CAPTION_CHARS:
                return failed(message, f"caption of about {shown} characters: a photo or video takes at most "
                                       f"{MAX_CAPTION_CHARS} (shorten the text, or send it without media)",
                              False, INVALID_MESSAGE)
            body[content.media_type or ""] = content.media_url
            if content.text:
                body.update(caption=content.text, parse_mode="MarkdownV2")
        else:
            method = "sendMessage"
            if not content.text.strip():
                return failed(message, "empty message text", False, INVALID_MESSAGE)
            if shown > MAX_TEXT_CHARS:
                return failed(message, f"text of about {shown} characters: Telegram takes at most {MAX_TEXT_CHARS}",
                              False, INVALID_MESSAGE)
            body.update(text=content.text, parse_mode="MarkdownV2")
            if not self.config.link_previews:
                body["link_preview_options"] = {"is_disabled": True}
        if content.button_label and content.button_url:
            body["reply_markup"] = {"inline_keyboard": [[{"text": content.button_label, "url": content.button_url}]]}
        return method, body

    async def _post(self, message: OutgoingMessage, request: tuple[str, dict[str, Any]]) -> Answer:
        method, body = request
        return await post(self._client, f"{self._bot_url}/{method}", self.config.timeout_s, json=body)

    def _unexpected(self, message: OutgoingMessage, exc: Exception) -> SendResult:
        text = self.scrub(f"{type(exc).__name__}: {exc}")[:ERROR_TEXT_CHARS]
        # No traceback: its exception messages may hold the URL, and so the token.
        log.warning("telegram request failed unexpectedly", bot_id=self.config.bot_id, error=text)
        return failed(message, f"outcome unknown: {text}", False, OUTCOME_UNKNOWN)

    def _retry_after_s(self, answer: Answer) -> float:
        return _asked_wait_s(_body(answer).get("parameters"), answer.headers.get("retry-after"))

    def _result(self, message: OutgoingMessage, answer: Answer) -> SendResult:
        body = _body(answer)
        if 200 <= answer.status < 300:
            result = body.get("result")
            message_id = result.get("message_id") if isinstance(result, dict) else None
            return SendResult(contact_id=message.contact_id, ok=True,
                              provider_message_id=f"{message.to}:{message_id}" if isinstance(message_id, int) else None)
        description = str(body.get("description") or answer.excerpt())
        parameters = body.get("parameters")
        failure, retryable = classify(answer.status, description, parameters)
        text = f"telegram {answer.status}"
        if isinstance(parameters, dict) and parameters.get("migrate_to_chat_id") is not None:
            # First, so the cut to ERROR_TEXT_CHARS keeps it: the contact needs this id instead.
            text += f" (the chat moved, its new chat id is {parameters['migrate_to_chat_id']})"
        text = self.scrub(f"{text}: {description}" if description else text)[:ERROR_TEXT_CHARS]
        if failure == AUTH_FAILED:  # a dead token: the rest of the job is not sent with it
            if self._stopped is None:
                log.warning("telegram refused the bot token", bot_id=self.config.bot_id, status=answer.status)
            self._stopped = (AUTH_FAILED, text)
        return failed(message, text, retryable, failure)
