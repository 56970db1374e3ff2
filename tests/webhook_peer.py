"""A local webhook receiver (stdlib ThreadingHTTPServer on 127.0.0.1, in a thread of the test
process) that checks every request the Standard Webhooks way, with the standardwebhooks package a
real receiver would use, and records what it accepts.

    with WebhookPeer(fail_transiently=1) as peer:
        ... send through peer.provider_config()
        assert peer.received[0].body["data"]["payload"] == {...}

A bad or missing signature, or a timestamp more than 5 minutes off, is a 401 and not recorded.
A thread per connection (HTTP/1.1 keep-alive), so concurrent requests really are concurrent and
`max_in_flight` shows how many a client had out at once. Run `python -m tests.webhook_peer --port
8098` for a standalone receiver that prints its provider config, then one JSON line per delivery.
"""
from __future__ import annotations

import argparse
import asyncio
import binascii
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import EllipsisType
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from shared.channels.webhook import new_secret

TOLERANCE_S = 5 * 60  # Standard Webhooks: refuse a timestamp further off than this (replays)
PATH = "/hooks/crier"


@dataclass(frozen=True)
class Delivery:
    """One request the peer accepted (answered 2xx)."""

    id: str  # webhook-id
    timestamp: int  # webhook-timestamp
    body: Any  # the JSON body, parsed
    raw: bytes
    headers: dict[str, str]  # names in lower case
    path: str
    at: float = field(default_factory=time.time)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class WebhookPeer:
    """Behaviour, checked in this order for a request whose signature verifies:
    - `gone_after=n` → the first n requests are answered as usual, every later one is a 410;
    - `status_for={webhook_id: status}` → that status for that id, every time;
    - `rate_limit=n` → 429 (`Retry-After: retry_after`) for the next n requests;
    - `fail_transiently=n` → 500 for the next n requests;
    - `redirect="/elsewhere"` → 307 to it for every request (a request that follows it is counted
      in `requests` like any other);
    else 200 and recorded. `delay` seconds are spent on each request after it was taken (an
    accepted one is recorded first) and before it is answered. Change it while running with
    `configure(...)`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        secret: str | None = None,
        gone_after: int | None = None,
        status_for: dict[str, int] | None = None,
        rate_limit: int = 0,
        retry_after: str = "1",
        fail_transiently: int = 0,
        redirect: str | None = None,
        delay: float = 0.0,
    ) -> None:
        self.host, self.port = host, port or free_port(host)
        self.secret = secret or new_secret()
        self._verifier = Webhook(self.secret)
        self._lock = threading.Lock()
        self._received: list[Delivery] = []
        self._attempts: dict[str, int] = {}
        self._ids: list[str] = []  # the webhook-id of every request that verified, in order
        self._refused: list[str] = []  # why each request that did not verify was refused
        self._duplicates = 0
        self._requests = self._in_flight = self._max_in_flight = self._connections_made = 0
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.configure(gone_after=gone_after, status_for=status_for or {}, rate_limit=rate_limit,
                       retry_after=retry_after, fail_transiently=fail_transiently, redirect=redirect, delay=delay)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> WebhookPeer:
        assert self._server is None, "already running"

        class Handler(_Handler):
            peer = self

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"webhook-peer-{self.port}", daemon=True)
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

    def __enter__(self) -> WebhookPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(
        self,
        *,
        gone_after: int | None | EllipsisType = ...,  # ... leaves it as is; None: never gone
        status_for: dict[str, int] | None = None,
        rate_limit: int | None = None,
        retry_after: str | None = None,
        fail_transiently: int | None = None,
        redirect: str | None | EllipsisType = ...,
        delay: float | None = None,
    ) -> None:
        with self._lock:
            if gone_after is not ...:
                self.gone_after = gone_after
            if status_for is not None:
                self._status_for = dict(status_for)
            if rate_limit is not None:
                self._rate_limit = rate_limit
            if retry_after is not None:
                self.retry_after = retry_after
            if fail_transiently is not None:
                self._fail_transiently = fail_transiently
            if redirect is not ...:
                self.redirect = redirect
            if delay is not None:
                self.delay = delay

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{PATH}"

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """A webhook provider config that reaches this peer (plain http, which needs allow_insecure)."""
        return {"url": self.url, "secret": self.secret, "allow_insecure": True, "timeout_s": 10.0, **overrides}

    # -- what was received -------------------------------------------------------------------------

    @property
    def received(self) -> list[Delivery]:
        with self._lock:
            return list(self._received)

    def attempts(self, webhook_id: str) -> int:
        """Requests with this webhook-id whose signature verified, accepted or not."""
        with self._lock:
            return self._attempts.get(webhook_id, 0)

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)

    @property
    def refused(self) -> list[str]:
        """Why each request that failed verification was refused (401)."""
        with self._lock:
            return list(self._refused)

    @property
    def duplicates(self) -> int:
        """Accepted deliveries whose webhook-id an earlier accepted one had (what a receiver drops)."""
        with self._lock:
            return self._duplicates

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    @property
    def connections(self) -> int:
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
            self._ids.clear()
            self._refused.clear()
            self._duplicates = self._requests = self._max_in_flight = self._connections_made = 0

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """Wait (without blocking the event loop) until at least `count` deliveries were accepted."""
        deadline = time.monotonic() + timeout
        while len(received := self.received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the webhook peer accepted {len(received)} of {count} deliveries in {timeout}s")
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

    def verify(self, raw: bytes, headers: dict[str, str]) -> str | None:
        """Why this request is not authentic, or None."""
        stamp = headers.get("webhook-timestamp", "")
        try:
            if abs(time.time() - int(stamp)) > TOLERANCE_S:
                return "timestamp outside the tolerance"
        except ValueError:
            return "no webhook-timestamp"
        try:
            self._verifier.verify(raw, headers)
        except WebhookVerificationError as exc:
            return str(exc)
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:  # a malformed signature header or body
            return f"malformed: {type(exc).__name__}"
        return None

    def answer(self, path: str, headers: dict[str, str], raw: bytes, number: int
               ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, extra headers) for one request."""
        if (why := self.verify(raw, headers)) is not None:
            with self._lock:
                self._refused.append(why)
            return 401, {"error": "invalid signature", "detail": why}, {}
        webhook_id, stamp = headers["webhook-id"], int(headers["webhook-timestamp"])
        with self._lock:
            self._ids.append(webhook_id)
            self._attempts[webhook_id] = self._attempts.get(webhook_id, 0) + 1
            if self.gone_after is not None and number > self.gone_after:
                return 410, {"error": "this endpoint was removed"}, {}
            if webhook_id in self._status_for:
                status = self._status_for[webhook_id]
                return status, {"error": f"told to answer {status}"}, {}
            if self._rate_limit > 0:
                self._rate_limit -= 1
                return 429, {"error": "slow down"}, {"Retry-After": self.retry_after}
            if self._fail_transiently > 0:
                self._fail_transiently -= 1
                return 500, {"error": "internal error"}, {}
            if self.redirect is not None:
                return 307, {}, {"Location": self.redirect}
            self._duplicates += any(d.id == webhook_id for d in self._received)
            self._received.append(Delivery(id=webhook_id, timestamp=stamp, body=json.loads(raw), raw=raw,
                                           headers=headers, path=path))
        return 200, {"ok": True}, {}


class _Handler(BaseHTTPRequestHandler):
    peer: WebhookPeer
    protocol_version = "HTTP/1.1"  # keep-alive
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
        payload = b"" if status in (204, 304) else json.dumps(body).encode()  # those two never have a body
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        number = self.peer._begin()
        try:
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, body, extra = self.peer.answer(self.path, headers, raw, number)
            if self.peer.delay:
                time.sleep(self.peer.delay)
        finally:
            # Out of flight before the answer is written: the client can only start another request
            # once it has this answer, so max_in_flight never counts one the client already let go.
            self.peer._end()
        self._reply(status, body, extra)

    def do_GET(self) -> None:
        self._reply(405, {"error": "POST only"}, {"Allow": "POST"})

    do_PUT = do_DELETE = do_PATCH = do_GET


@pytest.fixture
def webhook_peer() -> Iterator[WebhookPeer]:
    """A started peer with no failures configured; reconfigure it with `webhook_peer.configure(...)`."""
    with WebhookPeer() as peer:
        yield peer


def main() -> None:
    parser = argparse.ArgumentParser(description="a recording Standard Webhooks receiver: prints one JSON line "
                                                 "per delivery")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8098)
    parser.add_argument("--secret", help="the whsec_ signing secret (default: a new one, printed)")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    peer = WebhookPeer(host=args.host, port=args.port, secret=args.secret, delay=args.delay).start()
    config = {k: v for k, v in peer.provider_config().items() if k != "timeout_s"}
    print(json.dumps({"listening": f"{peer.host}:{peer.port}", "provider_config": config}), flush=True)
    seen, ids = 0, set()
    try:
        while True:
            received = peer.received
            for d in received[seen:]:
                print(json.dumps({"id": d.id, "timestamp": d.timestamp, "duplicate": d.id in ids, "body": d.body}),
                      flush=True)
                ids.add(d.id)
            seen = len(received)
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()


if __name__ == "__main__":
    main()
