"""SMS (and RCS, which Twilio sends through the same API) with Twilio's Messages API: one form POST
per message, a job's messages sent concurrently (http_send.py) on a client kept per account
(http_client.py).

Twilio does not dedupe: a request that may have reached it and got no answer is never resent
(OUTCOME_UNKNOWN); only failures that prove nothing was created are retryable. A 429 created
nothing: the whole account waits as long as it asks, then the message goes again.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import quote

import httpx
import msgspec

from shared.channels import http_client
from shared.channels.http_send import (
    ERROR_TEXT_CHARS,
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
    REJECTED,
    OutgoingMessage,
    SendResult,
    SmsContent,
)
from shared.platform.logging import get_logger

DEFAULT_BASE_URL = "https://api.twilio.com"
API_VERSION = "2010-04-01"
DEFAULT_CONCURRENCY, MAX_CONCURRENCY = 10, 100  # Twilio answers 429 past about 100 concurrent requests per account
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


def _error(answer: Answer) -> tuple[int | None, str]:
    """Twilio's error code and a short text for the ledger (its JSON error body, or the raw start)."""
    body = answer.json()
    if isinstance(body, dict):
        code = body.get("code") if isinstance(body.get("code"), int) else None
        detail = str(body.get("message") or "")
    else:
        code, detail = None, answer.excerpt()
    text = f"twilio {answer.status}" + (f" code {code}" if code is not None else "")
    return code, f"{text}: {detail}"[:ERROR_TEXT_CHARS] if detail else text


class TwilioProvider(HttpProvider[dict[str, str]]):
    name = "twilio"

    def __init__(self, config: dict[str, Any], *, allow_private_networks: bool = False) -> None:
        self.config = msgspec.convert(config, TwilioConfig)
        super().__init__(allow_private_networks=allow_private_networks)
        self._base = self.config.base_url.rstrip("/")
        self._messages_url = f"{self._base}/{API_VERSION}/Accounts/{quote(self.config.account_sid, safe='')}/Messages.json"

    @property
    def _log_fields(self) -> dict[str, Any]:
        return {"account_sid": self.config.account_sid}

    async def open(self) -> None:
        """Checks the API host (a private one is refused) and takes the account's shared client.
        Nothing is sent: the credentials are first tried by the first message."""
        if self._shared is not None:
            return
        url = self._endpoint(self._base, "base_url")
        await self._resolve(url.host, url.port, url.scheme)
        self._shared = http_client.acquire(self._client_key(), self._make_client)

    def _client_key(self) -> tuple[Any, ...]:
        # The secret only as a hash: a changed token is another client, and no key holds the token.
        user, secret = self.config.credentials
        return ("twilio", self._base, self.config.account_sid, user, hashlib.sha256(secret.encode()).hexdigest(),
                self.config.bounded_concurrency, self.allow_private_networks)

    def _client_options(self) -> dict[str, Any]:
        return {**super()._client_options(), "auth": httpx.BasicAuth(*self.config.credentials)}

    def _request(self, message: OutgoingMessage) -> dict[str, str] | SendResult:
        """The form of `message`'s POST."""
        if not isinstance(message.content, SmsContent):
            return failed(message, "not an SMS: twilio sends SmsContent", False, INVALID_MESSAGE)
        if not _E164.match(message.to):
            return failed(message, f"not an E.164 phone number: {message.to!r}", False, ADDRESS_DEAD)
        if not message.content.body:
            return failed(message, "empty message body", False, INVALID_MESSAGE)
        c = self.config
        form = {"To": message.to, "Body": message.content.body}
        if c.from_number:
            form["From"] = c.from_number
        if c.messaging_service_sid:
            form["MessagingServiceSid"] = c.messaging_service_sid
        if c.status_callback_url:
            form["StatusCallback"] = c.status_callback_url
        return form

    async def _post(self, message: OutgoingMessage, form: dict[str, str]) -> Answer:
        return await post(self._client, self._messages_url, self.config.timeout_s, data=form)

    def _result(self, message: OutgoingMessage, answer: Answer) -> SendResult:
        status = answer.status
        if 200 <= status < 300:
            body = answer.json()
            sid = body.get("sid") if isinstance(body, dict) and isinstance(body.get("sid"), str) else None
            return SendResult(contact_id=message.contact_id, ok=True, provider_message_id=sid)
        code, text = _error(answer)
        if status in (401, 403):
            # Twilio may lock an account that keeps trying a bad login: the rest of the job is not sent.
            if self._stopped is None:
                log.warning("twilio refused the credentials", account_sid=self.config.account_sid, status=status,
                            code=code)
            self._stopped = (AUTH_FAILED, text)
            return failed(message, text, False, AUTH_FAILED)
        if status >= 500:
            return failed(message, text, True, DEFERRED)
        if code in _DEAD_CODES:
            return failed(message, text, False, ADDRESS_DEAD)
        if code in _INVALID_CODES:
            return failed(message, text, False, INVALID_MESSAGE)
        return failed(message, text, False, REJECTED)
