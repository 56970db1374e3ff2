"""How the HTTP providers (twilio, whatsapp_cloud, telegram_bot, fcm, webhook) send a job: its
messages concurrently on the account's shared client (http_client.py), each committed right before
its request goes out, a rate limit waited out without costing an attempt, each answer read up to a
bound and within a deadline, and a request that got no answer classed by what the provider may hold.

A provider subclasses HttpProvider and keeps what is its own: its config, its checks in open() and
its client, a message's request (_request, _post) and what an answer means (_result, or _outcome).

None of these APIs dedupes: a request that may have reached the provider and got no answer is never
resent (OUTCOME_UNKNOWN); only failures that prove nothing was taken are retryable.
"""
from __future__ import annotations

import asyncio
import json
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Generic, NamedTuple, TypeVar

import httpx

from shared.channels import http_client
from shared.channels.provider import (
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
)
from shared.platform import netguard
from shared.platform.logging import get_logger

MAX_RATE_LIMITED = 10  # rate limits in a row one message takes within one send(); then it fails retryable
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is cut to this (a further rate limit then waits again)
DEFAULT_RETRY_AFTER_S = 1.0
ERROR_TEXT_CHARS = 300
MAX_ANSWER_BYTES = 64 * 1024  # the URLs are the tenant's to set: an answer is not read without bound
# What a request that got no HTTP answer raises (besides the deadline's TimeoutError).
TRANSPORT_ERRORS = (httpx.HTTPError, netguard.PrivateAddressRefused)

log = get_logger(__name__)


def failed(message: OutgoingMessage, error: str, retryable: bool, failure: str) -> SendResult:
    return SendResult(contact_id=message.contact_id, ok=False, error=error, retryable=retryable, failure=failure)


# -- answers -----------------------------------------------------------------------------------------


class Answer(NamedTuple):
    """An HTTP answer, its body read up to MAX_ANSWER_BYTES."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:  # not JSON, cut short, or not UTF-8
            return None

    def excerpt(self) -> str:
        """The body's start as text, for an error when it is not the API's error shape."""
        return self.body[:ERROR_TEXT_CHARS].decode("utf-8", "replace")


def deadline_s(timeout_s: float) -> float:
    # httpx's timeouts bound each step (connect, each read), not the whole: a server dripping its
    # answer a byte at a time would hold a worker for ever without this.
    return timeout_s * 3


async def post(client: httpx.AsyncClient, url: str, timeout_s: float, **request: Any) -> Answer:
    """One POST and its answer, read up to MAX_ANSWER_BYTES (the APIs' answers are well under 1 KiB;
    the rest is not read) within deadline_s(timeout_s), else TimeoutError."""
    async with asyncio.timeout(deadline_s(timeout_s)):
        async with client.stream("POST", url, timeout=timeout_s, **request) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= MAX_ANSWER_BYTES:
                    break
            return Answer(response.status_code, response.headers, bytes(body[:MAX_ANSWER_BYTES]))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After (seconds, or an HTTP date) as a wait of at most MAX_RETRY_AFTER_S; None if absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def retry_after_s(value: str | None) -> float:
    """Retry-After (seconds, or an HTTP date) as a wait of at most MAX_RETRY_AFTER_S;
    DEFAULT_RETRY_AFTER_S if absent or unreadable."""
    wait = parse_retry_after(value)
    return DEFAULT_RETRY_AFTER_S if wait is None else wait


class Retry(NamedTuple):
    """A rate limit: nothing was taken. The message goes again, which is not another attempt, once
    `wait_s` has passed: for the whole account when `account` (it asked the account to slow down),
    else for this message only."""

    wait_s: float
    account: bool = True


# -- no answer ---------------------------------------------------------------------------------------


def is_tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:  # httpx wraps httpcore's error, which wraps the ssl error
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _as_is(text: str) -> str:
    return text


def no_answer(what: str, exc: BaseException, *, sent: bool = True,
              scrub: Callable[[str], str] = _as_is) -> tuple[str, bool, str]:
    """(error, retryable, failure) of a request that got no HTTP answer (one of TRANSPORT_ERRORS, or
    with `sent` False a TimeoutError). `sent`: the API may hold a message once the request went out
    whole, so only a failure before that is retryable; False for a request that sends nothing (FCM's
    for an access token). `scrub` takes the provider's secrets out of the text before it is cut."""
    text = scrub(f"{what} request failed: {type(exc).__name__}: {exc}")[:ERROR_TEXT_CHARS]
    if isinstance(exc, netguard.PrivateAddressRefused):  # the name now resolves inside (a new connection)
        return scrub(f"{what} host refused: {exc}"), False, REFUSED_PRIVATE_ADDRESS
    if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        return text, True, TIMEOUT
    if isinstance(exc, httpx.ConnectError):
        return (text, False, TLS_FAILED) if is_tls_error(exc) else (text, True, UNREACHABLE)
    if isinstance(exc, (httpx.WriteError, httpx.WriteTimeout)):
        # The request did not get out whole, and an API acts only on a complete one (a webhook
        # receiver cannot even verify a cut one).
        return text, True, CONNECTION_LOST
    if isinstance(exc, httpx.LocalProtocolError):  # refused by our own HTTP layer before sending
        return text, False, INVALID_MESSAGE
    if not sent:  # nothing reached the API whatever happened to the request
        return text, True, TIMEOUT if isinstance(exc, (httpx.TimeoutException, TimeoutError)) else CONNECTION_LOST
    # A read timeout or a connection closed after the request went out: the API may have the
    # message, and would take it again.
    return f"outcome unknown, not resent to avoid a duplicate: {text}", False, OUTCOME_UNKNOWN


# -- one send() --------------------------------------------------------------------------------------


@dataclass(eq=False)
class Call:
    """The shared state of one send(): commits go one at a time (a commit may use one database
    connection), and the first commit that raises stops every message not yet committed."""

    commit: Commit | None
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    commit_error: Exception | None = None

    async def hand_over(self, message: OutgoingMessage) -> SendResult | None | bool:
        """True to send; otherwise what _send_one returns (WITHDRAWN, or None when the commit raised)."""
        assert self.commit is not None
        async with self.commit_lock:
            if self.commit_error is not None:
                return None
            try:
                go = await self.commit(message)
            except Exception as exc:
                self.commit_error = exc
                return None
        return True if go else failed(message, "withdrawn before it was handed over", False, WITHDRAWN)


Request = TypeVar("Request")  # what a provider makes of a message once, before its attempts


class HttpProvider(Generic[Request]):
    """The Provider protocol's send() for an API that takes one POST per message. A subclass sets
    `name` and `config` (a Struct with bounded_concurrency and timeout_s), and writes open() (which
    ends by taking the account's client, kept under a key that tells accounts apart, into `_shared`),
    _request, _post, and _result or _outcome."""

    dedupes = False  # a resent request is a second message
    name: str  # how errors and log lines name the provider: "twilio"
    config: Any

    def __init__(self, *, allow_private_networks: bool) -> None:
        # False: the API host must resolve to public addresses only (shared/platform/netguard.py).
        self.allow_private_networks = allow_private_networks
        self._shared: http_client.SharedClient | None = None
        # Set by an answer that refuses the account (its credentials, an endpoint gone): the rest of
        # the job fails at once with it, unsent, instead of hammering the API. (failure class, text)
        self._stopped: tuple[str, str] | None = None

    @property
    def concurrency(self) -> int:
        """Requests in flight at once (the worker hands it this many messages per call)."""
        return self.config.bounded_concurrency

    @property
    def _log_fields(self) -> dict[str, Any]:
        """What names the account in a log line (never a secret)."""
        return {}

    def scrub(self, text: str) -> str:
        """`text` without the provider's secrets, for a text that may echo them (an answer, an exception)."""
        return text

    async def open(self) -> None:
        """Checks the settings and the API host (a private one is refused) and takes the account's
        shared client into `_shared`; ProviderUnavailable when the job cannot send."""
        raise NotImplementedError

    # -- the account's client ------------------------------------------------------------------------

    def _endpoint(self, url: str, what: str) -> httpx.URL:
        """`url` (the setting `what`) parsed; ProviderUnavailable unless it is an http(s) URL with a host."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:  # its text is the message's: no chain to repeat it
            raise ProviderUnavailable(f"{self.name} {what} is not a URL: {self.scrub(str(exc))}", retryable=False,
                                      failure=REJECTED) from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ProviderUnavailable(f"{self.name} {what} must be an http(s) URL with a host", retryable=False,
                                      failure=REJECTED)
        return parsed

    async def _resolve(self, host: str, port: int | None, scheme: str, *, what: str | None = None,
                       **log_fields: Any) -> None:
        """Checks that `host` resolves, to public addresses only unless private networks are allowed
        (the connections are checked again: this fails a job before any message is touched).
        `what` names the setting in the errors when the provider has more than one host."""
        label = f"{self.name} {what}" if what else self.name
        try:
            await netguard.resolve(host, port or (443 if scheme == "https" else 80),
                                   allow_private=self.allow_private_networks, timeout=self.config.timeout_s)
        except netguard.PrivateAddressRefused as exc:
            log.warning(f"{self.name} host refused: not a public address", **log_fields, host=host,
                        address=str(exc.address) if exc.address else None, kind=exc.why)
            raise ProviderUnavailable(f"{label} host refused: {exc}", retryable=False,
                                      failure=REFUSED_PRIVATE_ADDRESS) from exc
        except TimeoutError as exc:
            raise ProviderUnavailable(f"resolving {label} host {host} timed out", failure=TIMEOUT) from exc
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            raise ProviderUnavailable(f"cannot resolve {label} host {host}: {exc}", failure=UNREACHABLE) from exc

    def _client_options(self) -> dict[str, Any]:
        """httpx.AsyncClient's options for the account's client, besides its transport."""
        return {"headers": {"User-Agent": "crier", "Accept": "application/json"}}

    def _make_client(self) -> http_client.SharedClient:
        return http_client.shared_client(concurrency=self.config.bounded_concurrency,
                                         allow_private=self.allow_private_networks, **self._client_options())

    @property
    def _client(self) -> httpx.AsyncClient:
        assert self._shared is not None
        return self._shared.client

    async def close(self) -> None:
        """Gives the account's client back: its connections stay open for the next job."""
        if self._shared is not None:
            http_client.release(self._shared)
            self._shared = None

    # -- sending -------------------------------------------------------------------------------------

    async def send(self, messages: list[OutgoingMessage], commit: Commit | None = None) -> list[SendResult]:
        if not messages:
            return []
        try:
            await self.open()
        except ProviderUnavailable as exc:
            return [failed(m, str(exc), exc.retryable, exc.failure) for m in messages]
        call = Call(commit)
        results: list[SendResult | None] = [None] * len(messages)
        order = iter(range(len(messages)))

        # As many workers as requests may be in flight, each taking the next message: they go out
        # in order, and a big batch is not thousands of tasks.
        async def worker() -> None:
            for i in order:
                results[i] = await self._send_one(messages[i], call)

        async with asyncio.TaskGroup() as group:
            for _ in range(min(self.concurrency, len(messages))):
                group.create_task(worker())
        if call.commit_error is not None:
            raise CommitFailed(str(call.commit_error)) from call.commit_error
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _request(self, message: OutgoingMessage) -> Request | SendResult:
        """What `message` is sent as, made once before any attempt; or its failure when it cannot be
        sent as given (it is then never committed)."""
        raise NotImplementedError

    async def _ready(self, message: OutgoingMessage, request: Request) -> SendResult | None:
        """What must be in hand right before the commit (FCM: an access token), or the failure that
        ends the message unsent."""
        return None

    async def _post(self, message: OutgoingMessage, request: Request) -> Answer:
        """The request, on the account's client (post()): called once the message is committed."""
        raise NotImplementedError

    async def _send_one(self, message: OutgoingMessage, call: Call) -> SendResult | None:
        """The message's result; None once a commit raised (send() then raises)."""
        request = self._request(message)
        if isinstance(request, SendResult):
            return request
        shared = self._shared
        assert shared is not None
        for times in range(MAX_RATE_LIMITED):
            async with shared.in_flight:
                await shared.wait_if_paused()  # a rate limit paused the account: nobody sends meanwhile
                if call.commit_error is not None:
                    return None
                if self._stopped is not None:
                    failure, text = self._stopped
                    return failed(message, f"not sent: {text}", False, failure)
                if (refusal := await self._ready(message, request)) is not None:
                    return refusal
                if call.commit is not None and (refusal := await call.hand_over(message)) is not True:
                    return refusal
                try:
                    answer = await self._post(message, request)
                except Exception as exc:  # after the commit: whatever failed, the message may have gone out
                    return self._no_answer(message, exc)
                outcome = self._outcome(message, request, answer, times)
                if isinstance(outcome, SendResult):
                    return outcome
                if outcome.account:  # the whole account waits, this message included (next turn)
                    shared.pause(outcome.wait_s)
            if not outcome.account:  # only this message waits, outside the bound on requests in flight
                await asyncio.sleep(outcome.wait_s)
        return failed(message, f"{self.rate_limit_answer}: rate limited {MAX_RATE_LIMITED} times in a row", True,
                      DEFERRED)

    @property
    def rate_limit_answer(self) -> str:
        """How the error of a message rate limited too often names the API's answer."""
        return f"{self.name} 429"

    def _no_answer(self, message: OutgoingMessage, exc: Exception) -> SendResult:
        """The result of a request that raised `exc` instead of answering. Retryable only where the
        API cannot have the message."""
        if isinstance(exc, TRANSPORT_ERRORS):
            return failed(message, *no_answer(self.name, exc, scrub=self.scrub))
        if isinstance(exc, TimeoutError):  # post()'s deadline
            return failed(message, f"outcome unknown, not resent to avoid a duplicate: no whole answer within "
                                   f"{self._deadline_s:g} s", False, OUTCOME_UNKNOWN)
        return self._unexpected(message, exc)

    def _unexpected(self, message: OutgoingMessage, exc: Exception) -> SendResult:
        """The result of a request that raised what no HTTP request should (a bug, say)."""
        log.exception(f"{self.name} request failed unexpectedly", **self._log_fields)
        return failed(message, self.scrub(f"outcome unknown: {type(exc).__name__}: {exc}")[:ERROR_TEXT_CHARS],
                      False, OUTCOME_UNKNOWN)

    @property
    def _deadline_s(self) -> float:
        return deadline_s(self.config.timeout_s)

    def _outcome(self, message: OutgoingMessage, request: Request, answer: Answer,
                 times: int) -> SendResult | Retry:
        """What `answer` means: the message's result, or a rate limit to wait out before it goes
        again (`times`: the rate limits it met before in this send()). Here: a 429 (the API took
        nothing) pauses the whole account as long as it asks, any other answer is _result's."""
        if answer.status == 429:
            return self._rate_limited(answer)
        return self._result(message, answer)

    def _rate_limited(self, answer: Answer) -> Retry:
        wait = self._retry_after_s(answer)
        log.info(f"{self.name} rate limited", **self._log_fields, retry_after_s=wait)
        return Retry(wait)

    def _retry_after_s(self, answer: Answer) -> float:
        return retry_after_s(answer.headers.get("retry-after"))

    def _result(self, message: OutgoingMessage, answer: Answer) -> SendResult:
        """The message's result from an answer that is not a rate limit."""
        raise NotImplementedError
