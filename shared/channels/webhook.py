"""Webhooks: one signed JSON POST per message to the tenant's own URL, the Standard Webhooks way
(https://www.standardwebhooks.com), a job's messages sent concurrently on a client kept per
account (http_client.py), as the twilio provider does.

The body is the Standard Webhooks envelope, not the bare payload:

    {"type": "broadcast.message", "timestamp": "2025-01-31T12:00:00.000Z",
     "data": {"contact_id": 42, "payload": <the rendered WebhookContent.payload>}}

because the payload is the tenant's template and need not say whom it is about (the envelope adds
the contact), and a `type` lets a receiver tell these from any other event Crier may post later.

`webhook-id` is the message's idempotency key, the same on every attempt, so a receiver can drop a
redelivery; `webhook-timestamp` and the signature are made anew at each attempt (a receiver refuses
a timestamp older than 5 minutes). Crier cannot rely on receivers deduping (dedupes = False): as
with Twilio, a request that may have reached the receiver and got no answer is never resent.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import secrets
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx
import msgspec
from standardwebhooks import Webhook

from shared.channels import http_client
from shared.channels.provider import (
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
    WebhookContent,
)
from shared.channels.twilio import retry_after_s
from shared.platform import netguard
from shared.platform.logging import get_logger

DEFAULT_CONCURRENCY, MAX_CONCURRENCY = 10, 100
DEFAULT_TIMEOUT_S = 10.0
MAX_RATE_LIMITED = 10  # 429s in a row one message takes within one send(); then it fails retryable
ERROR_TEXT_CHARS = 300
MAX_ANSWER_BYTES = 64 * 1024  # the URL is the tenant's: an answer is not read without bound
EVENT_TYPE = "broadcast.message"
USER_AGENT = "Crier-Webhooks/1.0"
# A 410 says the endpoint is gone for good: like a refused login it ends the job, but the class
# the tenant sees is REJECTED (the endpoint refused), so that nobody goes looking at the secret.
GONE_FAILURE = REJECTED

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64  # what Standard Webhooks asks of a symmetric secret
_SECRET = re.compile(r"^whsec_[A-Za-z0-9+/]+={0,2}$")

MAX_HEADERS, MAX_HEADER_NAME_CHARS, MAX_HEADER_VALUE_CHARS = 10, 64, 1024
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]+$")  # visible ASCII and spaces: no CR, LF or NUL to inject with
# Headers the request itself owns (framing, the signature, Crier's name) or that only a proxy reads.
_RESERVED_HEADERS = frozenset({
    "host", "content-length", "content-type", "content-encoding", "transfer-encoding", "connection",
    "keep-alive", "te", "trailer", "upgrade", "expect", "user-agent", "proxy-authorization", "proxy-connection",
})
_URL_HOST = re.compile(r"^[A-Za-z0-9._:-]+$")  # what urlsplit leaves of a name or an address

log = get_logger(__name__)


# -- settings, shared with the API's checks -----------------------------------------------------------


def new_secret(nbytes: int = 32) -> str:
    """A fresh signing secret, `whsec_` and base64 of `nbytes` random bytes."""
    assert MIN_SECRET_BYTES <= nbytes <= MAX_SECRET_BYTES
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode()


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret. ValueError (never quoting the secret) when it is not one.

    Stricter than standardwebhooks' own decoding, which skips characters that are not base64."""
    if not _SECRET.match(secret):
        raise ValueError("must be whsec_ followed by base64")
    text = secret[len(SECRET_PREFIX):]
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be whsec_ followed by base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(f"must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, not {len(key)}")
    return key


def url_problem(url: str, *, allow_insecure: bool) -> str | None:
    """Why `url` cannot be a webhook endpoint, or None."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not a number or out of range
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname or not _URL_HOST.match(parts.hostname):
        return "must be an http or https URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user or password (send a credential in `headers`)"
    if parts.fragment:
        return "must not have a fragment"
    if parts.scheme == "http" and not allow_insecure:
        # The signature keeps a payload from being changed on the way, not from being read: over
        # plain http every contact's data is readable on the path, so it is the tenant's explicit choice.
        return ("payloads are sent over https only: use an https URL, or set allow_insecure to true to send "
                "them readable by anyone on the path")
    return None


def headers_problem(headers: dict[str, str]) -> str | None:
    """Why these static headers cannot be sent, or None. Names the header, never its value (a value
    is often a credential)."""
    if len(headers) > MAX_HEADERS:
        return f"at most {MAX_HEADERS} headers"
    seen: set[str] = set()
    for name, value in headers.items():
        lower = name.lower()
        if not _HEADER_NAME.match(name) or len(name) > MAX_HEADER_NAME_CHARS:
            return f"{name[:MAX_HEADER_NAME_CHARS]!r} is not a header name"
        if lower in _RESERVED_HEADERS or lower.startswith(("webhook-", "proxy-")):
            return f"{name!r} is set by Crier and cannot be given"
        if lower in seen:
            return f"{name!r} is given twice"
        seen.add(lower)
        if not _HEADER_VALUE.match(value) or len(value) > MAX_HEADER_VALUE_CHARS:
            return (f"the value of {name!r} must be 1 to {MAX_HEADER_VALUE_CHARS} visible ASCII characters "
                    "or spaces")
    return None


class WebhookConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The stored config of a webhook provider (api_service/schemas/provider_webhook.py); unknown keys are ignored."""

    url: str
    secret: str
    headers: dict[str, str] = {}
    allow_insecure: bool = False
    concurrency: int = DEFAULT_CONCURRENCY
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def bounded_concurrency(self) -> int:
        return max(1, min(MAX_CONCURRENCY, self.concurrency))

    def __repr__(self) -> str:  # a logged repr must not carry the secret or a header's value
        return (f"WebhookConfig(url={self.url!r}, secret=<secret>, headers={sorted(self.headers)!r}, "
                f"allow_insecure={self.allow_insecure}, concurrency={self.concurrency}, timeout_s={self.timeout_s})")


# -- answers ------------------------------------------------------------------------------------------


def _failed(message: OutgoingMessage, error: str, retryable: bool, failure: str) -> SendResult:
    return SendResult(contact_id=message.contact_id, ok=False, error=error, retryable=retryable, failure=failure)


class _Answer(NamedTuple):
    """An HTTP answer, its body read up to MAX_ANSWER_BYTES."""

    status: int
    headers: httpx.Headers
    body: bytes

    def text(self) -> str:
        detail = self.body[:ERROR_TEXT_CHARS].decode("utf-8", "replace").strip()
        return f"webhook {self.status}: {detail}"[:ERROR_TEXT_CHARS] if detail else f"webhook {self.status}"


def _is_tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:  # httpx wraps httpcore's error, which wraps the ssl error
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _transport_failure(message: OutgoingMessage, exc: Exception) -> SendResult:
    """A request that got no HTTP answer. Retryable only where the receiver cannot have had it whole."""
    text = f"webhook request failed: {type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS]
    if isinstance(exc, netguard.PrivateAddressRefused):  # the name now resolves inside (a new connection)
        return _failed(message, f"webhook host refused: {exc}", False, REFUSED_PRIVATE_ADDRESS)
    if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        return _failed(message, text, True, TIMEOUT)
    if isinstance(exc, httpx.ConnectError):
        if _is_tls_error(exc):
            return _failed(message, text, False, TLS_FAILED)
        return _failed(message, text, True, UNREACHABLE)
    if isinstance(exc, (httpx.WriteError, httpx.WriteTimeout)):
        # The body did not get out whole: a receiver cannot verify (so cannot act on) a cut one.
        return _failed(message, text, True, CONNECTION_LOST)
    if isinstance(exc, httpx.LocalProtocolError):  # refused by our own HTTP layer before sending
        return _failed(message, text, False, INVALID_MESSAGE)
    # A read timeout or a connection closed after the request went out: the receiver may have it.
    return _failed(message, f"outcome unknown, not resent to avoid a duplicate: {text}", False, OUTCOME_UNKNOWN)


@dataclass(eq=False)
class _Call:
    """The shared state of one send(): commits go one at a time (a commit may use one database
    connection), and the first commit that raises stops every message not yet committed."""

    commit: Commit | None
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    commit_error: Exception | None = None


_encode = msgspec.json.encode


def _timestamp(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the provider -------------------------------------------------------------------------------------


class WebhookProvider:
    dedupes = False  # a receiver may dedupe by webhook-id, but nothing says it does

    def __init__(self, config: dict[str, Any], *, allow_private_networks: bool = False) -> None:
        self.config = msgspec.convert(config, WebhookConfig)
        # False: the URL's host must resolve to public addresses only (shared/platform/netguard.py).
        self.allow_private_networks = allow_private_networks
        self._host = urlsplit(self.config.url).hostname or ""  # what logs name: a query may hold a token
        self._shared: http_client.SharedClient | None = None
        self._signer: Webhook | None = None
        # Set by a 401/403/410: the rest of the job fails at once instead of posting every message
        # to an endpoint that refuses us or is gone.
        self._stopped: tuple[str, str] | None = None  # (failure class, why)
        # Never in an error text, even if a receiver echoes them back in its answer.
        sensitive = {self.config.secret, self.config.secret.removeprefix(SECRET_PREFIX), *self.config.headers.values()}
        self._sensitive = sorted((v for v in sensitive if len(v) >= 4), key=len, reverse=True)  # longest first

    def _scrub(self, text: str) -> str:
        for value in self._sensitive:
            text = text.replace(value, "***")
        return text

    @property
    def concurrency(self) -> int:
        """Requests in flight at once (the worker hands it this many messages per call)."""
        return self.config.bounded_concurrency

    async def open(self) -> None:
        """Checks the settings and the URL's host (a private one is refused) and takes the account's
        shared client. Nothing is sent: the endpoint is first tried by the first message."""
        if self._shared is not None:
            return
        c = self.config
        if problem := url_problem(c.url, allow_insecure=c.allow_insecure):
            raise ProviderUnavailable(f"webhook url {problem}", retryable=False, failure=REJECTED)
        if problem := headers_problem(c.headers):
            raise ProviderUnavailable(f"webhook headers: {problem}", retryable=False, failure=REJECTED)
        try:
            self._signer = Webhook(secret_bytes(c.secret))
        except ValueError as exc:
            raise ProviderUnavailable(f"webhook secret {exc}", retryable=False, failure=AUTH_FAILED) from None
        try:
            url = httpx.URL(c.url)
        except httpx.InvalidURL as exc:
            raise ProviderUnavailable(f"webhook url is not a URL: {exc}", retryable=False, failure=REJECTED) from None
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            await netguard.resolve(url.host, port, allow_private=self.allow_private_networks, timeout=c.timeout_s)
        except netguard.PrivateAddressRefused as exc:
            log.warning("webhook host refused: not a public address", host=url.host,
                        address=str(exc.address) if exc.address else None, kind=exc.why)
            raise ProviderUnavailable(f"webhook host refused: {exc}", retryable=False,
                                      failure=REFUSED_PRIVATE_ADDRESS) from exc
        except TimeoutError as exc:
            raise ProviderUnavailable(f"resolving webhook host {url.host} timed out", failure=TIMEOUT) from exc
        except (OSError, UnicodeError) as exc:
            raise ProviderUnavailable(f"cannot resolve webhook host {url.host}: {exc}", failure=UNREACHABLE) from exc
        self._shared = http_client.acquire(self._client_key(), self._make_client)

    def _client_key(self) -> tuple[Any, ...]:
        # The secret only as a hash: a changed secret is another account (its own pause and bound),
        # and no key holds the secret.
        return ("webhook", self.config.url, hashlib.sha256(self.config.secret.encode()).hexdigest(),
                self.config.bounded_concurrency, self.allow_private_networks)

    def _make_client(self) -> http_client.SharedClient:
        concurrency = self.config.bounded_concurrency
        client = httpx.AsyncClient(
            transport=http_client.guarded_transport(allow_private=self.allow_private_networks,
                                                    max_connections=concurrency),
            trust_env=False,  # a proxy from the environment would connect around the address check
            follow_redirects=False,  # a redirect could lead off the checked host: a 3xx is an answer
            headers={"User-Agent": USER_AGENT},
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

    def _request(self, message: OutgoingMessage, payload: msgspec.Raw) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one attempt, signed now."""
        assert self._signer is not None
        now = time.time()
        seconds = int(now)
        body = _encode({"type": EVENT_TYPE, "timestamp": _timestamp(now),
                        "data": {"contact_id": message.contact_id, "payload": payload}})
        signature = self._signer.sign(message.idempotency_key, datetime.fromtimestamp(seconds, timezone.utc),
                                      body.decode())
        return body, {**self.config.headers, "Content-Type": "application/json", "webhook-id": message.idempotency_key,
                      "webhook-timestamp": str(seconds), "webhook-signature": signature}

    async def _send_one(self, message: OutgoingMessage, call: _Call) -> SendResult | None:
        """The message's result; None once a commit raised (send() then raises)."""
        if not isinstance(message.content, WebhookContent):
            return _failed(message, "not a webhook: the webhook provider sends WebhookContent", False, INVALID_MESSAGE)
        if not _HEADER_VALUE.match(message.idempotency_key):
            return _failed(message, "the idempotency key cannot be a webhook-id header", False, INVALID_MESSAGE)
        try:  # once, before any commit: a payload that is not JSON is never handed over
            payload = msgspec.Raw(_encode(message.content.payload))
        except (TypeError, ValueError, OverflowError) as exc:
            return _failed(message, f"the payload is not JSON: {exc}"[:ERROR_TEXT_CHARS], False, INVALID_MESSAGE)
        shared = self._shared
        assert shared is not None
        for _ in range(MAX_RATE_LIMITED):
            async with shared.in_flight:
                await shared.wait_if_paused()  # a 429 paused the account: nobody sends meanwhile
                if call.commit_error is not None:
                    return None
                if self._stopped is not None:
                    failure, why = self._stopped
                    return _failed(message, f"not sent: {why}", False, failure)
                if call.commit is not None and (refusal := await self._commit(message, call)) is not True:
                    return refusal
                body, headers = self._request(message, payload)  # signed after the commit: its time is the sending's
                try:
                    answer = await self._post(shared, body, headers)
                except (httpx.HTTPError, netguard.PrivateAddressRefused) as exc:
                    result = _transport_failure(message, exc)
                    return msgspec.structs.replace(result, error=self._scrub(result.error or ""))
                except TimeoutError:
                    return _failed(message, f"outcome unknown, not resent to avoid a duplicate: no whole answer "
                                            f"within {self._deadline_s:g} s", False, OUTCOME_UNKNOWN)
                except Exception as exc:  # anything else after the commit: it may have gone out
                    log.exception("webhook request failed unexpectedly", host=self._host)
                    return _failed(message, self._scrub(f"outcome unknown: {type(exc).__name__}: {exc}")
                                   [:ERROR_TEXT_CHARS], False, OUTCOME_UNKNOWN)
            if answer.status != 429:
                return self._result(message, answer)
            # The receiver took nothing: wait as asked (the whole account waits) and send it again,
            # which is not another attempt.
            wait = retry_after_s(answer.headers.get("retry-after"))  # seconds or a date, at most 60 s
            log.info("webhook rate limited", host=self._host, retry_after_s=wait)
            shared.pause(wait)
        return _failed(message, f"webhook 429: rate limited {MAX_RATE_LIMITED} times in a row", True, DEFERRED)

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
        # httpx's timeouts bound each step (connect, each read), not the whole: a receiver dripping
        # its answer a byte at a time would hold a worker for ever without this.
        return self.config.timeout_s * 3

    async def _post(self, shared: http_client.SharedClient, body: bytes, headers: dict[str, str]) -> _Answer:
        async with asyncio.timeout(self._deadline_s):
            async with shared.client.stream("POST", self.config.url, content=body, headers=headers,
                                            timeout=self.config.timeout_s, follow_redirects=False) as response:
                received = bytearray()
                async for chunk in response.aiter_bytes():
                    received += chunk
                    if len(received) >= MAX_ANSWER_BYTES:  # only the start is kept for the ledger
                        break
                return _Answer(response.status_code, response.headers, bytes(received[:MAX_ANSWER_BYTES]))

    def _result(self, message: OutgoingMessage, answer: _Answer) -> SendResult:
        status = answer.status
        if 200 <= status < 300:
            return SendResult(contact_id=message.contact_id, ok=True, provider_message_id=message.idempotency_key)
        text = self._scrub(answer.text())
        if 300 <= status < 400:
            return _failed(message, f"{text} (redirects are not followed: set the final URL)"[:ERROR_TEXT_CHARS],
                           False, REJECTED)
        if status in (401, 403, 410):
            failure = GONE_FAILURE if status == 410 else AUTH_FAILED
            if self._stopped is None:
                log.warning("webhook endpoint refused: the rest of the job is not sent", host=self._host,
                            status=status)
                self._stopped = (failure, text)
            return _failed(message, text, False, failure)
        if status in (408, 425) or status >= 500:  # the receiver timed out, is not ready, or failed: try later
            return _failed(message, text, True, DEFERRED)
        return _failed(message, text, False, REJECTED)

    async def close(self) -> None:
        """Gives the account's client back: its connections stay open for the next job."""
        if self._shared is not None:
            http_client.release(self._shared)
            self._shared = None
