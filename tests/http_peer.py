"""What the local API peers (tests/twilio_peer.py, whatsapp_peer.py, telegram_peer.py, fcm_peer.py,
webhook_peer.py) share: a stdlib ThreadingHTTPServer on 127.0.0.1 in a thread of the test process,
a request's body read up to a bound, each answer written whole in one write, and what tests read
of it: what was accepted, the attempts per recipient, the requests, connections and requests in
flight.

A thread per connection (HTTP/1.1 keep-alive), so concurrent requests really are concurrent and
`max_in_flight` shows how many a client had out at once. A peer subclasses HttpPeer and writes
`answer` (its API's checks, words and scripted failures) and `provider_config`; `serve` runs one
standalone for `python -m tests.<name>_peer`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import EllipsisType
from typing import Any, Generic, Self, TypeVar
from urllib.parse import parse_qs

Answer = tuple[int, dict[str, Any], dict[str, str]]  # status, JSON body, extra headers
MAX_BODY_BYTES = 1024 * 1024  # the most of a request's body a peer reads (the APIs take far less)

Received = TypeVar("Received")  # what a peer records of a request it accepted

KEEP: EllipsisType = ...  # a configure() argument not given: the setting stays as it is


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def form_fields(text: str) -> dict[str, str]:
    """An urlencoded form or query string: the last value of each name, blank ones kept."""
    return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}


class HttpPeer(Generic[Received]):
    """The server, its thread and its bookkeeping. A subclass records what it accepts in
    `_received` and counts `_attempts` per recipient (under `_lock`, on the peer's threads)."""

    name = "HTTP"  # the API it stands in for: "the Twilio peer"
    recorded = "messages"  # what it accepts, as wait_for's timeout says
    recipient = "to"  # the field of Received that received_by matches
    content_type = "application/json"  # of every answer with a body
    methods = ("POST",)  # the methods the API takes; any other is answered not_allowed() at once

    def __init__(self, *, host: str, port: int | None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.delay = 0.0
        self.revoke_after: int | None = None
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._attempts: dict[str, int] = {}
        self._requests = self._in_flight = self._max_in_flight = self._connections_made = 0
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> Self:
        assert self._server is None, "already running"

        class Handler(_Handler):
            peer = self

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{self.name.lower()}-peer-{self.port}", daemon=True)
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _set(self, **settings: Any) -> None:
        """Sets each setting that is not KEEP, a dict or set as a copy (the caller's stays as it was)."""
        with self._lock:
            for name, value in settings.items():
                if value is not KEEP:
                    setattr(self, name, type(value)(value) if isinstance(value, (dict, set)) else value)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """A provider config that reaches this peer."""
        raise NotImplementedError

    # -- what was received -------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def _key(self, recipient: str) -> str:
        """A recipient as the peer records it."""
        return recipient

    def received_by(self, recipient: str) -> list[Received]:
        key = self._key(recipient)
        return [r for r in self.received if getattr(r, self.recipient) == key]

    def attempts(self, recipient: str) -> int:
        """Requests for this recipient that passed authentication and the request's checks, accepted or not."""
        with self._lock:
            return self._attempts.get(self._key(recipient), 0)

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
        """Forget what was received and counted."""
        with self._lock:
            self._received.clear()
            self._attempts.clear()
            self._requests = self._max_in_flight = self._connections_made = 0

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait (without blocking the event loop) until at least `count` were accepted."""
        deadline = time.monotonic() + timeout
        while len(received := self.received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {self.name} peer accepted {len(received)} of {count} {self.recorded} in "
                                   f"{timeout}s")
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

    def _revoked(self, number: int) -> bool:
        """Whether the credentials were revoked before the `number`th request."""
        with self._lock:
            return self.revoke_after is not None and number > self.revoke_after

    def _attempt(self, recipient: str) -> None:
        """Counts a request for `recipient` that passed the checks (the caller holds the lock)."""
        self._attempts[recipient] = self._attempts.get(recipient, 0) + 1

    @staticmethod
    def _use_up(counts: dict[str, int], recipient: str) -> bool:
        """Whether `recipient` has a scripted failure left in `counts`, using one up (the caller holds the lock)."""
        if counts.get(recipient, 0) > 0:
            counts[recipient] -= 1
            return True
        return False

    def answer(self, path: str, headers: Any, raw: bytes, number: int) -> Answer:
        """The answer to the `number`th request, as the API would give it (`headers`: an
        email.message.Message, names in any case)."""
        raise NotImplementedError

    def delay_for(self, path: str) -> float:
        """Seconds spent on a request after it was taken (an accepted one is recorded first) and
        before it is answered."""
        return self.delay

    def not_allowed(self) -> Answer:
        return 405, {"error": "POST only"}, {"Allow": "POST"}

    def unreadable(self, status: int, why: str) -> Answer:
        """The peer's own answer to a request it cannot read."""
        return status, {"error": why}, {}


class _Handler(BaseHTTPRequestHandler):
    peer: HttpPeer[Any]
    protocol_version = "HTTP/1.1"  # keep-alive, as the APIs
    timeout = 30  # an idle keep-alive connection ends its thread after this
    # The head and the body of an answer go out as one write, at once: as two small writes, Nagle's
    # algorithm and the client's delayed ACK would hold each answer ~40 ms.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.peer._lock:
            self.peer._connections.add(self.connection)
            self.peer._connections_made += 1

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-answer (a killed sender)
            pass

    def finish(self) -> None:
        with self.peer._lock:
            self.peer._connections.discard(self.connection)
        try:
            super().finish()
        except (BrokenPipeError, ConnectionResetError):  # the same: nothing left to flush to
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, answer: Answer) -> None:
        status, body, headers = answer
        payload = b"" if status in (204, 304) else json.dumps(body).encode()  # those two never have a body
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", self.peer.content_type)
            self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> bytes | None:
        """The request's body; None (the connection is then closed, its body unread) when its
        Content-Length is not a number or over MAX_BODY_BYTES."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            return None
        return self.rfile.read(length)

    def _take(self) -> None:
        raw = self._body()
        number = self.peer._begin()
        try:
            if raw is None:
                answer = self.peer.unreadable(413, f"a body needs a Content-Length of at most {MAX_BODY_BYTES}")
            else:
                answer = self.peer.answer(self.path, self.headers, raw, number)
                if wait := self.peer.delay_for(self.path):
                    time.sleep(wait)
        finally:
            # Out of flight before the answer is written: the client can only start another request
            # once it has this answer, so max_in_flight never counts one the client already let go.
            self.peer._end()
        self._reply(answer)

    def _any_method(self) -> None:
        if self.command in self.peer.methods:
            self._take()
        else:
            self._reply(self.peer.not_allowed())

    do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = _any_method


def argument_parser(description: str, port: int) -> argparse.ArgumentParser:
    """The arguments every standalone peer takes: --host, --port, --delay."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--delay", type=float, default=0.0)
    return parser


def serve(peer: HttpPeer[Received], line: Callable[[Received], dict[str, Any]], **shown: Any) -> None:
    """Runs a started peer until Ctrl-C: prints where it listens and its provider config (with
    `shown`), then `line` of everything it accepts as a JSON line."""
    config = {k: v for k, v in peer.provider_config().items() if k != "timeout_s"}
    print(json.dumps({"listening": f"{peer.host}:{peer.port}", "provider_config": config, **shown}), flush=True)
    seen = 0
    try:
        while True:
            received = peer.received
            for r in received[seen:]:
                print(json.dumps(line(r)), flush=True)
            seen = len(received)
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()
