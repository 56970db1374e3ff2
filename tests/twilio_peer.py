"""A local stand-in for Twilio's Messages API (stdlib ThreadingHTTPServer on 127.0.0.1, in a thread
of the test process) that answers like Twilio and records what it accepts.

    with TwilioPeer(fail_permanently={"+15550000001": 21610}, fail_transiently={"+15550000002": 2}) as peer:
        ... send through peer.provider_config()
        assert peer.received_by("+15550000003")[0].body == "Hi"

The server and its bookkeeping are tests/http_peer.py's. Run `python -m tests.twilio_peer --port
8099` for a standalone peer that prints one JSON line per message.
"""
from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from types import EllipsisType
from typing import Any

import pytest

from tests.http_peer import KEEP, Answer, HttpPeer, argument_parser, form_fields, serve

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "peer-auth-token-5f3c0d9e"
FROM_NUMBER = "+15005550006"  # Twilio's magic test number for a valid From
_PATH = re.compile(r"^/2010-04-01/Accounts/([^/]+)/Messages\.json$")
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
_GSM7 = set("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
            "¿abcdefghijklmnopqrstuvwxyzäöñüà")
MAX_BODY_CHARS = 1600

# Twilio's own words for the errors the peer gives (https://www.twilio.com/docs/api/errors).
MESSAGES = {
    20003: "Authenticate",
    20404: "The requested resource {path} was not found",
    20429: "Too Many Requests",
    20500: "An internal server error has occurred",
    21211: "The 'To' number {to} is not a valid phone number.",
    21212: "The 'From' number {from_} is not a valid phone number, shortcode, or alphanumeric sender ID.",
    21408: "Permission to send an SMS has not been enabled for the region indicated by the 'To' number: {to}.",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21610: "Attempt to send to unsubscribed recipient",
    21612: "The 'To' phone number: {to}, is not currently reachable using the 'From' phone number: {from_} via SMS.",
    21614: "'To' number is not a valid mobile number",
    21617: "The concatenated message body exceeds the 1600 character limit.",
}


@dataclass(frozen=True)
class Received:
    """One message the peer accepted (answered 201)."""

    sid: str
    to: str
    body: str
    from_: str | None
    messaging_service_sid: str | None
    status_callback: str | None
    form: dict[str, str]
    auth: tuple[str, str]  # the basic-auth user and password it came with
    at: float = field(default_factory=time.time)


def num_segments(body: str) -> int:
    single, multi = (160, 153) if set(body) <= _GSM7 else (70, 67)
    return 1 if len(body) <= single else -(-len(body) // multi)


def error(status: int, code: int, **words: str) -> Answer:
    template = MESSAGES.get(code, "Error {code}")
    message = template.format(code=code, **{k: words.get(k, "") for k in ("to", "from_", "path")})
    return status, {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
                    "status": status}, {}


class TwilioPeer(HttpPeer[Received]):
    """Behaviour per number (the form's To):
    - `fail_permanently={number: code}` → 400 with that Twilio code, every time;
    - `fail_transiently={number: n}` → 500 (code 20500) for the first n requests, then accepted;
    - `rate_limit={number: n}` → 429 (code 20429, `Retry-After: retry_after`) for the first n requests.
    And for all: `revoke_after=n` → the first n requests are authenticated as usual, every later one
    is a 401 (code 20003), as if the token was rotated then; `delay` seconds are spent on each
    request after it was taken (an accepted one is recorded first) and before it is answered.
    Credentials: `account_sid`/`auth_token`, or any of `api_keys={sid: secret}`.
    Change behaviour while running with `configure(...)`."""

    name = "Twilio"
    content_type = "application/json; charset=utf-8"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        account_sid: str = ACCOUNT_SID,
        auth_token: str = AUTH_TOKEN,
        api_keys: dict[str, str] | None = None,
        fail_permanently: dict[str, int] | None = None,
        fail_transiently: dict[str, int] | None = None,
        rate_limit: dict[str, int] | None = None,
        retry_after: str = "1",
        revoke_after: int | None = None,
        delay: float = 0.0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.account_sid, self.auth_token, self.api_keys = account_sid, auth_token, dict(api_keys or {})
        self.configure(fail_permanently=fail_permanently or {}, fail_transiently=fail_transiently or {},
                       rate_limit=rate_limit or {}, retry_after=retry_after, revoke_after=revoke_after, delay=delay)

    def configure(
        self,
        *,
        fail_permanently: dict[str, int] | EllipsisType = KEEP,
        fail_transiently: dict[str, int] | EllipsisType = KEEP,
        rate_limit: dict[str, int] | EllipsisType = KEEP,
        retry_after: str | EllipsisType = KEEP,
        revoke_after: int | None | EllipsisType = KEEP,  # None: never revoked
        delay: float | EllipsisType = KEEP,
    ) -> None:
        """Changes what is given; the rest stays as it is."""
        self._set(_fail_permanently=fail_permanently, _fail_transiently=fail_transiently, _rate_limit=rate_limit,
                  retry_after=retry_after, revoke_after=revoke_after, delay=delay)

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """A twilio provider config that reaches this peer (its account, a From number, plain http,
        which the API accepts only with allow_insecure_auth)."""
        return {"account_sid": self.account_sid, "auth_token": self.auth_token, "from_number": FROM_NUMBER,
                "base_url": self.base_url, "allow_insecure_auth": True, "timeout_s": 10.0, **overrides}

    # -- called on the peer's threads --------------------------------------------------------------

    def _authenticated(self, header: str | None, number: int) -> tuple[str, str] | None:
        if not header or not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if self._revoked(number):
            return None
        if (user == self.account_sid and password == self.auth_token) or self.api_keys.get(user) == password:
            return user, password
        return None

    def answer(self, path: str, headers: Any, raw: bytes, number: int) -> Answer:
        """As Twilio would answer it."""
        auth = self._authenticated(headers.get("Authorization"), number)
        if auth is None:
            status, body, extra = error(401, 20003)
            return status, body, {"WWW-Authenticate": 'Basic realm="Twilio API"', **extra}
        match = _PATH.match(path.split("?", 1)[0])
        if match is None or match.group(1) != self.account_sid:
            return error(404, 20404, path=path)
        form = form_fields(raw.decode("utf-8", "replace"))
        to, body, from_ = form.get("To", ""), form.get("Body", ""), form.get("From")
        service = form.get("MessagingServiceSid")
        if not to:
            return error(400, 21604)
        if not from_ and not service:
            return error(400, 21603)
        if not body:
            return error(400, 21602)
        if not _E164.match(to):
            return error(400, 21211, to=to)
        if from_ and not service and not _E164.match(from_):
            return error(400, 21212, from_=from_)
        if len(body) > MAX_BODY_CHARS:
            return error(400, 21617)
        with self._lock:
            self._attempt(to)
            if to in self._fail_permanently:
                return error(400, self._fail_permanently[to], to=to, from_=from_ or "")
            if self._use_up(self._rate_limit, to):
                status, payload, _ = error(429, 20429)
                return status, payload, {"Retry-After": self.retry_after}
            if self._use_up(self._fail_transiently, to):
                return error(500, 20500)
            sid = "SM" + uuid.uuid4().hex
            self._received.append(Received(sid=sid, to=to, body=body, from_=from_, messaging_service_sid=service,
                                           status_callback=form.get("StatusCallback"), form=form, auth=auth))
        now = formatdate(usegmt=True)
        return 201, {
            "account_sid": self.account_sid, "api_version": "2010-04-01", "body": body, "date_created": now,
            "date_sent": None, "date_updated": now, "direction": "outbound-api", "error_code": None,
            "error_message": None, "from": from_, "messaging_service_sid": service, "num_media": "0",
            "num_segments": str(num_segments(body)), "price": None, "price_unit": "USD", "sid": sid,
            "status": "accepted" if service and not from_ else "queued", "to": to,
            "subresource_uris": {"media": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}/Media.json"},
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }, {}

    def not_allowed(self) -> Answer:
        return error(405, 20004)


@pytest.fixture
def twilio_peer() -> Iterator[TwilioPeer]:
    """A started peer with no failures configured; reconfigure it with `twilio_peer.configure(...)`."""
    with TwilioPeer() as peer:
        yield peer


def main() -> None:
    parser = argument_parser("a recording Twilio Messages API peer: prints one JSON line per message", 8099)
    parser.add_argument("--account-sid", default=ACCOUNT_SID)
    parser.add_argument("--auth-token", default=AUTH_TOKEN)
    args = parser.parse_args()
    peer = TwilioPeer(host=args.host, port=args.port, account_sid=args.account_sid, auth_token=args.auth_token,
                      delay=args.delay).start()
    serve(peer, lambda r: {"sid": r.sid, "to": r.to, "from": r.from_, "body": r.body})


if __name__ == "__main__":
    main()
