"""/r/{code} and /o/{code}: the click links and the open pixel of tracked messages. No token: the
signed code (shared/platform/signing.py) is the credential, and it names the tracking key, which
names the one broadcast of one tenant the request may count for.

`GET /r/{code}`: a 302 to the link's stored URL (never any other: the code carries a link number,
the URL comes from `tracked_links`), `Cache-Control: no-store`, answered once the click is committed
(shared/tracking/recorder.py: group commit). `HEAD /r/{code}` answers the same status and Location
and records nothing: link checkers and scanners send HEADs, people's browsers never do. (Scanners
that GET, as most do, are counted like people: telling them apart is a guess this does not make.)

`GET /o/{code}`: a 1x1 transparent GIF, `Cache-Control: no-store, max-age=0`, once the open is
committed; opens by mail privacy proxies (shared/tracking/proxies.py) are counted apart.

A code that does not verify (changed, cut short, of the other kind, its key unknown or retired) is
a 404 with a short plain-text body and no Location, and counts as a failure of the client's
address: past `auth_failures_per_minute` of them in a burst, its requests are 429s, as on the
unsubscribe page (api_service/routes/unsubscribe.py, whose reasons apply here too). A genuine code
whose link is not stored is a 404 too, not counted as a failure (nobody guessed anything). A genuine
code of a message the ledger does not have (a test send) redirects, and counts nothing. Postgres
unreachable or too slow to commit within the recorder's timeout: a 503 with Retry-After, never a
redirect for a click that was not written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from litestar import Request, Response, get, head
from litestar.datastructures import State
from litestar.enums import MediaType
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Schema,
)
from litestar.params import FromPath
from litestar.plugins.problem_details import ProblemDetailsException

from api_service.openapi import PROBLEM_JSON, problem_response
from api_service.problems import RETRY_AFTER_S, problem
from api_service.routes.unsubscribe import FailedCodes
from api_service.services import Services
from shared.platform import signing
from shared.tracking.cache import TrackingCache
from shared.tracking.location import as_location
from shared.tracking.proxies import privacy_proxy
from shared.tracking.recorder import RETIRED, Engagement, Recorder, RecorderUnavailable

CLICK_PATH = "/r/{code:str}"
OPEN_PATH = "/o/{code:str}"
_STATE_KEY = "crier_tracking"
# The smallest transparent GIF (43 bytes): one pixel, its only colour transparent.
PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")
_NOT_FOUND_TEXT = "This link is not valid.\n"
_NOT_FOUND_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@dataclass
class _Tracking:
    keys: signing.KeyRing
    failures: FailedCodes | None
    cache: TrackingCache
    recorder: Recorder


def _tracking(request: Request, services: Services) -> _Tracking:
    """This app's key cache, failure counts, lookups and recorder (per app: a test process runs many)."""
    app_state = request.app.state
    tracking = app_state.get(_STATE_KEY)
    if tracking is None:
        settings = services.settings
        limited = settings.rate_limits and settings.auth_failures_per_minute >= 1
        tracking = _Tracking(signing.KeyRing(), FailedCodes(settings.auth_failures_per_minute) if limited else None,
                             TrackingCache(services.pool), Recorder(services.pool))
        app_state[_STATE_KEY] = tracking
    return tracking


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _not_found() -> Response[str]:
    return Response(_NOT_FOUND_TEXT, status_code=404, media_type=MediaType.TEXT, headers=_NOT_FOUND_HEADERS)


def _too_many(wait: int) -> ProblemDetailsException:
    refused = problem(429, "too many invalid links from this address; retry later", retry_after=wait)
    refused.headers = {"Retry-After": str(wait)}
    return refused


def _unavailable() -> ProblemDetailsException:
    refused = problem(503, f"the database cannot take this right now; retry in {RETRY_AFTER_S} s",
                      retry_after=RETRY_AFTER_S)
    refused.headers = {"Retry-After": str(RETRY_AFTER_S)}
    return refused


class _Refused(Exception):
    """The code does not verify for this endpoint: a 404 counted against the client's address."""


async def _verified(request: Request, tracking: _Tracking, services: Services, code: str,
                    purpose: int) -> signing.Tracked:
    """The code's fields (MAC checked, no I/O while its key is cached), or _Refused; a 429 first if
    the client's address failed too often."""
    if tracking.failures is not None and (wait := tracking.failures.blocked_for(_client(request))):
        raise _too_many(wait)
    found = await tracking.keys.verify_tracking(services.pool, code)
    if found is None or found.purpose != purpose:
        raise _Refused
    return found


def _refused(request: Request, tracking: _Tracking) -> Response[str]:
    if tracking.failures is not None:
        tracking.failures.failed(_client(request))
    return _not_found()


async def _record(tracking: _Tracking, event: Engagement) -> str:
    try:
        return await tracking.recorder.record(event)
    except RecorderUnavailable:
        raise _unavailable() from None


@dataclass
class _CodeOperation(Operation):
    """The answers as they are: the success (a 302 with Location and no body, or the GIF), a 404
    that is plain text from here or problem details from the router (a path that is no code at all),
    429 and 503 problems with Retry-After. The code's shape is documented, not enforced by the
    framework: any other string is the same 404."""

    success: ClassVar[str] = "200"

    def __post_init__(self) -> None:
        for parameter in self.parameters or []:
            if getattr(parameter, "name", None) == "code" and isinstance(parameter.schema, Schema):  # type: ignore[union-attr]
                parameter.schema.min_length = parameter.schema.max_length = signing.TRACKING_CODE_CHARS  # type: ignore[union-attr]
                parameter.schema.pattern = "^[A-Za-z0-9_-]*$"  # type: ignore[union-attr]
                parameter.description = "the signed code of the link (base64url); any other string is a 404"  # type: ignore[union-attr]
        problem_content = {PROBLEM_JSON: OpenAPIMediaType(schema={"$ref": "#/components/schemas/Problem"})}  # type: ignore[arg-type]
        retry_after = {"Retry-After": OpenAPIHeader(schema=Schema(type=OpenAPIType.INTEGER, minimum=1),
                                                    description="seconds to wait before trying again")}
        responses = self.responses if self.responses is not None else {}
        self.responses = responses
        for status, response in responses.items():
            if status == "404" and isinstance(response, OpenAPIResponse) and response.content is not None:
                response.content.update(problem_content)  # type: ignore[arg-type]
            elif status in ("429", "503") and isinstance(response, OpenAPIResponse):
                response.content, response.headers = dict(problem_content), dict(retry_after)  # type: ignore[arg-type]
        if self.success == "302":
            responses.pop("200", None)
            responses["302"] = OpenAPIResponse(
                description="to the link's stored URL, once the click is recorded; no body",
                headers={"Location": OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING),
                                                   description="the link's URL, as stored")},
            )
        elif (ok := responses.get("200")) is not None and isinstance(ok, OpenAPIResponse):
            ok.content = {"image/gif": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format="binary"))}  # type: ignore[arg-type]


@dataclass
class _RedirectOperation(_CodeOperation):
    success: ClassVar[str] = "302"


@dataclass
class _PixelOperation(_CodeOperation):
    success: ClassVar[str] = "200"


@get(CLICK_PATH, summary="A tracked link: counts the click, then redirects to the link's URL",
     tags=["tracking"], status_code=302, operation_class=_RedirectOperation,
     responses={
         404: ResponseSpec(data_container=str, media_type=MediaType.TEXT, generate_examples=False,
                           description="the code does not verify (changed, cut short, of an open, or its key is "
                                       "unknown or retired), or names no stored link; no Location"),
         429: problem_response("too many invalid links from this address"),
         503: problem_response("Postgres cannot take the click right now: retry after Retry-After seconds"),
     })
async def click(request: Request, state: State, code: FromPath[str]) -> Response[bytes | str]:
    services: Services = state.services
    tracking = _tracking(request, services)
    try:
        found = await _verified(request, tracking, services, code, signing.PURPOSE_CLICK)
    except _Refused:
        return _refused(request, tracking)
    link = await tracking.cache.link(found.key, found.link)
    if link is None:
        return _not_found()
    outcome = await _record(tracking, Engagement(key=link.key, contact_id=found.contact_id, kid=found.kid,
                                                 link=found.link))
    if outcome == RETIRED:
        return _refused(request, tracking)
    return _redirect(link.url)


@head(CLICK_PATH, include_in_schema=False)
async def click_head(request: Request, state: State, code: FromPath[str]) -> Response[None]:
    """The GET's status and Location, nothing recorded (see the module)."""
    services: Services = state.services
    tracking = _tracking(request, services)
    try:
        found = await _verified(request, tracking, services, code, signing.PURPOSE_CLICK)
    except _Refused:
        _refused(request, tracking)
        return Response(b"", status_code=404, media_type=MediaType.TEXT, headers=_NOT_FOUND_HEADERS)
    link = await tracking.cache.link(found.key, found.link)
    async with services.pool.acquire() as con:
        live = await signing.key_is_live(con, found.kid)
    if not live:
        _refused(request, tracking)
    if link is None or not live:
        return Response(b"", status_code=404, media_type=MediaType.TEXT, headers=_NOT_FOUND_HEADERS)
    return _redirect(link.url)


def _redirect(url: str) -> Response[bytes]:
    return Response(b"", status_code=302, headers={"Location": as_location(url), "Cache-Control": "no-store"})


@get(OPEN_PATH, summary="The open pixel of a tracked email: counts the open, answers a 1x1 transparent GIF",
     tags=["tracking"], media_type="image/gif", operation_class=_PixelOperation,
     response_description="a 1x1 transparent GIF (43 bytes)",
     responses={
         404: ResponseSpec(data_container=str, media_type=MediaType.TEXT, generate_examples=False,
                           description="the code does not verify (changed, cut short, of a click, or its key is "
                                       "unknown or retired)"),
         429: problem_response("too many invalid links from this address"),
         503: problem_response("Postgres cannot take the open right now: retry after Retry-After seconds"),
     })
async def pixel(request: Request, state: State, code: FromPath[str]) -> Response[bytes | str]:
    services: Services = state.services
    tracking = _tracking(request, services)
    try:
        found = await _verified(request, tracking, services, code, signing.PURPOSE_OPEN)
    except _Refused:
        return _refused(request, tracking)
    key = await tracking.cache.key(found.key)
    if key is None:
        return _not_found()
    proxy = privacy_proxy(request.headers.get("user-agent")) is not None
    if await _record(tracking, Engagement(key=key, contact_id=found.contact_id, kid=found.kid, proxy=proxy)) == RETIRED:
        return _refused(request, tracking)
    return Response(PIXEL, media_type="image/gif", headers={"Cache-Control": "no-store, max-age=0"})
