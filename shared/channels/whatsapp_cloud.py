"""WhatsApp template messages through Meta's WhatsApp Business Cloud API (a Graph API endpoint): one
JSON POST per message to {base_url}/{api_version}/{phone_number_id}/messages with a bearer token, a
job's messages sent concurrently (http_send.py) on a client kept per business phone number
(http_client.py), the way twilio.py sends SMS.

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

import hashlib
import re
from typing import Any, NamedTuple

import msgspec

from shared.channels import http_client
from shared.channels.http_send import (
    ERROR_TEXT_CHARS,
    MAX_RETRY_AFTER_S,
    Answer,
    HttpProvider,
    Retry,
    failed,
    parse_retry_after,
    post,
)
from shared.channels.provider import (
    ADDRESS_DEAD,
    AUTH_FAILED,
    DEFERRED,
    INVALID_MESSAGE,
    REJECTED,
    TLS_UNAVAILABLE,
    OutgoingMessage,
    ProviderUnavailable,
    SendResult,
    WhatsappContent,
)
from shared.platform.logging import get_logger

DEFAULT_BASE_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v21.0"
# Both go into the URL's path, so nothing else may: the schema anchors them (^...$), open() fullmatches.
API_VERSION_RE = r"v[0-9]{1,3}\.[0-9]{1,3}"
PHONE_NUMBER_ID_RE = r"[0-9]{1,32}"
DEFAULT_CONCURRENCY, MAX_CONCURRENCY = 10, 100  # Cloud API throughput is 80 messages/s per number by default
BACKOFF_S = 1.0  # the first wait of a rate limit without Retry-After (Meta's throttling errors carry none), doubled each time
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


def _backoff_s(times: int) -> float:
    return min(BACKOFF_S * 2 ** times, MAX_RETRY_AFTER_S)


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


def _graph_error(answer: Answer) -> _GraphError:
    body = answer.json()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):  # not Graph's shape (a proxy, a gateway page)
        return _GraphError(None, None, f"whatsapp {answer.status}: {answer.excerpt()}"[:ERROR_TEXT_CHARS])
    code, subcode = _int(error.get("code")), _int(error.get("error_subcode"))
    data = error.get("error_data")
    details = data.get("details") if isinstance(data, dict) else None
    words = " ".join(str(w) for w in (error.get("message"), details and f"({details})",
                                      error.get("fbtrace_id") and f"fbtrace_id {error['fbtrace_id']}") if w)
    head = f"whatsapp {answer.status}" + (f" code {code}" if code is not None else "") + (
        f"/{subcode}" if subcode is not None else "")
    return _GraphError(code, subcode, f"{head}: {words}"[:ERROR_TEXT_CHARS] if words else head)


class WhatsappCloudProvider(HttpProvider[bytes]):
    name = "whatsapp"
    rate_limit_answer = "whatsapp"  # a rate limit is a 429, or a 400 with a throttling code

    def __init__(self, config: dict[str, Any], *, allow_private_networks: bool = False) -> None:
        self.config = msgspec.convert(config, WhatsappCloudConfig)
        super().__init__(allow_private_networks=allow_private_networks)
        self._base = self.config.base_url.rstrip("/")
        self._url = f"{self._base}/{self.config.api_version}/{self.config.phone_number_id}/messages"

    def scrub(self, text: str) -> str:
        """The token never reaches a ledger or a log, even if an answer or an exception echoes it."""
        token = self.config.access_token
        return text.replace(token, "[access_token]") if token else text

    @property
    def _log_fields(self) -> dict[str, Any]:
        return {"phone_number_id": self.config.phone_number_id}

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
        url = self._endpoint(self._base, "base_url")
        if url.scheme == "http" and not c.allow_insecure_auth:
            # The API refuses to save this; a config that got here anyway never sends the token in clear.
            raise ProviderUnavailable("whatsapp base_url is http and allow_insecure_auth is off: the token is "
                                      "only sent over https", retryable=False, failure=TLS_UNAVAILABLE)
        await self._resolve(url.host, url.port, url.scheme)
        self._shared = http_client.acquire(self._client_key(), self._make_client)

    def _client_key(self) -> tuple[Any, ...]:
        # The token only as a hash: a changed token is another client, and no key holds the token.
        c = self.config
        return ("whatsapp_cloud", self._base, c.phone_number_id, hashlib.sha256(c.access_token.encode()).hexdigest(),
                c.bounded_concurrency, self.allow_private_networks)

    def _client_options(self) -> dict[str, Any]:
        headers = super()._client_options()["headers"]
        return {"headers": {**headers, "Content-Type": "application/json",
                            "Authorization": f"Bearer {self.config.access_token}"}}

    def _request(self, message: OutgoingMessage) -> bytes | SendResult:
        """The JSON body of `message`'s POST."""
        if not isinstance(message.content, WhatsappContent):
            return failed(message, "not a WhatsApp template: whatsapp_cloud sends WhatsappContent", False,
                          INVALID_MESSAGE)
        if not _E164.fullmatch(message.to):
            return failed(message, f"not an E.164 phone number: {message.to!r}", False, ADDRESS_DEAD)
        try:
            return msgspec.json.encode(template_payload(message.to, message.content))
        except TemplateError as exc:
            return failed(message, f"whatsapp template: {exc}", False, INVALID_MESSAGE)

    async def _post(self, message: OutgoingMessage, payload: bytes) -> Answer:
        return await post(self._client, self._url, self.config.timeout_s, content=payload)

    def _outcome(self, message: OutgoingMessage, payload: bytes, answer: Answer, times: int) -> SendResult | Retry:
        status = answer.status
        if 200 <= status < 300:
            body = answer.json()
            sent = body.get("messages") if isinstance(body, dict) else None
            first = sent[0] if isinstance(sent, list) and sent and isinstance(sent[0], dict) else {}
            wamid = first.get("id") if isinstance(first.get("id"), str) else None
            return SendResult(contact_id=message.contact_id, ok=True, provider_message_id=wamid)
        code, subcode, text = _graph_error(answer)
        text = self.scrub(text)
        if status == 429 or code in _RATE_CODES or code == _PAIR_RATE_CODE:
            # Nothing was accepted: wait as asked (or back off) and send it again, which is not another attempt.
            wait = parse_retry_after(answer.headers.get("retry-after"))
            wait = _backoff_s(times) if wait is None else wait
            account = code != _PAIR_RATE_CODE
            log.info("whatsapp rate limited", phone_number_id=self.config.phone_number_id, code=code,
                     wait_s=wait, whole_account=account)
            return Retry(wait, account)
        if status in (401, 403) or code in _ACCOUNT_CODES or (code, subcode) == _NO_SUCH_OBJECT:
            # The token or the account: no message of the job can go, and Meta is not hammered with a bad token.
            if self._stopped is None:
                log.warning("whatsapp refused the token or the account", phone_number_id=self.config.phone_number_id,
                            status=status, code=code, subcode=subcode)
            self._stopped = (AUTH_FAILED, text)
            return failed(message, text, False, AUTH_FAILED)
        if code in _DEAD_CODES:
            return failed(message, text, False, ADDRESS_DEAD)
        if code in _INVALID_CODES:
            return failed(message, text, False, INVALID_MESSAGE)
        if code in _TRANSIENT_CODES or status >= 500:
            return failed(message, text, True, DEFERRED)
        return failed(message, text, False, REJECTED)  # 131047 (outside the window), 131049, 131050, 132015 ...
