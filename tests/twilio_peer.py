"""A local stand-in for Twilio's Messages API (stdlib ThreadingHTTPServer on 127.0.0.1, in a thread
of the test process) that answers like Twilio and records what it accepts.

    with TwilioPeer(fail_permanently={"+15550000001": 21610}, fail_transiently={"+15550000002": 2}) as peer:
        ... send through peer.provider_config()
        assert peer.received_by("+15550000003")[0].body == "Hi"

A thread per connection (HTTP/1.1 keep-alive), so concurrent requests really are concurrent and
`max_in_flight` shows how many a client had out at once. Run `python -m tests.twilio_peer --port
8099` for a standalone peer that prints one JSON line per message.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import EllipsisType
from typing import Any
from urllib.parse import parse_qs

import pytest

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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def num_segments(body: str) -> int:
    single, multi = (160, 153) if set(body) <= _GSM7 else (70, 67)
    return 1 if len(body) <= single else -(-len(body) // multi)


def error(status: int, code: int, **words: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    template = MESSAGES.get(code, "Error {code}")
    message = template.format(code=code, **{k: words.get(k, "") for k in ("to", "from_", "path")})
    return status, {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
                    "status": status}, {}


class TwilioPeer:
    """Behaviour per number (the form's To):
    - `fail_permanently={number: code}` → 400 with that Twilio code, every time;
    - `fail_transiently={number: n}` → 500 (code 20500) for the first n requests, then accepted;
    - `rate_limit={number: n}` → 429 (code 20429, `Retry-After: retry_after`) for the first n requests.
    And for all: `revoke_after=n` → the first n requests are authenticated as usual, every later one
    is a 401 (code 20003), as if the token was rotated then; `delay` seconds are spent on each
    request after it was taken (an accepted one is recorded first) and before it is answered.
    Credentials: `account_sid`/`auth_token`, or any of `api_keys={sid: secret}`.
    Change behaviour while running with `configure(...)`."""

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
        self.host, self.port = host, port or free_port(host)
        self.account_sid, self.auth_token, self.api_keys = account_sid, auth_token, dict(api_keys or {})
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._attempts: dict[str, int] = {}
        self._requests = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._connections: set[socket.socket] = set()
        self._connections_made = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.configure(fail_permanently=fail_permanently or {}, fail_transiently=fail_transiently or {},
                       rate_limit=rate_limit or {}, retry_after=retry_after, revoke_after=revoke_after, delay=delay)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> TwilioPeer:
        assert self._server is None, "already running"
        peer = self

        class Handler(_Handler):
            pass

        Handler.peer = peer
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"twilio-peer-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open (keep-alive) connection."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        assert self._thread is not None
        self._thread.join(5)
        self._server = self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> TwilioPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(
        self,
        *,
        fail_permanently: dict[str, int] | None = None,
        fail_transiently: dict[str, int] | None = None,
        rate_limit: dict[str, int] | None = None,
        retry_after: str | None = None,
        revoke_after: int | None | EllipsisType = ...,  # ... leaves it as is; None: never revoked
        delay: float | None = None,
    ) -> None:
        with self._lock:
            if fail_permanently is not None:
                self._fail_permanently = dict(fail_permanently)
            if fail_transiently is not None:
                self._fail_transiently = dict(fail_transiently)
            if rate_limit is not None:
                self._rate_limit = dict(rate_limit)
            if retry_after is not None:
                self.retry_after = retry_after
            if revoke_after is not ...:
                self.revoke_after = revoke_after
            if delay is not None:
                self.delay = delay

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """A twilio provider config that reaches this peer (its account, a From number, plain http,
        which the API accepts only with allow_insecure_auth)."""
        return {"account_sid": self.account_sid, "auth_token": self.auth_token, "from_number": FROM_NUMBER,
                "base_url": self.base_url, "allow_insecure_auth": True, "timeout_s": 10.0, **overrides}

    # -- what was received -------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def received_by(self, number: str) -> list[Received]:
        return [r for r in self.received if r.to == number]

    def attempts(self, number: str) -> int:
        """Authenticated requests to this number, accepted or not."""
        with self._lock:
            return self._attempts.get(number, 0)

    @property
    def requests(self) -> int:
        """Every request the peer answered or is answering, authenticated or not."""
        with self._lock:
            return self._requests

    @property
    def connections(self) -> int:
        """TCP connections accepted (keep-alive: a client reusing its connections opens few)."""
        with self._lock:
            return self._connections_made

    @property
    def max_in_flight(self) -> int:
        """The most requests taken and not yet answered at one moment."""
        with self._lock:
            return self._max_in_flight

    def clear(self) -> None:
        with self._lock:
            self._received.clear()
            self._attempts.clear()
            self._requests = self._max_in_flight = self._connections_made = 0

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait (without blocking the event loop) until at least `count` messages were accepted."""
        deadline = time.monotonic() + timeout
        while len(received := self.received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Twilio peer accepted {len(received)} of {count} messages in {timeout}s")
            await asyncio.sleep(0.02)
        return received

    # -- called on the peer's threads --------------------------------------------------------------

    def _begin(self) -> int:
        with self._lock:
            self._requests += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            return self._requests

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _authenticated(self, header: str | None, number: int) -> tuple[str, str] | None:
        if not header or not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        with self._lock:
            if self.revoke_after is not None and number > self.revoke_after:
                return None
        if (user == self.account_sid and password == self.auth_token) or self.api_keys.get(user) == password:
            return user, password
        return None

    def answer(self, path: str, headers: Any, raw: bytes, number: int) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, extra headers) for one request, as Twilio would answer it."""
        auth = self._authenticated(headers.get("Authorization"), number)
        if auth is None:
            status, body, extra = error(401, 20003)
            return status, body, {"WWW-Authenticate": 'Basic realm="Twilio API"', **extra}
        match = _PATH.match(path.split("?", 1)[0])
        if match is None or match.group(1) != self.account_sid:
            return error(404, 20404, path=path)
        form = {k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()}
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
            self._attempts[to] = self._attempts.get(to, 0) + 1
            if to in self._fail_permanently:
                return error(400, self._fail_permanently[to], to=to, from_=from_ or "")
            if self._rate_limit.get(to, 0) > 0:
                self._rate_limit[to] -= 1
                status, payload, _ = error(429, 20429)
                return status, payload, {"Retry-After": self.retry_after}
            if self._fail_transiently.get(to, 0) > 0:
                self._fail_transiently[to] -= 1
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


class _Handler(BaseHTTPRequestHandler):
    peer: TwilioPeer
    protocol_version = "HTTP/1.1"  # keep-alive, as Twilio's API
    timeout = 30  # an idle keep-alive connection ends its thread after this

    def setup(self) -> None:
        super().setup()
        with self.peer._lock:
            self.peer._connections.add(self.connection)
            self.peer._connections_made += 1

    def finish(self) -> None:
        with self.peer._lock:
            self.peer._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        number = self.peer._begin()
        try:
            status, body, headers = self.peer.answer(self.path, self.headers, raw, number)
            if self.peer.delay:
                time.sleep(self.peer.delay)
        finally:
            # Out of flight before the answer is written: the client can only start another request
            # once it has this answer, so max_in_flight never counts one the client already let go.
            self.peer._end()
        self._reply(status, body, headers)

    def do_GET(self) -> None:
        self._reply(*error(405, 20004))

    do_PUT = do_DELETE = do_PATCH = do_GET


@pytest.fixture
def twilio_peer() -> Iterator[TwilioPeer]:
    """A started peer with no failures configured; reconfigure it with `twilio_peer.configure(...)`."""
    with TwilioPeer() as peer:
        yield peer


def main() -> None:
    parser = argparse.ArgumentParser(description="a recording Twilio Messages API peer: prints one JSON line per message")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--account-sid", default=ACCOUNT_SID)
    parser.add_argument("--auth-token", default=AUTH_TOKEN)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    peer = TwilioPeer(host=args.host, port=args.port, account_sid=args.account_sid, auth_token=args.auth_token,
                      delay=args.delay).start()
    config = {k: v for k, v in peer.provider_config().items() if k != "timeout_s"}
    print(json.dumps({"listening": f"{peer.host}:{peer.port}", "provider_config": config}), flush=True)
    seen = 0
    try:
        while True:
            received = peer.received
            for r in received[seen:]:
                print(json.dumps({"sid": r.sid, "to": r.to, "from": r.from_, "body": r.body}), flush=True)
            seen = len(received)
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()


if __name__ == "__main__":
    main()
