"""SMS (and RCS, which Twilio sends through the same API) with Twilio's Messages API: one form POST
per message, a job's messages sent concurrently on a client kept per account (http_client.py).

Twilio does not dedupe: a request that may have reached it and got no answer is never resent
(OUTCOME_UNKNOWN); only failures that prove nothing was created are retryable.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import ssl
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
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
    SmsContent,
)
from shared.platform import netguard
from shared.platform.logging import get_logger

DEFAULT_BASE_URL = "https://api.twilio.com"
API_VERSION = "2010-04-01"
DEFAULT_CONCURRENCY, MAX_CONCURRENCY = 10, 100  # Twilio answers 429 past about 100 concurrent requests per account
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is cut to this (a further 429 then waits again)
DEFAULT_RETRY_AFTER_S = 1.0
MAX_RATE_LIMITED = 10  # 429s in a row one message takes within one send(); then it fails retryable
ERROR_TEXT_CHARS = 300
MAX_ANSWER_BYTES = 64 * 1024  # the base URL is the tenant's to set: an answer is not read without bound
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")

# Twilio error codes (https://www.twilio.com/docs/api/errors) of a 400 that are about this
# recipient or this message; any other 4xx refuses the sender, region or account: REJECTED.
_DEAD_CODES = frozenset({21211, 21610})  # invalid 'To' number; the recipient unsubscribed (STOP)
_INVALID_CODES = frozenset({
    21602, 21604, 21614, 21617, 21619, 21620,  # no body, no To, not a mobile number, body too long ...
})

log = get_logger(__name__)


class TwilioConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The stored config of a twilio provider (see api_service/schemas/providers.py); unknown keys are ignored."""

    account_sid: str
    auth_token: str | None = None
    api_key_sid: str | None = None  # with api_key_secret: used instead of the auth token
    api_key_secret: str | None = None
    from_number: str | None = None
    messaging_service_sid: str | None = None
    status_callback_url: str | None = None
    base_url: str = DEFAULT_BASE_URL
    concurrency: int = DEFAULT_CONCURRENCY
    timeout_s: float = 30.0

    @property
    def credentials(self) -> tuple[str, str]:
        if self.api_key_sid and self.api_key_secret:
            return self.api_key_sid, self.api_key_secret
        return self.account_sid, self.auth_token or ""

    @property
    def bounded_concurrency(self) -> int:
        return max(1, min(MAX_CONCURRENCY, self.concurrency))


def retry_after_s(value: str | None) -> float:
    """Retry-After (seconds, or an HTTP date) as a wait of at most MAX_RETRY_AFTER_S."""
    if not value:
        return DEFAULT_RETRY_AFTER_S
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER_S
    if math.isnan(seconds):
        return DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _failed(message: OutgoingMessage, error: str, retryable: bool, failure: str) -> SendResult:
    return SendResult(contact_id=message.contact_id, ok=False, error=error, retryable=retryable, failure=failure)


class _Answer(NamedTuple):
    """An HTTP answer, its body read up to MAX_ANSWER_BYTES."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:  # not JSON, cut short, or not UTF-8
            return None

    def error(self) -> tuple[int | None, str]:
        """Twilio's error code and a short text for the ledger (its JSON error body, or the raw start)."""
        body = self.json()
        if isinstance(body, dict):
            code = body.get("code") if isinstance(body.get("code"), int) else None
            detail = str(body.get("message") or "")
        else:
            code, detail = None, self.body[:ERROR_TEXT_CHARS].decode("utf-8", "replace")
        text = f"twilio {self.status}" + (f" code {code}" if code is not None else "")
        return code, f"{text}: {detail}"[:ERROR_TEXT_CHARS] if detail else text


def _is_tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:  # httpx wraps httpcore's error, which wraps the ssl error
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _transport_failure(message: OutgoingMessage, exc: Exception) -> SendResult:
    """A request that got no HTTP answer. Retryable only where Twilio cannot have the message."""
    text = f"twilio request failed: {type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS]
    if isinstance(exc, netguard.PrivateAddressRefused):  # the name now resolves inside (a new connection)
        return _failed(message, f"twilio host refused: {exc}", False, REFUSED_PRIVATE_ADDRESS)
    if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        return _failed(message, text, True, TIMEOUT)
    if isinstance(exc, httpx.ConnectError):
        if _is_tls_error(exc):
            return _failed(message, text, False, TLS_FAILED)
        return _failed(message, text, True, UNREACHABLE)
    if isinstance(exc, (httpx.WriteError, httpx.WriteTimeout)):
        # The request did not get out whole, and Twilio acts only on a complete one.
        return _failed(message, text, True, CONNECTION_LOST)
    if isinstance(exc, httpx.LocalProtocolError):  # refused by our own HTTP layer before sending
        return _failed(message, text, False, INVALID_MESSAGE)
    # A read timeout or a connection closed after the request went out: Twilio may have created
    # the message, and would create it again.
    return _failed(message, f"outcome unknown, not resent to avoid a duplicate: {text}", False, OUTCOME_UNKNOWN)


@dataclass(eq=False)
class _Call:
    """The shared state of one send(): commits go one at a time (a commit may use one database
    connection), and the first commit that raises stops every message not yet committed."""

    commit: Commit | None
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    commit_error: Exception | None = None


class TwilioProvider:
    dedupes = False  # a resent request is a second SMS

    def __init__(self, config: dict[str, Any], *, allow_private_networks: bool = False) -> None:
        self.config = msgspec.convert(config, TwilioConfig)
        # False: the API host must resolve to public addresses only (shared/platform/netguard.py).
        self.allow_private_networks = allow_private_networks
        self._base = self.config.base_url.rstrip("/")
        self._messages_url = f"{self._base}/{API_VERSION}/Accounts/{quote(self.config.account_sid, safe='')}/Messages.json"
        self._shared: http_client.SharedClient | None = None
        # Set by a 401/403: the rest of the job fails at once instead of hammering Twilio with a
        # bad login (Twilio may lock an account for that).
        self._auth_failure: str | None = None

    @property
    def concurrency(self) -> int:
        """Requests in flight at once (the worker hands it twice as many messages per call)."""
        return self.config.bounded_concurrency

    async def open(self) -> None:
        """Checks the API host (a private one is refused) and takes the account's shared client.
        Nothing is sent: the credentials are first tried by the first message."""
        if self._shared is not None:
            return
        try:
            url = httpx.URL(self._base)
        except httpx.InvalidURL as exc:
            raise ProviderUnavailable(f"twilio base_url is not a URL: {exc}", retryable=False,
                                      failure=REJECTED) from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ProviderUnavailable("twilio base_url must be an http(s) URL with a host", retryable=False,
                                      failure=REJECTED)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            await netguard.resolve(url.host, port, allow_private=self.allow_private_networks,
                                   timeout=self.config.timeout_s)
        except netguard.PrivateAddressRefused as exc:
            log.warning("twilio host refused: not a public address", host=url.host,
                        address=str(exc.address) if exc.address else None, kind=exc.why)
            raise ProviderUnavailable(f"twilio host refused: {exc}", retryable=False,
                                      failure=REFUSED_PRIVATE_ADDRESS) from exc
        except TimeoutError as exc:
            raise ProviderUnavailable(f"resolving twilio host {url.host} timed out", failure=TIMEOUT) from exc
        except (OSError, UnicodeError) as exc:
            raise ProviderUnavailable(f"cannot resolve twilio host {url.host}: {exc}", failure=UNREACHABLE) from exc
        self._shared = http_client.acquire(self._client_key(), self._make_client)

    def _client_key(self) -> tuple[Any, ...]:
        # The secret only as a hash: a changed token is another client, and no key holds the token.
        user, secret = self.config.credentials
        return ("twilio", self._base, self.config.account_sid, user, hashlib.sha256(secret.encode()).hexdigest(),
                self.config.bounded_concurrency, self.allow_private_networks)

    def _make_client(self) -> http_client.SharedClient:
        concurrency = self.config.bounded_concurrency
        client = httpx.AsyncClient(
            auth=httpx.BasicAuth(*self.config.credentials),
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

    def _form(self, message: OutgoingMessage) -> dict[str, str]:
        c = self.config
        assert isinstance(message.content, SmsContent)
        form = {"To": message.to, "Body": message.content.body}
        if c.from_number:
            form["From"] = c.from_number
        if c.messaging_service_sid:
            form["MessagingServiceSid"] = c.messaging_service_sid
        if c.status_callback_url:
            form["StatusCallback"] = c.status_callback_url
        return form

    async def _send_one(self, message: OutgoingMessage, call: _Call) -> SendResult | None:
        """The message's result; None once a commit raised (send() then raises)."""
        if not isinstance(message.content, SmsContent):
            return _failed(message, "not an SMS: twilio sends SmsContent", False, INVALID_MESSAGE)
        if not _E164.match(message.to):
            return _failed(message, f"not an E.164 phone number: {message.to!r}", False, ADDRESS_DEAD)
        if not message.content.body:
            return _failed(message, "empty message body", False, INVALID_MESSAGE)
        shared = self._shared
        assert shared is not None
        form = self._form(message)
        for _ in range(MAX_RATE_LIMITED):
            async with shared.in_flight:
                await shared.wait_if_paused()  # a 429 paused the account: nobody sends meanwhile
                if call.commit_error is not None:
                    return None
                if self._auth_failure is not None:
                    return _failed(message, f"not sent: {self._auth_failure}", False, AUTH_FAILED)
                if call.commit is not None and (refusal := await self._commit(message, call)) is not True:
                    return refusal
                try:
                    answer = await self._post(shared, form)
                except (httpx.HTTPError, netguard.PrivateAddressRefused) as exc:
                    return _transport_failure(message, exc)
                except TimeoutError:
                    return _failed(message, f"outcome unknown, not resent to avoid a duplicate: no whole answer "
                                            f"within {self._deadline_s:g} s", False, OUTCOME_UNKNOWN)
                except Exception as exc:  # anything else after the commit: it may have gone out
                    log.exception("twilio request failed unexpectedly", account_sid=self.config.account_sid)
                    return _failed(message, f"outcome unknown: {type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS],
                                   False, OUTCOME_UNKNOWN)
            if answer.status != 429:
                return self._result(message, answer)
            # Twilio created nothing: wait as asked (the whole account waits) and send it again,
            # which is not another attempt.
            wait = retry_after_s(answer.headers.get("retry-after"))
            log.info("twilio rate limited", account_sid=self.config.account_sid, retry_after_s=wait)
            shared.pause(wait)
        return _failed(message, f"twilio 429: rate limited {MAX_RATE_LIMITED} times in a row", True, DEFERRED)

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

    async def _post(self, shared: http_client.SharedClient, form: dict[str, str]) -> _Answer:
        async with asyncio.timeout(self._deadline_s):
            async with shared.client.stream("POST", self._messages_url, data=form,
                                            timeout=self.config.timeout_s) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= MAX_ANSWER_BYTES:  # Twilio's answers are ~1 KiB; the rest is not read
                        break
                return _Answer(response.status_code, response.headers, bytes(body[:MAX_ANSWER_BYTES]))

    def _result(self, message: OutgoingMessage, answer: _Answer) -> SendResult:
        status = answer.status
        if 200 <= status < 300:
            body = answer.json()
            sid = body.get("sid") if isinstance(body, dict) and isinstance(body.get("sid"), str) else None
            return SendResult(contact_id=message.contact_id, ok=True, provider_message_id=sid)
        code, text = answer.error()
        if status in (401, 403):
            if self._auth_failure is None:
                log.warning("twilio refused the credentials", account_sid=self.config.account_sid, status=status,
                            code=code)
            self._auth_failure = text
            return _failed(message, text, False, AUTH_FAILED)
        if status >= 500:
            return _failed(message, text, True, DEFERRED)
        if code in _DEAD_CODES:
            return _failed(message, text, False, ADDRESS_DEAD)
        if code in _INVALID_CODES:
            return _failed(message, text, False, INVALID_MESSAGE)
        return _failed(message, text, False, REJECTED)

    async def close(self) -> None:
        """Gives the account's client back: its connections stay open for the next job."""
        if self._shared is not None:
            http_client.release(self._shared)
            self._shared = None
