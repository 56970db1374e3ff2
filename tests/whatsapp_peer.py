"""A local stand-in for the WhatsApp Business Cloud API's send endpoint (stdlib ThreadingHTTPServer
on 127.0.0.1, in a thread of the test process) that answers like Meta's Graph API and records the
template messages it accepts.

    with WhatsappPeer(templates={"order_update": Template(body=2)}, not_on_whatsapp={"15550000001"}) as peer:
        ... send through peer.provider_config()
        assert peer.received_by("15550000003")[0].parameters == ["Ann", "A-17"]

Numbers are the request's `to`: E.164 digits without the "+". The server and its bookkeeping are
tests/http_peer.py's. Run `python -m tests.whatsapp_peer --port 8098 [--template NAME=COUNT ...]`
for a standalone peer that prints one JSON line per message.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Any

import pytest

from tests.http_peer import KEEP, Answer, HttpPeer, argument_parser, serve

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


def error(status: int, code: int, *, subcode: int | None = None, what: str = "",
          message: str | None = None) -> Answer:
    """A Graph API error answer."""
    kind, text, details = ERRORS.get(code, ("OAuthException", f"(#{code}) Error", "{what}"))
    body: dict[str, Any] = {"message": message or text, "type": kind, "code": code,
                            "error_data": {"messaging_product": "whatsapp", "details": details.format(what=what)},
                            "fbtrace_id": "A" + uuid.uuid4().hex[:22]}
    if subcode is not None:
        body["error_subcode"] = subcode
    return status, {"error": body}, {}


def _unauthorized() -> Answer:
    status, body, _ = error(401, 190, message="Invalid OAuth access token - Cannot parse access token")
    body["error"].pop("error_data")
    return status, body, {"WWW-Authenticate": 'OAuth "Facebook Platform" "invalid_token" "Invalid OAuth access token"'}


class WhatsappPeer(HttpPeer[Received]):
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

    name = "WhatsApp"
    content_type = "application/json; charset=UTF-8"

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
        super().__init__(host=host, port=port)
        self.phone_number_id, self.access_token = phone_number_id, access_token
        self.templates = dict(DEFAULT_TEMPLATES if templates is None else templates)
        self.configure(not_on_whatsapp=not_on_whatsapp or set(), fail_permanently=fail_permanently or {},
                       fail_transiently=fail_transiently or {}, rate_limit=rate_limit or {},
                       rate_limit_status=rate_limit_status, rate_limit_code=rate_limit_code, retry_after=retry_after,
                       revoke_after=revoke_after, delay=delay)

    def configure(
        self,
        *,
        not_on_whatsapp: set[str] | EllipsisType = KEEP,
        fail_permanently: dict[str, int] | EllipsisType = KEEP,
        fail_transiently: dict[str, int] | EllipsisType = KEEP,
        rate_limit: dict[str, int] | EllipsisType = KEEP,
        rate_limit_status: int | EllipsisType = KEEP,
        rate_limit_code: int | EllipsisType = KEEP,
        retry_after: str | None | EllipsisType = KEEP,  # None: no Retry-After header
        revoke_after: int | None | EllipsisType = KEEP,  # None: never revoked
        delay: float | EllipsisType = KEEP,
    ) -> None:
        """Changes what is given; the rest stays as it is."""
        self._set(_not_on_whatsapp=not_on_whatsapp, _fail_permanently=fail_permanently,
                  _fail_transiently=fail_transiently, _rate_limit=rate_limit, rate_limit_status=rate_limit_status,
                  rate_limit_code=rate_limit_code, retry_after=retry_after, revoke_after=revoke_after, delay=delay)

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """A whatsapp_cloud provider config that reaches this peer (plain http, which needs allow_insecure_auth)."""
        return {"phone_number_id": self.phone_number_id, "access_token": self.access_token,
                "base_url": self.base_url, "allow_insecure_auth": True, "timeout_s": 10.0, **overrides}

    def _key(self, recipient: str) -> str:
        return recipient.removeprefix("+")

    # -- called on the peer's threads --------------------------------------------------------------

    def _token(self, header: str | None, number: int) -> str | None:
        if not header or not header.startswith("Bearer "):
            return None
        if self._revoked(number):
            return None
        token = header[7:]
        return token if token == self.access_token else None

    def answer(self, path: str, headers: Any, raw: bytes, number: int) -> Answer:
        """As the Cloud API would answer it."""
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
            self._attempt(to)
            if to in self._not_on_whatsapp:
                return error(400, 131026)
            if to in self._fail_permanently:
                return error(400, self._fail_permanently[to], what=f"refused for {to}")
            if self._use_up(self._rate_limit, to):
                status, payload, _ = error(self.rate_limit_status, self.rate_limit_code)
                return status, payload, {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            if self._use_up(self._fail_transiently, to):
                return error(500, 131000)
            wamid = "wamid.HBgL" + uuid.uuid4().hex.upper()
            self._received.append(Received(wamid=wamid, to=to, template=name, language=language,
                                           parameters=parameters, named=named, buttons=buttons, auth=token,
                                           body=body))
        return 200, {"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}],
                     "messages": [{"id": wamid, "message_status": "accepted"}]}, {}

    def not_allowed(self) -> Answer:
        return error(400, 100, what="this peer only takes POST .../messages")

    def _check(self, body: Any) -> _Checked | Answer:
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


@pytest.fixture
def whatsapp_peer() -> Iterator[WhatsappPeer]:
    """A started peer with DEFAULT_TEMPLATES and no failures; reconfigure it with `whatsapp_peer.configure(...)`."""
    with WhatsappPeer() as peer:
        yield peer


def _template_arg(value: str) -> tuple[str, Template]:
    name, _, count = value.partition("=")
    return name, Template(body=int(count or 0))


def main() -> None:
    parser = argument_parser("a recording WhatsApp Cloud API peer: prints one JSON line per message", 8098)
    parser.add_argument("--phone-number-id", default=PHONE_NUMBER_ID)
    parser.add_argument("--access-token", default=ACCESS_TOKEN)
    parser.add_argument("--template", action="append", type=_template_arg, default=[],
                        help="NAME=COUNT: a template with COUNT positional body parameters (repeatable); "
                             "adds to the defaults")
    args = parser.parse_args()
    peer = WhatsappPeer(host=args.host, port=args.port, phone_number_id=args.phone_number_id,
                        access_token=args.access_token, templates={**DEFAULT_TEMPLATES, **dict(args.template)},
                        delay=args.delay).start()
    serve(peer, lambda r: {"wamid": r.wamid, "to": r.to, "template": r.template, "language": r.language,
                           "parameters": r.parameters, "named": r.named, "buttons": r.buttons},
          templates=sorted(peer.templates))


if __name__ == "__main__":
    main()
