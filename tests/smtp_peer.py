"""A real SMTP peer for tests (aiosmtpd on 127.0.0.1, in a thread of the test process) that records what it receives.

    with SmtpPeer(fail_permanently={"bounce@example.com"}, fail_transiently={"busy@example.com": 2}) as peer:
        ... send through {"host": peer.host, "port": peer.port, "starttls": False, ...}
        assert peer.received_by("a@example.com")[0].subject == "Hi"

The receipts live in the test process, so they survive a sender process killed mid-send. Run
`python -m tests.smtp_peer --port 2525` for a standalone peer that prints one JSON line per message.
"""
from __future__ import annotations

import argparse
import asyncio
import email
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email import policy
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass(frozen=True)
class Received:
    """One message the peer accepted (answered 250 to DATA)."""

    connection: int  # 1-based number of the connection that delivered it
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message_id: str | None
    subject: str | None
    text: str | None  # the decoded text/plain part
    html: str | None  # the decoded text/html part
    headers: dict[str, str]  # the last value of each header, names lower-cased
    raw: bytes
    at: float = field(default_factory=time.time)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _content(part: Any) -> str | None:
    # Decoded as a mail client shows it: the wire's CRLF line ends become "\n".
    return part.get_content().replace("\r\n", "\n") if part is not None else None


def _parse(connection: int, mail_from: str, rcpt_tos: Iterable[str], raw: bytes) -> Received:
    msg = email.message_from_bytes(raw, policy=policy.default)
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    return Received(
        connection=connection,
        mail_from=mail_from,
        rcpt_tos=tuple(rcpt_tos),
        message_id=msg["Message-ID"],
        subject=msg["Subject"],
        text=_content(text),
        html=_content(html),
        headers={k.lower(): str(v) for k, v in msg.items()},
        raw=raw,
    )


class SmtpPeer:
    """Behaviour per address (case-insensitive):
    - `fail_permanently={addr}` → 550 at RCPT, every time;
    - `fail_transiently={addr: n}` → 451 at RCPT for the first n attempts, then accepted;
    - `drop_connection={addr: n}` → the connection is cut (no reply) at RCPT for the first n attempts;
    - `drop_after_data={addr: n}` → the connection is cut after the message was sent, before the
      server answers, for the first n messages (which are not kept).
    `delay` seconds are spent after each message is received and before it is acknowledged.
    `parse=False` keeps only the envelope and the raw bytes of each message (no subject, bodies or
    headers): parsing costs about 2.5 ms a message, which bounds a fast broadcast's rate.
    `credentials={user: password}` requires AUTH; `tls_context` offers STARTTLS.
    Change behaviour while running with `configure(...)`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        fail_permanently: Iterable[str] = (),
        fail_transiently: dict[str, int] | None = None,
        drop_connection: dict[str, int] | None = None,
        drop_after_data: dict[str, int] | None = None,
        delay: float = 0.0,
        credentials: dict[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        parse: bool = True,
    ) -> None:
        self.host, self.port = host, port or free_port(host)
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._attempts: dict[str, int] = {}
        self._connections = 0
        self._credentials = credentials
        self.parse = parse
        self._tls_context, self._require_starttls = tls_context, require_starttls
        self._controller: Controller | None = None
        self.configure(
            fail_permanently=fail_permanently, fail_transiently=fail_transiently or {},
            drop_connection=drop_connection or {}, drop_after_data=drop_after_data or {}, delay=delay,
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> SmtpPeer:
        assert self._controller is None, "already running"
        kwargs: dict[str, Any] = {}
        if self._credentials is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True, auth_require_tls=False)
        if self._tls_context is not None:
            kwargs.update(tls_context=self._tls_context, require_starttls=self._require_starttls)
        self._controller = Controller(_Handler(self), hostname=self.host, port=self.port, **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def restart(self) -> None:
        """Stop (cutting every open connection) and listen again on the same port; receipts are kept."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> SmtpPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(
        self,
        *,
        fail_permanently: Iterable[str] | None = None,
        fail_transiently: dict[str, int] | None = None,
        drop_connection: dict[str, int] | None = None,
        drop_after_data: dict[str, int] | None = None,
        delay: float | None = None,
    ) -> None:
        with self._lock:
            if fail_permanently is not None:
                self._fail_permanently = {a.lower() for a in fail_permanently}
            if fail_transiently is not None:
                self._fail_transiently = {a.lower(): n for a, n in fail_transiently.items()}
            if drop_connection is not None:
                self._drop_connection = {a.lower(): n for a, n in drop_connection.items()}
            if drop_after_data is not None:
                self._drop_after_data = {a.lower(): n for a, n in drop_after_data.items()}
            if delay is not None:
                self.delay = delay

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """An smtp provider config that reaches this peer (plain text, no login unless overridden)."""
        return {"host": self.host, "port": self.port, "starttls": False, "from_email": "news@example.com",
                "timeout_s": 10.0, **overrides}

    # -- what was received -------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def received_by(self, address: str) -> list[Received]:
        address = address.lower()
        return [r for r in self.received if address in (a.lower() for a in r.rcpt_tos)]

    @property
    def connections(self) -> int:
        """Connections that said EHLO/HELO (the controller's own start-up probe is not counted)."""
        with self._lock:
            return self._connections

    def attempts(self, address: str) -> int:
        """RCPT commands seen for this address, accepted or not."""
        with self._lock:
            return self._attempts.get(address.lower(), 0)

    def clear(self) -> None:
        with self._lock:
            self._received.clear()
            self._attempts.clear()
            self._connections = 0

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait (without blocking the event loop) until at least `count` messages were received."""
        deadline = time.monotonic() + timeout
        while len(received := self.received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the SMTP peer received {len(received)} of {count} messages in {timeout}s")
            await asyncio.sleep(0.02)
        return received

    # -- called on the peer's thread ---------------------------------------------------------------

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            user, password = auth_data.login.decode(), auth_data.password.decode()
            if self._credentials is not None and self._credentials.get(user) == password:
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    def _connection_of(self, server: Any) -> int:
        with self._lock:
            if not getattr(server, "_peer_connection", 0):
                self._connections += 1
                server._peer_connection = self._connections
            return server._peer_connection

    def _rcpt_status(self, address: str) -> str | None:
        """The refusal for this attempt (None: accept); "drop" cuts the connection."""
        key = address.lower()
        with self._lock:
            self._attempts[key] = self._attempts.get(key, 0) + 1
            if key in self._fail_permanently:
                return "550 5.1.1 mailbox unavailable"
            if self._drop_connection.get(key, 0) > 0:
                self._drop_connection[key] -= 1
                return "drop"
            if self._fail_transiently.get(key, 0) > 0:
                self._fail_transiently[key] -= 1
                return "451 4.3.0 try again later"
        return None

    def _drops_data(self, rcpt_tos: Iterable[str]) -> bool:
        with self._lock:
            for address in rcpt_tos:
                if self._drop_after_data.get(address.lower(), 0) > 0:
                    self._drop_after_data[address.lower()] -= 1
                    return True
        return False

    def _record(self, received: Received) -> None:
        with self._lock:
            self._received.append(received)


class _Handler:
    def __init__(self, peer: SmtpPeer) -> None:
        self.peer = peer

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.peer._connection_of(server)
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        self.peer._connection_of(server)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        status = self.peer._rcpt_status(address)
        if status == "drop":
            server.transport.close()
            return "421 4.4.2 connection dropped"  # never reaches the client
        if status is not None:
            return status
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode()
        if self.peer._drops_data(envelope.rcpt_tos):
            server.transport.close()
            return "421 4.4.2 connection dropped"  # never reaches the client
        connection = self.peer._connection_of(server)
        if self.peer.parse:
            self.peer._record(_parse(connection, envelope.mail_from, envelope.rcpt_tos, raw))
        else:
            self.peer._record(Received(connection, envelope.mail_from, tuple(envelope.rcpt_tos), None, None, None,
                                       None, {}, raw))
        # Received first, acknowledged after the delay: like a real server, a client killed while
        # waiting for the 250 may still have delivered the message.
        if self.peer.delay:
            await asyncio.sleep(self.peer.delay)
        return "250 2.0.0 OK: queued"


@pytest.fixture
def smtp_peer() -> Iterator[SmtpPeer]:
    """A started peer with no failures configured; reconfigure it with `smtp_peer.configure(...)`."""
    with SmtpPeer() as peer:
        yield peer


def main() -> None:
    parser = argparse.ArgumentParser(description="a recording SMTP peer: prints one JSON line per message")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-permanently", nargs="*", default=[])
    args = parser.parse_args()
    peer = SmtpPeer(host=args.host, port=args.port, delay=args.delay, fail_permanently=args.fail_permanently).start()
    print(json.dumps({"listening": f"{peer.host}:{peer.port}"}), flush=True)
    seen = 0
    try:
        while True:
            received = peer.received
            for r in received[seen:]:
                print(json.dumps({"to": r.rcpt_tos, "message_id": r.message_id, "subject": r.subject}), flush=True)
            seen = len(received)
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()


if __name__ == "__main__":
    main()
