"""A local stand-in for the WhatsApp Business Cloud API's send endpoint (stdlib ThreadingHTTPServer
on 127.0.0.1, in a thread of the test process) that answers like Meta's Graph API and records the
template messages it accepts.

    with WhatsappPeer(templates={"order_update": Template(body=2)}, not_on_whatsapp={"15550000001"}) as peer:
        ... send through peer.provider_config()
        assert peer.received_by("15550000003")[0].parameters == ["Ann", "A-17"]

Numbers are the request's `to`: E.164 digits without the "+". A thread per connection (HTTP/1.1
keep-alive), so `max_in_flight` shows how many requests a client really had out at once. Run
`python -m tests.whatsapp_peer --port 8098 [--template NAME=COUNT ...]` for a standalone peer that
prints one JSON line per message.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import EllipsisType
from typing import Any

import pytest

PHONE_NUMBER_ID = "106540352242922"
ACCESS_TOKEN = "EAAPeerToken0f9e8d7c6b5a4"
_PATH = re.compile(r"^/(v[0-9]+\.[0-9]+)/([^/]+)/messages$")
_DIGITS = re.compile(r"^[1-9][0-9]{1,14}$")

# Meta's words for the errors the peer gives (developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes):
# (type, message, details)
ERRORS: dict[int, tuple[str, str, str]] = {
    100: ("OAuthException", "(#100) Invalid parameter", "{what}"),
    131000: ("OAuthException", "(#131000) Something went wrong", "Something went wrong"),
    131008: ("OAuthException", "(#131008) Required parameter is missing", "{what}"),
    131009: ("OAuthException", "(#131009) Parameter value is not valid", "{what}"),
    131021: ("OAuthException", "(#131021) Recipient cannot be sender",
             "Sender and recipient phone number is the same."),
    131026: ("OAuthException", "(#131026) Message undeliverable", "Message Undeliverable."),
    131047: ("OAuthException", "(#131047) Re-engagement message",
             "Message failed to send because more than 24 hours have passed since the customer last replied "
             "to this number."),
    130429: ("OAuthException", "(#130429) Rate limit hit", "Cloud API message throughput has been reached."),
    131056: ("OAuthException", "(#131056) (Business Account, Consumer Account) pair rate limit hit",
             "Message failed to send because there were too many messages sent from this phone number to the "
             "same phone number in a short period of time."),
    132000: ("OAuthException", "(#132000) Number of parameters does not match the expected number of params",
             "{what}"),
    132001: ("OAuthException", "(#132001) Template name does not exist in the translation", "{what}"),
}


@dataclass(frozen=True)
class Template:
    """An approved template the peer knows: its languages, and what its components expect."""

    body: int = 0  # positional body parameters {{1}}..{{n}}
    named: tuple[str, ...] = ()  # named body parameters instead (a NAMED template)
    languages: tuple[str, ...] = ("en", "en_US")
    url_buttons: tuple[int, ...] = ()  # indexes of URL buttons with a dynamic suffix


DEFAULT_TEMPLATES = {
    "hello_world": Template(languages=("en_US",)),  # the sample every new account has
    "order_update": Template(body=2, url_buttons=(0,)),
    "greeting": Template(body=1, languages=("en", "de", "pt_BR")),
    "named_greeting": Template(named=("first_name", "order_id")),
}


@dataclass(frozen=True)
class Received:
    """One message the peer accepted (answered 200)."""

    wamid: str
    to: str
    template: str
    language: str
    parameters: list[str]  # positional body parameters, in order
    named: dict[str, str]  # named body parameters
    buttons: dict[int, str]  # URL button index -> its suffix
    auth: str  # the bearer token it came with
    body: dict[str, Any]  # the whole JSON request
    at: float = field(default_factory=time.time)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def error(status: int, code: int, *, subcode: int | None = None, what: str = "",
          message: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A Graph API error answer."""
    kind, text, details = ERRORS.get(code, ("OAuthException", f"(#{code}) Error", "{what}"))
    body: dict[str, Any] = {"message": message or text, "type": kind, "code": code,
                            "error_data": {"messaging_product": "whatsapp", "details": details.format(what=what)},
                            "fbtrace_id": "A" + uuid.uuid4().hex[:22]}
    if subcode is not None:
        body["error_subcode"] = subcode
    return status, {"error": body}, {}


def _unauthorized() -> tuple[int, dict[str, Any], dict[str, str]]:
    status, body, _ = error(401, 190, message="Invalid OAuth access token - Cannot parse access token")
    body["error"].pop("error_data")
    return status, body, {"WWW-Authenticate": 'OAuth "Facebook Platform" "invalid_token" "Invalid OAuth access token"'}


class WhatsappPeer:
    """Behaviour per number (the JSON's `to`, digits):
    - `not_on_whatsapp={number}` → 400 code 131026, every time;
    - `fail_permanently={number: code}` → 400 with that Graph code, every time;
    - `fail_transiently={number: n}` → 500 (code 131000) for the first n requests, then accepted;
    - `rate_limit={number: n}` → the first n requests are refused with `rate_limit_status` (429) and
      `rate_limit_code` (130429), with `Retry-After: retry_after` unless that is None.
    And for all: `revoke_after=n` → the first n requests are authenticated as usual, every later one
    is a 401 (code 190), as if the token expired then; `delay` seconds are spent on each request
    after it was taken (an accepted one is recorded first) and before it is answered.
    Templates: `templates={name: Template(...)}` (DEFAULT_TEMPLATES if not given).
    Change behaviour while running with `configure(...)`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        phone_number_id: str = PHONE_NUMBER_ID,
        access_token: str = ACCESS_TOKEN,
        templates: dict[str, Template] | None = None,
        not_on_whatsapp: set[str] | None = None,
        fail_permanently: dict[str, int] | None = None,
        fail_transiently: dict[str, int] | None = None,
        rate_limit: dict[str, int] | None = None,
        rate_limit_status: int = 429,
        rate_limit_code: int = 130429,
        retry_after: str | None = "1",
        revoke_after: int | None = None,
        delay: float = 0.0,
    ) -> None:
        self.host, self.port = host, port or free_port(host)
        self.phone_number_id, self.access_token = phone_number_id, access_token
        self.templates = dict(DEFAULT_TEMPLATES if templates is None else templates)
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
        self.rate_limit_status, self.rate_limit_code = rate_limit_status, rate_limit_code
        self.retry_after: str | None = retry_after
        self.configure(not_on_whatsapp=not_on_whatsapp or set(), fail_permanently=fail_permanently or {},
                       fail_transiently=fail_transiently or {}, rate_limit=rate_limit or {},
                       revoke_after=revoke_after, delay=delay)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> WhatsappPeer:
        assert self._server is None, "already running"

        class Handler(_Handler):
            peer = self

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"whatsapp-peer-{self.port}", daemon=True)
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

    def __enter__(self) -> WhatsappPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(
        self,
        *,
        not_on_whatsapp: set[str] | None = None,
        fail_permanently: dict[str, int] | None = None,
        fail_transiently: dict[str, int] | None = None,
        rate_limit: dict[str, int] | None = None,
        rate_limit_status: int | None = None,
        rate_limit_code: int | None = None,
        retry_after: str | None | EllipsisType = ...,  # ... leaves it as is; None: no Retry-After header
        revoke_after: int | None | EllipsisType = ...,  # ... leaves it as is; None: never revoked
        delay: float | None = None,
    ) -> None:
        with self._lock:
            if not_on_whatsapp is not None:
                self._not_on_whatsapp = set(not_on_whatsapp)
            if fail_permanently is not None:
                self._fail_permanently = dict(fail_permanently)
            if fail_transiently is not None:
                self._fail_transiently = dict(fail_transiently)
            if rate_limit is not None:
                self._rate_limit = dict(rate_limit)
            if rate_limit_status is not None:
                self.rate_limit_status = rate_limit_status
            if rate_limit_code is not None:
                self.rate_limit_code = rate_limit_code
            if retry_after is not ...:
                self.retry_after = retry_after
            if revoke_after is not ...:
                self.revoke_after = revoke_after
            if delay is not None:
                self.delay = delay

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """A whatsapp_cloud provider config that reaches this peer (plain http, which needs allow_insecure_auth)."""
        return {"phone_number_id": self.phone_number_id, "access_token": self.access_token,
                "base_url": self.base_url, "allow_insecure_auth": True, "timeout_s": 10.0, **overrides}

    # -- what was received -------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def received_by(self, number: str) -> list[Received]:
        number = number.removeprefix("+")
        return [r for r in self.received if r.to == number]

    def attempts(self, number: str) -> int:
        """Authenticated, well-formed requests to this number, accepted or not."""
        with self._lock:
            return self._attempts.get(number.removeprefix("+"), 0)

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
                raise TimeoutError(f"the WhatsApp peer accepted {len(received)} of {count} messages in {timeout}s")
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

    def _token(self, header: str | None, number: int) -> str | None:
        if not header or not header.startswith("Bearer "):
            return None
        with self._lock:
            if self.revoke_after is not None and number > self.revoke_after:
                return None
        token = header[7:]
        return token if token == self.access_token else None

    def answer(self, path: str, headers: Any, raw: bytes, number: int) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, extra headers) for one request, as the Cloud API would answer it."""
        token = self._token(headers.get("Authorization"), number)
        if token is None:
            return _unauthorized()
        match = _PATH.match(path.split("?", 1)[0])
        if match is None:
            return error(400, 100, message=f"Unknown path components: {path}", what="unknown path")
        if match.group(2) != self.phone_number_id:
            return error(400, 100, subcode=33, what="no such phone number",
                         message=f"Unsupported post request. Object with ID '{match.group(2)}' does not exist, "
                                 "cannot be loaded due to missing permissions, or does not support this operation.")
        try:
            body = json.loads(raw)
        except ValueError:
            return error(400, 100, what="the body is not JSON")
        checked = self._check(body)
        if not isinstance(checked, _Checked):
            return checked
        to, name, language, parameters, named, buttons = (checked.to, checked.template, checked.language,
                                                          checked.parameters, checked.named, checked.buttons)
        with self._lock:
            self._attempts[to] = self._attempts.get(to, 0) + 1
            if to in self._not_on_whatsapp:
                return error(400, 131026)
            if to in self._fail_permanently:
                return error(400, self._fail_permanently[to], what=f"refused for {to}")
            if self._rate_limit.get(to, 0) > 0:
                self._rate_limit[to] -= 1
                status, payload, _ = error(self.rate_limit_status, self.rate_limit_code)
                return status, payload, {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            if self._fail_transiently.get(to, 0) > 0:
                self._fail_transiently[to] -= 1
                return error(500, 131000)
            wamid = "wamid.HBgL" + uuid.uuid4().hex.upper()
            self._received.append(Received(wamid=wamid, to=to, template=name, language=language,
                                           parameters=parameters, named=named, buttons=buttons, auth=token,
                                           body=body))
        return 200, {"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}],
                     "messages": [{"id": wamid, "message_status": "accepted"}]}, {}

    def _check(self, body: Any) -> _Checked | tuple[int, dict[str, Any], dict[str, str]]:
        """What a well-formed request asks for, or the error answer."""
        if not isinstance(body, dict) or body.get("messaging_product") != "whatsapp":
            return error(400, 100, what="messaging_product must be whatsapp")
        if body.get("recipient_type", "individual") != "individual":
            return error(400, 100, what="recipient_type must be individual")
        to = body.get("to")
        if not isinstance(to, str) or not _DIGITS.match(to):
            return error(400, 131009 if to else 131008, what="to: the recipient's number in digits")
        template = body.get("template")
        if body.get("type") != "template" or not isinstance(template, dict):
            return error(400, 100, what="this peer only sends template messages")
        name, language = template.get("name"), template.get("language")
        language = language.get("code") if isinstance(language, dict) else None
        if not isinstance(name, str) or not isinstance(language, str):
            return error(400, 131008, what="template.name and template.language.code are required")
        known = self.templates.get(name)
        if known is None or language not in known.languages:
            return error(404, 132001, what=f"template name ({name}) does not exist in {language}")
        parameters: list[str] = []
        named: dict[str, str] = {}
        buttons: dict[int, str] = {}
        components = template.get("components") or []
        if not isinstance(components, list) or not all(
                isinstance(c, dict) and isinstance(c.get("parameters") or [], list)
                and all(isinstance(p, dict) for p in c.get("parameters") or []) for c in components):
            return error(400, 100, what="components: a list of objects with a list of parameters")
        for component in components:
            kind, values = component.get("type"), component.get("parameters") or []
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) or not p["text"] for p in values):
                return error(400, 131008, what="each parameter needs a non-empty text")
            if kind == "body":
                for p in values:
                    if "parameter_name" in p:
                        named[p["parameter_name"]] = p["text"]
                    else:
                        parameters.append(p["text"])
            elif (kind == "button" and component.get("sub_type") == "url" and len(values) == 1
                  and str(component.get("index")).isdigit()):
                buttons[int(component["index"])] = values[0]["text"]
            else:
                return error(400, 100, what=f"unsupported component {kind}")
        if (len(parameters), set(named)) != (known.body, set(known.named)):
            expected = known.body or len(known.named)
            return error(400, 132000, what=f"body: number of localizable_params ({len(parameters) or len(named)}) "
                                           f"does not match the expected number of params ({expected})")
        if set(buttons) != set(known.url_buttons):
            return error(400, 132000, what=f"buttons: expected URL parameters for {sorted(known.url_buttons)}")
        return _Checked(to, name, language, parameters, named, buttons)


@dataclass(frozen=True)
class _Checked:
    to: str
    template: str
    language: str
    parameters: list[str]
    named: dict[str, str]
    buttons: dict[int, str]


class _Handler(BaseHTTPRequestHandler):
    peer: WhatsappPeer
    protocol_version = "HTTP/1.1"  # keep-alive, as Meta's API
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

    def finish(self) -> None:
        with self.peer._lock:
            self.peer._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
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
        self._reply(*error(400, 100, what="this peer only takes POST .../messages"))

    do_PUT = do_DELETE = do_PATCH = do_GET


@pytest.fixture
def whatsapp_peer() -> Iterator[WhatsappPeer]:
    """A started peer with DEFAULT_TEMPLATES and no failures; reconfigure it with `whatsapp_peer.configure(...)`."""
    with WhatsappPeer() as peer:
        yield peer


def _template_arg(value: str) -> tuple[str, Template]:
    name, _, count = value.partition("=")
    return name, Template(body=int(count or 0))


def main() -> None:
    parser = argparse.ArgumentParser(description="a recording WhatsApp Cloud API peer: prints one JSON line per message")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8098)
    parser.add_argument("--phone-number-id", default=PHONE_NUMBER_ID)
    parser.add_argument("--access-token", default=ACCESS_TOKEN)
    parser.add_argument("--template", action="append", type=_template_arg, default=[],
                        help="NAME=COUNT: a template with COUNT positional body parameters (repeatable); "
                             "adds to the defaults")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    peer = WhatsappPeer(host=args.host, port=args.port, phone_number_id=args.phone_number_id,
                        access_token=args.access_token, templates={**DEFAULT_TEMPLATES, **dict(args.template)},
                        delay=args.delay).start()
    config = {k: v for k, v in peer.provider_config().items() if k != "timeout_s"}
    print(json.dumps({"listening": f"{peer.host}:{peer.port}", "provider_config": config,
                      "templates": sorted(peer.templates)}), flush=True)
    seen = 0
    try:
        while True:
            received = peer.received
            for r in received[seen:]:
                print(json.dumps({"wamid": r.wamid, "to": r.to, "template": r.template, "language": r.language,
                                  "parameters": r.parameters, "named": r.named, "buttons": r.buttons}), flush=True)
            seen = len(received)
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()


if __name__ == "__main__":
    main()
