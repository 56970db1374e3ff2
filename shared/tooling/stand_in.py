"""A stand-in for the HTTP providers' APIs, for `crier bench --channel`: one asyncio HTTP/1.1 server
(stdlib only) on 127.0.0.1, in a thread of the bench process, that waits `latency_ms` on every
request and then answers it the way the real API answers a success:

    Twilio        POST /2010-04-01/Accounts/{sid}/Messages.json   201 {"sid": "SM…", …}
    WhatsApp      POST /{version}/{phone_number_id}/messages      200 {"messages": [{"id": "wamid…"}], …}
    Telegram      POST /bot{token}/sendMessage                    200 {"ok": true, "result": {"message_id": n, …}}
    FCM           POST /v1/projects/{project}/messages:send       200 {"name": "projects/…/messages/n"}
                  POST /token (the key's token_uri)               200 {"access_token": …, "expires_in": 3600, …}
    webhook       POST /webhook                                   204

Credentials are checked (a wrong one is a 401, so a bench that sent none would not pass), nothing
else is: the wire format is the tests' business (tests/*_peer.py), the bench's is throughput. Each
accepted message is counted under its recipient, in the form the ledger keeps its address (an E.164
number, a chat id, a device token, a contact id), so that the bench can check that every recipient
got exactly one request.

Keep-alive, TCP_NODELAY, and every answer written whole in one write: a peer that writes its head
and body apart waits out Nagle's algorithm against the client's delayed ACK (~40 ms a request),
which would be measured instead of Crier.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs

_TWILIO = re.compile(r"^/2010-04-01/Accounts/([^/]+)/Messages\.json$")
_WHATSAPP = re.compile(r"^/(v[0-9]+\.[0-9]+)/([0-9]+)/messages$")
_TELEGRAM = re.compile(r"^/bot([^/]+)/(sendMessage|sendPhoto|sendVideo)$")
_FCM = re.compile(r"^/v1/projects/([^/]+)/messages:send$")
_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
            404: "Not Found", 411: "Length Required", 431: "Request Header Fields Too Large"}
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MAX_HEAD_BYTES = 64 * 1024

Answer = tuple[int, dict[str, Any] | None, str | None]  # status, JSON body (None: no body), recipient accepted


class StandIn:
    """The server and what it saw. `start()` / `stop()`, or a `with` block; `provider_config(kind)` is
    a provider of that kind (its credentials, base_url, plain http allowed) that reaches it."""

    def __init__(self, latency_ms: float = 50.0, *, host: str = "127.0.0.1") -> None:
        self.latency_s = max(0.0, latency_ms) / 1000
        self.host, self.port = host, 0
        # Throwaway credentials, checked on every request.
        self.account_sid = "AC" + secrets.token_hex(16)
        self.auth_token = secrets.token_hex(16)
        self.phone_number_id = str(100_000_000_000_000 + secrets.randbelow(10**14))
        self.access_token = "EAA" + secrets.token_urlsafe(32)
        self.bot_token = f"{secrets.randbelow(10**9) + 10**9}:AA{secrets.token_urlsafe(33)}"
        self.project_id = "crier-bench"
        self.fcm_access_token = "ya29." + secrets.token_urlsafe(48)
        self.webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self._private_key_pem: str | None = None
        # What it saw (written on the server's thread only).
        self.recipients: Counter[str] = Counter()  # accepted messages per recipient
        self.token_requests = 0  # FCM access tokens issued
        self.refused = 0  # answers other than a success (a wrong credential, an unknown path)
        self.in_flight = self.max_in_flight = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()  # one per open connection
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._counter = 0

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> StandIn:
        assert self._thread is None, "already running"
        ready = threading.Event()

        def run() -> None:
            self._thread_id = threading.get_native_id()
            loop = self._loop = asyncio.new_event_loop()
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, self.host, 0, limit=MAX_HEAD_BYTES, backlog=1024))
                self.port = self._server.sockets[0].getsockname()[1]
            finally:  # listening, or not (start() then raises)
                ready.set()
                if self._server is None:
                    loop.close()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name="crier-stand-in", daemon=True)
        self._thread.start()
        ready.wait()
        if self._server is None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"the stand-in could not listen on {self.host} (see the thread's error above)")
        return self

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for handler in list(self._handlers):  # idle keep-alive connections wait for a next request
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def stop(self) -> None:
        if self._thread is None:
            return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU the server's thread used so far (utime + stime of its task)."""
        if self._thread_id is None:
            return 0.0
        try:
            stat = Path(f"/proc/self/task/{self._thread_id}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    @property
    def requests(self) -> int:
        """Messages accepted (answered with a success), every recipient's together."""
        return sum(self.recipients.values())

    # -- provider configs ----------------------------------------------------------------------------

    def provider_config(self, kind: str) -> dict[str, Any]:
        """The kind's own fields of a provider that sends to this stand-in (plain http allowed)."""
        if kind == "twilio":
            return {"account_sid": self.account_sid, "auth_token": self.auth_token, "from_number": "+15005550006",
                    "base_url": self.url, "allow_insecure_auth": True}
        if kind == "whatsapp_cloud":
            return {"phone_number_id": self.phone_number_id, "access_token": self.access_token,
                    "base_url": self.url, "allow_insecure_auth": True}
        if kind == "telegram_bot":
            return {"bot_token": self.bot_token, "base_url": self.url, "allow_insecure_auth": True}
        if kind == "fcm":
            return {"service_account_key": json.dumps(self.service_account_key()), "base_url": self.url,
                    "allow_insecure_auth": True}
        if kind == "webhook":
            return {"url": f"{self.url}/webhook", "secret": self.webhook_secret, "allow_insecure": True}
        raise ValueError(f"no stand-in for provider kind {kind!r}")

    def service_account_key(self) -> dict[str, str]:
        """A service-account key file (a throwaway RSA key) whose token_uri is this stand-in."""
        if self._private_key_pem is None:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self._private_key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()).decode()
        return {
            "type": "service_account", "project_id": self.project_id, "private_key_id": secrets.token_hex(20),
            "private_key": self._private_key_pem,
            "client_email": f"crier-bench@{self.project_id}.iam.gserviceaccount.com",
            "client_id": str(secrets.randbelow(10**20)), "token_uri": f"{self.url}/token",
        }

    # -- serving -------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client hung up between requests
                except asyncio.LimitOverrunError:
                    writer.write(_response(431, {"error": "request head too large"}, close=True))
                    return
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _version = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    writer.write(_response(411, {"error": "send a Content-Length"}, close=True))
                    return
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    status, payload, recipient = self._answer(method, target.split("?", 1)[0], headers, body)
                    if self.latency_s:
                        await asyncio.sleep(self.latency_s)
                finally:
                    # Out of flight before the answer is written: the client sends this connection's
                    # next request only once it has this answer.
                    self.in_flight -= 1
                if recipient is not None:
                    self.recipients[recipient] += 1
                elif status >= 300:
                    self.refused += 1
                close = headers.get("connection", "").lower() == "close"
                writer.write(_response(status, payload, close=close))  # head and body: one write
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:  # stop(): ended, not failed (asyncio would report a cancelled handler)
            return
        finally:
            self._handlers.discard(handler)
            writer.close()

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if method != "POST":
            return 404, {"error": f"the stand-in takes POST, not {method}"}, None
        bearer = headers.get("authorization", "")
        if m := _TWILIO.match(path):
            expected = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
            if m.group(1) != self.account_sid or bearer != expected:
                return 401, {"code": 20003, "message": "Authenticate", "status": 401}, None
            to = (parse_qs(body.decode(), keep_blank_values=True).get("To") or [""])[0]
            n = self._next()
            return 201, {"sid": f"SM{n:032x}", "account_sid": self.account_sid, "to": to, "status": "queued"}, to
        if m := _WHATSAPP.match(path):
            if m.group(2) != self.phone_number_id or bearer != f"Bearer {self.access_token}":
                return 401, {"error": {"message": "Invalid OAuth access token", "type": "OAuthException",
                                       "code": 190}}, None
            to = str(_json(body).get("to") or "")
            n = self._next()
            return 200, {"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}],
                         "messages": [{"id": f"wamid.{n:032X}", "message_status": "accepted"}]}, f"+{to}"
        if m := _TELEGRAM.match(path):
            if m.group(1) != self.bot_token:
                return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}, None
            chat = _json(body).get("chat_id")
            n = self._next()
            return 200, {"ok": True, "result": {"message_id": n, "date": int(time.time()),
                                                "chat": {"id": chat, "type": "private"}}}, str(chat)
        if m := _FCM.match(path):
            if m.group(1) != self.project_id or bearer != f"Bearer {self.fcm_access_token}":
                return 401, {"error": {"code": 401, "status": "UNAUTHENTICATED",
                                       "message": "Request had invalid authentication credentials."}}, None
            message = _json(body).get("message")
            token = str(message.get("token") or "") if isinstance(message, dict) else ""
            n = self._next()
            return 200, {"name": f"projects/{self.project_id}/messages/{n}"}, token
        if path == "/token":
            form = parse_qs(body.decode(), keep_blank_values=True)
            if form.get("grant_type") != [JWT_BEARER] or not form.get("assertion", [""])[0]:
                return 400, {"error": "invalid_grant", "error_description": "a JWT bearer assertion is required"}, None
            self.token_requests += 1
            return 200, {"access_token": self.fcm_access_token, "expires_in": 3600, "token_type": "Bearer"}, None
        if path == "/webhook":
            if not headers.get("webhook-id") or not headers.get("webhook-signature", "").startswith("v1,"):
                return 401, {"error": "not signed"}, None
            data = _json(body).get("data")
            contact = data.get("contact_id") if isinstance(data, dict) else None
            return 204, None, str(contact)
        return 404, {"error": f"no such endpoint: {path}"}, None


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _response(status: int, payload: dict[str, Any] | None, *, close: bool = False) -> bytes:
    """The whole answer, head and body, as one buffer."""
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
    data = b""
    if status != 204:  # a 204 has no body, and no Content-Length (RFC 9110 8.6)
        data = json.dumps(payload if payload is not None else {}).encode()
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode("latin-1") + data
