"""WhatsApp template messages through Meta's WhatsApp Business Cloud API (a Graph API endpoint): one
JSON POST per message to {base_url}/{api_version}/{phone_number_id}/messages with a bearer token, a
job's messages sent concurrently on a client kept per business phone number (http_client.py), the
way twilio.py sends SMS.

WhatsappContent.parameters (rendered values by name) become the template's components:
- "1", "2", ... N: the body's positional parameters, in numeric order, without gaps;
- any other name: a named body parameter ({"type": "text", "parameter_name": name, "text": value}).
  A template is either positional or named, so a message mixing both is refused before sending;
- "button_url" (the URL button at index 0), "button_url_<i>" or "button.<i>" (index i, 0-9): the
  dynamic suffix of a URL button. These names are therefore not body parameters.
Header parameters, media, currency/date_time parameters and quick-reply payloads are not supported.

The Cloud API does not dedupe: a request that may have reached Meta and got no answer is never
resent (OUTCOME_UNKNOWN); only failures that prove nothing was accepted are retryable.
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
    TLS_UNAVAILABLE,
    UNREACHABLE,
    WITHDRAWN,
    Commit,
    CommitFailed,
    OutgoingMessage,
    ProviderUnavailable,
    SendResult,
    WhatsappContent,
)
from shared.platform import netguard
from shared.platform.logging import get_logger

DEFAULT_BASE_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v21.0"
# Both go into the URL's path, so nothing else may: the schema anchors them (^...$), open() fullmatches.
API_VERSION_RE = r"v[0-9]{1,3}\.[0-9]{1,3}"
PHONE_NUMBER_ID_RE = r"[0-9]{1,32}"
DEFAULT_CONCURRENCY, MAX_CONCURRENCY = 10, 100  # Cloud API throughput is 80 messages/s per number by default
MAX_WAIT_S = 60.0  # a longer Retry-After (or backoff) is cut to this; a further rate limit waits again
BACKOFF_S = 1.0  # the first wait of a rate limit without Retry-After (Meta's throttling errors carry none), doubled each time
MAX_RATE_LIMITED = 10  # rate limits in a row one message takes within one send(); then it fails retryable
ERROR_TEXT_CHARS = 300
MAX_ANSWER_BYTES = 64 * 1024  # the base URL is the tenant's to set: an answer is not read without bound
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")  # fullmatch: `$` would let a trailing newline through
_BUTTON = re.compile(r"button_url|button_url_([0-9])|button\.([0-9])")  # fullmatch

# Graph API error codes (developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes).
# Throttling: nothing was accepted; the whole number waits, and the retry is not another attempt.
_RATE_CODES = frozenset({4, 80007, 130429, 131048, 133016})
# Too many messages to this one recipient: only this message waits, the others go on (Meta: "you
# can still send messages to a different phone number without waiting").
_PAIR_RATE_CODE = 131056
# The token, its permissions or the account: no message of the job can go, so the job stops.
_ACCOUNT_CODES = frozenset({0, 3, 10, 33, 190, 368, 131005, 131031, *range(200, 300)})
_NO_SUCH_OBJECT = (100, 33)  # code 100 subcode 33: the phone_number_id does not exist for this token
_DEAD_CODES = frozenset({131026, 131021})  # not on WhatsApp / cannot take it; the recipient is the sender
_INVALID_CODES = frozenset({
    100, 131008, 131009, 131051,  # invalid parameter, required one missing, a value invalid, unsupported type
    132000, 132001, 132005, 132007, 132012, 132018,  # template: param count, no such name/language, too long, ...
})
_TRANSIENT_CODES = frozenset({1, 2, 131000, 131016})  # unknown error, service down, something went wrong

log = get_logger(__name__)


class WhatsappCloudConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The stored config of a whatsapp_cloud provider (api_service/schemas/provider_whatsapp.py);
    unknown keys are ignored."""

    phone_number_id: str
    access_token: str
    api_version: str = DEFAULT_API_VERSION
    base_url: str = DEFAULT_BASE_URL
    concurrency: int = DEFAULT_CONCURRENCY
    timeout_s: float = 30.0
    allow_insecure_auth: bool = False  # the token may go over plain http (a local stand-in)

    @property
    def bounded_concurrency(self) -> int:
        return max(1, min(MAX_CONCURRENCY, self.concurrency))


def retry_after_s(value: str | None) -> float | None:
    """Retry-After (seconds, or an HTTP date) as a wait of at most MAX_WAIT_S; None if absent or unreadable."""
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
    return min(max(seconds, 0.0), MAX_WAIT_S)


def _backoff_s(times: int) -> float:
    return min(BACKOFF_S * 2 ** times, MAX_WAIT_S)


class TemplateError(ValueError):
    """The message's parameters cannot make a template request."""


def template_payload(to: str, content: WhatsappContent) -> dict[str, Any]:
    """The JSON body of the request for one message (see the module's docstring for the parameters)."""
    if not content.template_name or not content.language:
        raise TemplateError("a template name and a language are required")
    positional: dict[int, str] = {}
    named: list[dict[str, str]] = []
    buttons: dict[int, str] = {}
    for name, value in content.parameters.items():
        if not value:  # Meta refuses an empty text: say which one instead of a bare 131008
            raise TemplateError(f"parameter {name!r} rendered empty")
        if button := _BUTTON.fullmatch(name):
            buttons[int(button.group(1) or button.group(2) or 0)] = value
        elif name.isdigit():
            positional[int(name)] = value
        else:
            named.append({"type": "text", "parameter_name": name, "text": value})
    if positional and named:
        raise TemplateError("positional (1, 2, ...) and named parameters cannot be mixed in one template")
    if positional and sorted(positional) != list(range(1, len(positional) + 1)):
        raise TemplateError(f"positional parameters must be 1..{len(positional)} without gaps, "
                            f"got {sorted(positional)}")
    components: list[dict[str, Any]] = []
    body = [{"type": "text", "text": positional[i]} for i in sorted(positional)] or named
    if body:
        components.append({"type": "body", "parameters": body})
    for index in sorted(buttons):
        components.append({"type": "button", "sub_type": "url", "index": str(index),
                           "parameters": [{"type": "text", "text": buttons[index]}]})
    template: dict[str, Any] = {"name": content.template_name, "language": {"code": content.language}}
    if components:
        template["components"] = components
    return {"messaging_product": "whatsapp", "recipient_type": "individual", "to": to.removeprefix("+"),
            "type": "template", "template": template}


def _failed(message: OutgoingMessage, error: str, retryable: bool, failure: str) -> SendResult:
    return SendResult(contact_id=message.contact_id, ok=False, error=error, retryable=retryable, failure=failure)


class _GraphError(NamedTuple):
    code: int | None
    subcode: int | None
    text: str  # for the ledger: status, codes, Meta's message and details, fbtrace_id


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else None


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

    def error(self) -> _GraphError:
        body = self.json()
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):  # not Graph's shape (a proxy, a gateway page)
            detail = self.body[:ERROR_TEXT_CHARS].decode("utf-8", "replace")
            return _GraphError(None, None, f"whatsapp {self.status}: {detail}"[:ERROR_TEXT_CHARS])
        code, subcode = _int(error.get("code")), _int(error.get("error_subcode"))
        data = error.get("error_data")
        details = data.get("details") if isinstance(data, dict) else None
        words = " ".join(str(w) for w in (error.get("message"), details and f"({details})",
                                          error.get("fbtrace_id") and f"fbtrace_id {error['fbtrace_id']}") if w)
        head = f"whatsapp {self.status}" + (f" code {code}" if code is not None else "") + (
            f"/{subcode}" if subcode is not None else "")
        return _GraphError(code, subcode, f"{head}: {words}"[:ERROR_TEXT_CHARS] if words else head)


def _is_tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:  # httpx wraps httpcore's error, which wraps the ssl error
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _transport_failure(message: OutgoingMessage, exc: Exception) -> SendResult:
    """A request that got no HTTP answer. Retryable only where Meta cannot have the message."""
    text = f"whatsapp request failed: {type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS]
    if isinstance(exc, netguard.PrivateAddressRefused):  # the name now resolves inside (a new connection)
        return _failed(message, f"whatsapp host refused: {exc}", False, REFUSED_PRIVATE_ADDRESS)
    if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        return _failed(message, text, True, TIMEOUT)
    if isinstance(exc, httpx.ConnectError):
        if _is_tls_error(exc):
            return _failed(message, text, False, TLS_FAILED)
        return _failed(message, text, True, UNREACHABLE)
    if isinstance(exc, (httpx.WriteError, httpx.WriteTimeout)):
        # The request did not get out whole, and the API acts only on a complete one.
        return _failed(message, text, True, CONNECTION_LOST)
    if isinstance(exc, httpx.LocalProtocolError):  # refused by our own HTTP layer before sending
        return _failed(message, text, False, INVALID_MESSAGE)
    # A read timeout or a connection closed after the request went out: Meta may have accepted the
    # message, and would accept it again.
    return _failed(message, f"outcome unknown, not resent to avoid a duplicate: {text}", False, OUTCOME_UNKNOWN)


@dataclass(eq=False)
class _Call:
    """The shared state of one send(): commits go one at a time (a commit may use one database
    connection), and the first commit that raises stops every message not yet committed."""

    commit: Commit | None
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    commit_error: Exception | None = None


class _Retry(NamedTuple):
    """A rate limit: wait this long (the whole account, or only this message) and send again."""

    wait_s: float
    account: bool


class WhatsappCloudProvider:
    dedupes = False  # a resent request is a second message

    def __init__(self, config: dict[str, Any], *, allow_private_networks: bool = False) -> None:
        self.config = msgspec.convert(config, WhatsappCloudConfig)
        # False: the API host must resolve to public addresses only (shared/platform/netguard.py).
        self.allow_private_networks = allow_private_networks
        self._base = self.config.base_url.rstrip("/")
        self._url = f"{self._base}/{self.config.api_version}/{self.config.phone_number_id}/messages"
        self._shared: http_client.SharedClient | None = None
        # Set by an answer that refuses the token or the account: the rest of the job fails at once
        # instead of hammering Meta with a bad token. (failure class, text)
        self._stopped: tuple[str, str] | None = None

    def _scrub(self, text: str) -> str:
        """The token never reaches a ledger or a log, even if an answer or an exception echoes it."""
        token = self.config.access_token
        return text.replace(token, "[access_token]") if token else text

    @property
    def concurrency(self) -> int:
        """Requests in flight at once (the worker hands it this many messages per call)."""
        return self.config.bounded_concurrency

    async def open(self) -> None:
        """Checks the settings and the API host (a private one is refused) and takes the number's
        shared client. Nothing is sent: the token is first tried by the first message."""
        if self._shared is not None:
            return
        c = self.config
        # Both go into the URL's path: anything else could make it another endpoint.
        if not re.fullmatch(PHONE_NUMBER_ID_RE, c.phone_number_id) or not re.fullmatch(API_VERSION_RE, c.api_version):
            raise ProviderUnavailable("whatsapp phone_number_id must be digits and api_version like v21.0",
                                      retryable=False, failure=REJECTED)
        try:
            url = httpx.URL(self._base)
        except httpx.InvalidURL as exc:
            raise ProviderUnavailable(f"whatsapp base_url is not a URL: {exc}", retryable=False,
                                      failure=REJECTED) from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ProviderUnavailable("whatsapp base_url must be an http(s) URL with a host", retryable=False,
                                      failure=REJECTED)
        if url.scheme == "http" and not c.allow_insecure_auth:
            # The API refuses to save this; a config that got here anyway never sends the token in clear.
            raise ProviderUnavailable("whatsapp base_url is http and allow_insecure_auth is off: the token is "
                                      "only sent over https", retryable=False, failure=TLS_UNAVAILABLE)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            await netguard.resolve(url.host, port, allow_private=self.allow_private_networks, timeout=c.timeout_s)
        except netguard.PrivateAddressRefused as exc:
            log.warning("whatsapp host refused: not a public address", host=url.host,
                        address=str(exc.address) if exc.address else None, kind=exc.why)
            raise ProviderUnavailable(f"whatsapp host refused: {exc}", retryable=False,
                                      failure=REFUSED_PRIVATE_ADDRESS) from exc
        except TimeoutError as exc:
            raise ProviderUnavailable(f"resolving whatsapp host {url.host} timed out", failure=TIMEOUT) from exc
        except (OSError, UnicodeError) as exc:
            raise ProviderUnavailable(f"cannot resolve whatsapp host {url.host}: {exc}", failure=UNREACHABLE) from exc
        self._shared = http_client.acquire(self._client_key(), self._make_client)

    def _client_key(self) -> tuple[Any, ...]:
        # The token only as a hash: a changed token is another client, and no key holds the token.
        c = self.config
        return ("whatsapp_cloud", self._base, c.phone_number_id, hashlib.sha256(c.access_token.encode()).hexdigest(),
                c.bounded_concurrency, self.allow_private_networks)

    def _make_client(self) -> http_client.SharedClient:
        concurrency = self.config.bounded_concurrency
        client = httpx.AsyncClient(
            transport=http_client.guarded_transport(allow_private=self.allow_private_networks,
                                                    max_connections=concurrency),
            trust_env=False,  # a proxy from the environment would connect around the address check
            headers={"User-Agent": "crier", "Accept": "application/json", "Content-Type": "application/json",
                     "Authorization": f"Bearer {self.config.access_token}"},
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

    async def _send_one(self, message: OutgoingMessage, call: _Call) -> SendResult | None:
        """The message's result; None once a commit raised (send() then raises)."""
        if not isinstance(message.content, WhatsappContent):
            return _failed(message, "not a WhatsApp template: whatsapp_cloud sends WhatsappContent", False,
                           INVALID_MESSAGE)
        if not _E164.fullmatch(message.to):
            return _failed(message, f"not an E.164 phone number: {message.to!r}", False, ADDRESS_DEAD)
        try:
            payload = msgspec.json.encode(template_payload(message.to, message.content))
        except TemplateError as exc:
            return _failed(message, f"whatsapp template: {exc}", False, INVALID_MESSAGE)
        shared = self._shared
        assert shared is not None
        for times in range(MAX_RATE_LIMITED):
            async with shared.in_flight:
                await shared.wait_if_paused()  # a rate limit paused the number: nobody sends meanwhile
                if call.commit_error is not None:
                    return None
                if self._stopped is not None:
                    failure, text = self._stopped
                    return _failed(message, f"not sent: {text}", False, failure)
                if call.commit is not None and (refusal := await self._commit(message, call)) is not True:
                    return refusal
                try:
                    answer = await self._post(shared, payload)
                except (httpx.HTTPError, netguard.PrivateAddressRefused) as exc:
                    result = _transport_failure(message, exc)
                    return msgspec.structs.replace(result, error=self._scrub(result.error or ""))
                except TimeoutError:
                    return _failed(message, f"outcome unknown, not resent to avoid a duplicate: no whole answer "
                                            f"within {self._deadline_s:g} s", False, OUTCOME_UNKNOWN)
                except Exception as exc:  # anything else after the commit: it may have gone out
                    log.exception("whatsapp request failed unexpectedly", phone_number_id=self.config.phone_number_id)
                    return _failed(message, self._scrub(f"outcome unknown: {type(exc).__name__}: {exc}")
                                   [:ERROR_TEXT_CHARS], False, OUTCOME_UNKNOWN)
                outcome = self._result(message, answer, times)
                if isinstance(outcome, SendResult):
                    return outcome
                if outcome.account:  # the whole number waits, this message included (next turn)
                    shared.pause(outcome.wait_s)
            if not outcome.account:  # only this recipient waits, outside the bound on requests in flight
                await asyncio.sleep(outcome.wait_s)
        return _failed(message, f"whatsapp: rate limited {MAX_RATE_LIMITED} times in a row", True, DEFERRED)

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

    async def _post(self, shared: http_client.SharedClient, payload: bytes) -> _Answer:
        async with asyncio.timeout(self._deadline_s):
            async with shared.client.stream("POST", self._url, content=payload,
                                            timeout=self.config.timeout_s) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= MAX_ANSWER_BYTES:  # Meta's answers are well under 1 KiB; the rest is not read
                        break
                return _Answer(response.status_code, response.headers, bytes(body[:MAX_ANSWER_BYTES]))

    def _result(self, message: OutgoingMessage, answer: _Answer, times: int) -> SendResult | _Retry:
        status = answer.status
        if 200 <= status < 300:
            body = answer.json()
            sent = body.get("messages") if isinstance(body, dict) else None
            first = sent[0] if isinstance(sent, list) and sent and isinstance(sent[0], dict) else {}
            wamid = first.get("id") if isinstance(first.get("id"), str) else None
            return SendResult(contact_id=message.contact_id, ok=True, provider_message_id=wamid)
        code, subcode, text = answer.error()
        text = self._scrub(text)
        if status == 429 or code in _RATE_CODES or code == _PAIR_RATE_CODE:
            # Nothing was accepted: wait as asked (or back off) and send it again, which is not another attempt.
            wait = retry_after_s(answer.headers.get("retry-after"))
            wait = _backoff_s(times) if wait is None else wait
            account = code != _PAIR_RATE_CODE
            log.info("whatsapp rate limited", phone_number_id=self.config.phone_number_id, code=code,
                     wait_s=wait, whole_account=account)
            return _Retry(wait, account)
        if status in (401, 403) or code in _ACCOUNT_CODES or (code, subcode) == _NO_SUCH_OBJECT:
            if self._stopped is None:
                log.warning("whatsapp refused the token or the account", phone_number_id=self.config.phone_number_id,
                            status=status, code=code, subcode=subcode)
            self._stopped = (AUTH_FAILED, text)
            return _failed(message, text, False, AUTH_FAILED)
        if code in _DEAD_CODES:
            return _failed(message, text, False, ADDRESS_DEAD)
        if code in _INVALID_CODES:
            return _failed(message, text, False, INVALID_MESSAGE)
        if code in _TRANSIENT_CODES or status >= 500:
            return _failed(message, text, True, DEFERRED)
        return _failed(message, text, False, REJECTED)  # 131047 (outside the window), 131049, 131050, 132015 ...

    async def close(self) -> None:
        """Gives the number's client back: its connections stay open for the next job."""
        if self._shared is not None:
            http_client.release(self._shared)
            self._shared = None
