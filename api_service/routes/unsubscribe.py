"""/u/{code}: the unsubscribe link of every message. No token: the signed code is the credential.

GET shows a plain confirmation page whose button POSTs; it never changes anything (mail scanners and
link previews fetch GETs). POST is RFC 8058 one-click (`List-Unsubscribe=One-Click`, as Gmail and
Yahoo send it) or the page's form; its body is not read, any body does. It suppresses the contact
and its address on the code's channel (reason `unsubscribed`, with the broadcast) and answers 200,
never a redirect; again is the same. A code that does not verify (changed, cut short, a key unknown
or retired) is a 404 that changes nothing. A contact deleted since: 200, nothing written (nothing
is known to suppress). The first unsubscribe of a contact counts in the broadcast's engagement
counters (`unsubscribed`, shared/tracking/unsubscribes.py says which run), in the same transaction.

Rate limit: an address that sent more than `auth_failures_per_minute` bad codes in a burst gets
429s (then one attempt per 60/N s). Only failures count: mailbox providers send one-click POSTs for
many people from a few addresses, and an unsubscribe must not be refused. Counted per replica, in
memory: a bad code costs an HMAC and no I/O, so a count in Postgres would cost more than the
requests it holds back (and codes are 128-bit MACs: guessing is not the threat). Valid codes cost
two or three small statements each.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass

from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.enums import MediaType
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath
from litestar.plugins.problem_details import ProblemDetailsException

from api_service.openapi import PROBLEM_JSON, problem_response
from api_service.problems import problem
from shared.channels.registry import ADDRESS_SQL
from shared.platform import signing
from shared.platform.settings import Settings
from shared.tracking import unsubscribes

PATH = "/u/{code:str}"
_STATE_KEY = "crier_unsubscribe"
_MAX_TRACKED = 10_000  # addresses remembered before the ones back under their limit are dropped
_WHAT = {"email": "emails", "sms": "text messages", "whatsapp": "WhatsApp messages", "telegram": "Telegram messages",
         "push": "push notifications", "webhook": "messages"}
# No third-party assets, nothing inline but the style; the code is in the URL, so no Referer leaves.
_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
}
_STYLE = ("body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;line-height:1.5;color:#222}"
          "button{font:inherit;padding:.5rem 1.25rem;cursor:pointer}")


class FailedCodes:
    """Bad codes per client address: GCRA in memory (a burst of `per_minute`, then one per 60/N s)."""

    def __init__(self, per_minute: int) -> None:
        self.interval, self.burst = 60.0 / per_minute, per_minute
        self._tat: dict[str, float] = {}

    def blocked_for(self, address: str) -> int:
        """Seconds until `address` may try again (0: now)."""
        tat = self._tat.get(address)
        wait = 0.0 if tat is None else tat - time.monotonic() - (self.burst - 1) * self.interval
        return 0 if wait <= 0 else max(1, int(wait + 0.999))

    def failed(self, address: str) -> None:
        now = time.monotonic()
        if len(self._tat) >= _MAX_TRACKED:
            self._tat = {a: t for a, t in self._tat.items() if t > now}
            if len(self._tat) >= _MAX_TRACKED:  # that many addresses at once: forget rather than grow
                self._tat = {}
        self._tat[address] = max(self._tat.get(address, now), now) + self.interval


@dataclass
class _Page:
    keys: signing.KeyRing
    failures: FailedCodes | None


def _page(request: Request, settings: Settings) -> _Page:
    """This app's key cache and failure counts (per app: a test process runs many apps)."""
    app_state = request.app.state
    page = app_state.get(_STATE_KEY)
    if page is None:
        limited = settings.rate_limits and settings.auth_failures_per_minute >= 1
        page = _Page(signing.KeyRing(), FailedCodes(settings.auth_failures_per_minute) if limited else None)
        app_state[_STATE_KEY] = page
    return page


def _html(title: str, body: str, status: int = 200) -> Response[str]:
    document = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1"><meta name="robots" content="noindex">'
                f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>")
    return Response(document, status_code=status, media_type=MediaType.HTML, headers=_HEADERS)


def _not_found() -> Response[str]:
    return _html("Link not valid", "<h1>This link is not valid</h1><p>It may have been cut short or changed. "
                 "Open the unsubscribe link of the message again, or copy all of it into the address bar.</p>", 404)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _verified(request: Request, state: State, code: str) -> signing.Unsubscribe | Response[str]:
    """The code's fields, or the answer when it does not verify (404) or its sender failed too often (429)."""
    services = state.services
    page = _page(request, services.settings)
    address = _client(request)
    if page.failures is not None and (wait := page.failures.blocked_for(address)):
        raise _too_many(wait)
    found = await page.keys.verify_unsubscribe(services.pool, code)
    if found is not None:
        async with services.pool.acquire() as con:
            if await signing.key_is_live(con, found.kid):
                return found
    if page.failures is not None:
        page.failures.failed(address)
    return _not_found()


def _too_many(wait: int) -> ProblemDetailsException:
    refused = problem(429, "too many invalid links from this address; retry later", retry_after=wait)
    refused.headers = {"Retry-After": str(wait)}
    return refused


@dataclass
class _PageOperation(Operation):
    """The answers as they are: HTML pages, a 404 that is HTML from here or problem details from the
    router (a path that is no code at all), 429 and 503 problems with Retry-After. The code's shape is
    documented, not enforced by the framework: any other string is the same 404 page."""

    def __post_init__(self) -> None:
        for parameter in self.parameters or []:
            if getattr(parameter, "name", None) == "code" and isinstance(parameter.schema, Schema):  # type: ignore[union-attr]
                parameter.schema.min_length = parameter.schema.max_length = signing.UNSUBSCRIBE_CODE_CHARS  # type: ignore[union-attr]
                parameter.schema.pattern = "^[A-Za-z0-9_-]*$"  # type: ignore[union-attr]
                parameter.description = "the signed code of the link (base64url); any other string is a 404"  # type: ignore[union-attr]
        problem_content = {PROBLEM_JSON: OpenAPIMediaType(schema={"$ref": "#/components/schemas/Problem"})}  # type: ignore[arg-type]
        retry_after = {"Retry-After": OpenAPIHeader(schema=Schema(type=OpenAPIType.INTEGER, minimum=1),
                                                    description="seconds to wait before trying again")}
        for status, response in (self.responses or {}).items():
            if status == "404" and response.content is not None:
                response.content.update(problem_content)  # type: ignore[arg-type]
            elif status in ("429", "503"):
                response.content, response.headers = dict(problem_content), dict(retry_after)  # type: ignore[arg-type]


@dataclass
class _OneClickOperation(_PageOperation):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.request_body = RequestBody(
            required=False,
            description="RFC 8058: `List-Unsubscribe=One-Click`; the page's form sends the same. Not read: any body does.",
            content={"application/x-www-form-urlencoded": OpenAPIMediaType(schema=Schema(  # type: ignore[arg-type]
                type=OpenAPIType.OBJECT,
                properties={"List-Unsubscribe": Schema(type=OpenAPIType.STRING, enum=["One-Click"])},
            ))},
        )


_RESPONSES = {
    404: ResponseSpec(data_container=str, media_type=MediaType.HTML, generate_examples=False,
                      description="the code does not verify (changed, cut short, or its key is unknown or retired)"),
    429: problem_response("too many invalid links from this address"),
    503: problem_response("Postgres cannot be reached right now: retry after Retry-After seconds"),
}


@get(PATH, summary="The unsubscribe page: what will happen, and a button that confirms",
     tags=["unsubscribe"], media_type=MediaType.HTML, operation_class=_PageOperation, responses=_RESPONSES,
     response_description="the page: what will happen, and a button that POSTs")
async def unsubscribe_page(request: Request, state: State, code: FromPath[str]) -> Response[str]:
    verified = await _verified(request, state, code)
    if isinstance(verified, Response):
        return verified
    what = _WHAT.get(verified.channel, "messages")
    return _html("Unsubscribe", (
        f"<h1>Unsubscribe</h1><p>You will no longer receive {html.escape(what)} from this sender.</p>"
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        "<button type=\"submit\">Unsubscribe</button></form>"
    ))


@post(PATH, summary="Unsubscribe (RFC 8058 one-click, or the page's button)", status_code=200,
      tags=["unsubscribe"], media_type=MediaType.HTML, operation_class=_OneClickOperation, responses=_RESPONSES,
      response_description="unsubscribed (or the contact is gone): a short page; again is the same, never a redirect")
async def unsubscribe(request: Request, state: State, code: FromPath[str]) -> Response[str]:
    verified = await _verified(request, state, code)
    if isinstance(verified, Response):
        return verified
    async with state.services.pool.acquire() as con:
        await unsubscribes.unsubscribe(
            con, verified.tenant_id, verified.broadcast_id, verified.contact_id, verified.channel,
            ADDRESS_SQL.get(verified.channel),
        )
    what = _WHAT.get(verified.channel, "messages")
    return _html("Unsubscribed", f"<h1>You are unsubscribed</h1><p>You will no longer receive {html.escape(what)} "
                 "from this sender.</p>")
