"""Webhooks: one signed JSON POST per message to the tenant's own URL, the Standard Webhooks way
(https://www.standardwebhooks.com), a job's messages sent concurrently (http_send.py) on a client
kept per account (http_client.py), as the twilio provider does.

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

import base64
import binascii
import hashlib
import re
import secrets
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import msgspec
from standardwebhooks import Webhook

from shared.channels import http_client
from shared.channels.http_send import (
    ERROR_TEXT_CHARS,
    Answer,
    HttpProvider,
    failed,
    post,
)
from shared.channels.provider import (
    AUTH_FAILED,
    DEFERRED,
    INVALID_MESSAGE,
    REJECTED,
    OutgoingMessage,
    ProviderUnavailable,
    SendResult,
    WebhookContent,
)
from shared.platform.logging import get_logger

DEFAULT_CONCURRENCY, MAX_CONCURRENCY = 10, 100
DEFAULT_TIMEOUT_S = 10.0
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


def _text(answer: Answer) -> str:
    """The answer for the ledger: its status and the start of its body (a receiver's own words)."""
    detail = answer.excerpt().strip()
    return f"webhook {answer.status}: {detail}"[:ERROR_TEXT_CHARS] if detail else f"webhook {answer.status}"


_encode = msgspec.json.encode


def _timestamp(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the provider -------------------------------------------------------------------------------------


class WebhookProvider(HttpProvider[msgspec.Raw]):
    dedupes = False  # a receiver may dedupe by webhook-id, but nothing says it does
    name = "webhook"

    def __init__(self, config: dict[str, Any], *, allow_private_networks: bool = False) -> None:
        self.config = msgspec.convert(config, WebhookConfig)
        super().__init__(allow_private_networks=allow_private_networks)
        self._host = urlsplit(self.config.url).hostname or ""  # what logs name: a query may hold a token
        self._signer: Webhook | None = None
        # Never in an error text, even if a receiver echoes them back in its answer.
        sensitive = {self.config.secret, self.config.secret.removeprefix(SECRET_PREFIX), *self.config.headers.values()}
        self._sensitive = sorted((v for v in sensitive if len(v) >= 4), key=len, reverse=True)  # longest first

    def scrub(self, text: str) -> str:
        for value in self._sensitive:
            text = text.replace(value, "***")
        return text

    @property
    def _log_fields(self) -> dict[str, Any]:
        return {"host": self._host}

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
        url = self._endpoint(c.url, "url")
        await self._resolve(url.host, url.port, url.scheme)
        self._shared = http_client.acquire(self._client_key(), self._make_client)

    def _client_key(self) -> tuple[Any, ...]:
        # The secret only as a hash: a changed secret is another account (its own pause and bound),
        # and no key holds the secret.
        return ("webhook", self.config.url, hashlib.sha256(self.config.secret.encode()).hexdigest(),
                self.config.bounded_concurrency, self.allow_private_networks)

    def _client_options(self) -> dict[str, Any]:
        # No redirect is followed: it could lead off the checked host, so a 3xx is an answer.
        return {"follow_redirects": False, "headers": {"User-Agent": USER_AGENT}}

    def _request(self, message: OutgoingMessage) -> msgspec.Raw | SendResult:
        """The payload as JSON, once, before any commit: a payload that is not JSON is never handed over."""
        if not isinstance(message.content, WebhookContent):
            return failed(message, "not a webhook: the webhook provider sends WebhookContent", False, INVALID_MESSAGE)
        if not _HEADER_VALUE.match(message.idempotency_key):
            return failed(message, "the idempotency key cannot be a webhook-id header", False, INVALID_MESSAGE)
        try:
            return msgspec.Raw(_encode(message.content.payload))
        except (TypeError, ValueError, OverflowError) as exc:
            return failed(message, f"the payload is not JSON: {exc}"[:ERROR_TEXT_CHARS], False, INVALID_MESSAGE)

    def _signed(self, message: OutgoingMessage, payload: msgspec.Raw) -> tuple[bytes, dict[str, str]]:
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

    async def _post(self, message: OutgoingMessage, payload: msgspec.Raw) -> Answer:
        body, headers = self._signed(message, payload)  # after the commit: its time is the sending's
        return await post(self._client, self.config.url, self.config.timeout_s, content=body, headers=headers,
                          follow_redirects=False)

    def _result(self, message: OutgoingMessage, answer: Answer) -> SendResult:
        status = answer.status
        if 200 <= status < 300:
            return SendResult(contact_id=message.contact_id, ok=True, provider_message_id=message.idempotency_key)
        text = self.scrub(_text(answer))
        if 300 <= status < 400:
            return failed(message, f"{text} (redirects are not followed: set the final URL)"[:ERROR_TEXT_CHARS],
                          False, REJECTED)
        if status in (401, 403, 410):
            # The endpoint refuses us or is gone: the rest of the job is not posted to it.
            failure = GONE_FAILURE if status == 410 else AUTH_FAILED
            if self._stopped is None:
                log.warning("webhook endpoint refused: the rest of the job is not sent", host=self._host,
                            status=status)
                self._stopped = (failure, text)
            return failed(message, text, False, failure)
        if status in (408, 425) or status >= 500:  # the receiver timed out, is not ready, or failed: try later
            return failed(message, text, True, DEFERRED)
        return failed(message, text, False, REJECTED)
