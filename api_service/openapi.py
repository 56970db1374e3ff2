"""The OpenAPI document tells the truth about errors, headers and media types.

Litestar documents, for a route with parameters, a 400 of its own shape (`{status_code, detail,
extra}`) that this API never sends, and no other error. Every error here is RFC 9457 problem
details (`application/problem+json`, `schemas.common.Problem`), and which ones a route can answer
follows from what the route is, so they are added here by these rules rather than repeated on
every handler:

- behind authentication (all but the health checks and /schema): 401 (no, invalid or revoked
  token), 429 (a rate limit, or the failed-authentication gate) and 503 (Postgres or NATS cannot
  be reached), both with `Retry-After`;
- a write route (the `require_write` guard): 403 for a read token;
- a path parameter: 404, also for another tenant's object;
- a query or header parameter, or a body: 422 naming the field; a body: 400 (not JSON, or nested
  too deeply to decode) and 413 (over the body cap);
- every POST honours `Idempotency-Key` (api_service/idempotency.py), documented as a header
  parameter: 409 while the first request with the key runs, 422 for the key reused with another
  body, 413 for a keyed body over the cap.

A route declares what only it can answer with `responses={409: problem_response("why")}`; every
error response gets the problem content here. A route returning Server-Sent Events is documented
as `text/event-stream`. The health checks need no token (`security: []`).

The limits, too, are shown as the app checks them. A request body's schema is msgspec's own for
the struct the body is decoded into (Litestar's drops the constraints on a list's items, such as
`contact_ids` ≤ 2^63-1, and does not say that unknown fields are refused), and a parameter's
numeric bounds are its declared integers (Litestar writes them as floats: 2^63-1 became 2^63).
"""
from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    Reference,
    Schema,
)
from litestar.params import ParameterKwarg
from litestar.response import ServerSentEvent
from litestar.routes import HTTPRoute

from api_service.auth import PUBLIC_PATHS, require_write
from api_service.idempotency import MAX_KEY_LENGTH
from api_service.schemas.common import Problem

PROBLEM_JSON = "application/problem+json"
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_RETRY_AFTER = {"Retry-After": OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER, minimum=1), description="seconds to wait before trying again",
)}
# status -> (what it means on any route, whether it carries Retry-After)
_MEANINGS: dict[int, tuple[str, bool]] = {
    400: ("the body is not JSON, or is nested too deeply to decode", False),
    401: ("no token, or one that is invalid or revoked", False),
    403: ("a read token: this request needs the write scope", False),
    404: ("no such object (another tenant's is not found either)", False),
    409: ("the object's state does not allow it (`code` says why), or the first request with this "
          "Idempotency-Key is still being processed", False),
    413: ("the body is over the size limit", False),
    422: ("validation failed: `errors` names each field and why", False),
    429: ("over a rate limit, or too many failed authentications from this address", True),
    503: ("Postgres or NATS cannot be reached right now: retry after Retry-After seconds", True),
}
_IDEMPOTENCY_KEY = Parameter(
    name="Idempotency-Key", param_in="header", required=False,
    schema=Schema(type=OpenAPIType.STRING, min_length=1, max_length=MAX_KEY_LENGTH),
    description=("a retry with the same key and body gets the first answer again (Idempotent-Replayed: true) "
                 "and does nothing twice; the same key with another body is a 422. Kept 24 hours per token"),
)


def problem_response(description: str) -> ResponseSpec:
    """A route's own error answer, for `responses={status: ...}` (its content is set by `document`)."""
    return ResponseSpec(data_container=None, description=description, media_type=PROBLEM_JSON)


def document(app: Litestar) -> None:
    """Complete the app's OpenAPI document by the rules above (before it is first served)."""
    openapi = app.openapi_schema
    _add_schemas(openapi, [Problem])
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or (item := (openapi.paths or {}).get(route.path_format)) is None:
            continue
        for method, (handler, _) in route.route_handler_map.items():
            if (operation := getattr(item, method.lower(), None)) is not None:
                _document_operation(operation, handler, method, bool(route.path_parameters))
                _exact_body(openapi, operation, handler)
                _exact_bounds(operation, handler)


def _add_schemas(openapi: OpenAPI, types: list[Any]) -> list[dict[str, Any]]:
    """msgspec's JSON schemas of `types`, their structs added to (or replacing) the components."""
    top, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    assert openapi.components is not None
    schemas: dict[str, Any] = openapi.components.schemas  # type: ignore[assignment]
    schemas.update(components)
    return list(top)


def _exact_body(openapi: OpenAPI, operation: Operation, handler: HTTPRouteHandler) -> None:
    """The request body's schema as msgspec validates it (see the module's docstring)."""
    data = handler.parsed_fn_signature.parameters.get("data")
    body = operation.request_body
    if data is None or body is None or isinstance(body, Reference) or not body.content:
        return
    (schema,) = _add_schemas(openapi, [data.annotation])
    for media in body.content.values():
        media.schema = schema  # type: ignore[assignment]


def _exact_bounds(operation: Operation, handler: HTTPRouteHandler) -> None:
    """A parameter's integer bounds as declared, not as the floats Litestar makes of them."""
    declared: dict[str, ParameterKwarg] = {}
    for name, field in handler.parsed_fn_signature.parameters.items():
        kwarg = field.kwarg_definition
        if isinstance(kwarg, ParameterKwarg):
            declared[kwarg.query or kwarg.header or name] = kwarg
    for parameter in operation.parameters or []:
        kwarg = declared.get(getattr(parameter, "name", ""))
        schema = getattr(parameter, "schema", None)
        if kwarg is None or not isinstance(schema, Schema):
            continue
        for source, target in (("ge", "minimum"), ("le", "maximum"), ("gt", "exclusive_minimum"), ("lt", "exclusive_maximum")):
            if isinstance(value := getattr(kwarg, source), int):
                setattr(schema, target, value)


def _document_operation(operation: Operation, handler: HTTPRouteHandler, method: str, has_path_params: bool) -> None:
    responses = operation.responses if operation.responses is not None else {}
    operation.responses = responses
    if 400 not in (handler.responses or {}):
        responses.pop("400", None)  # Litestar's own shape, which this API never sends (see above)
    if _returns_events(handler):
        responses["200"] = OpenAPIResponse(
            description="a stream of Server-Sent Events",
            content={"text/event-stream": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))},
        )
    if all(path.startswith(tuple(PUBLIC_PATHS)) for path in handler.paths):
        operation.security = []  # no token needed; what else they answer is declared on them
        return
    if method == "POST" and not any(getattr(p, "name", "") == _IDEMPOTENCY_KEY.name for p in operation.parameters or []):
        operation.parameters = [*(operation.parameters or []), _IDEMPOTENCY_KEY]
    declared = {int(status) for status in responses if int(status) >= 400}
    for status in sorted(declared | _statuses(operation, handler, method, has_path_params)):
        _problem(responses, status)


def _statuses(operation: Operation, handler: HTTPRouteHandler, method: str, has_path_params: bool) -> set[int]:
    """The errors any route like this one can answer (the rules in the module's docstring)."""
    # A route that streams its body declares it on its operation instead (the contact import).
    has_body = bool({"data", "body"} & set(handler.parsed_fn_signature.parameters)) or operation.request_body is not None
    has_params = any(getattr(p, "param_in", "path") != "path" for p in operation.parameters or [])
    statuses = {401, 429, 503}
    if require_write in (handler.guards or []):
        statuses.add(403)
    if has_path_params:
        statuses.add(404)
    if has_body or has_params:
        statuses.add(422)
    if has_body:
        statuses |= {400, 413}
    if method == "POST":
        statuses |= {409, 413, 422}
    return statuses


def _problem(responses: dict[str, OpenAPIResponse], status: int) -> None:
    """Problem details as the `status` response's content, keeping a route's own description."""
    meaning, retry = _MEANINGS.get(status, ("see the problem's detail", False))
    own = responses.get(str(status))
    responses[str(status)] = OpenAPIResponse(
        description=own.description if own is not None and own.description != ResponseSpec.description else meaning,
        headers=dict(_RETRY_AFTER) if retry else None,
        content={PROBLEM_JSON: OpenAPIMediaType(schema=_PROBLEM_REF)},  # type: ignore[arg-type]
    )


def _returns_events(handler: HTTPRouteHandler) -> bool:
    annotation = handler.parsed_fn_signature.return_type.annotation
    return isinstance(annotation, type) and issubclass(annotation, ServerSentEvent)
