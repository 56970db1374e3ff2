"""RFC 9457 problem details for every error, with a stable `code` and the failing fields."""
from __future__ import annotations

import re
from typing import Any

import asyncpg
import msgspec
import nats.errors
import nats.js.errors
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from shared.kernel.errors import (
    AlreadyExists,
    Conflict,
    DomainError,
    Invalid,
    NotFound,
    WrongStatus,
)
from shared.kernel.limits import PATTERN_REASONS
from shared.platform.db import is_connection_error
from shared.platform.logging import get_logger
from shared.platform.secrets import SecretUnreadable

log = get_logger(__name__)

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    422: "Validation failed",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


def problem(status: int, detail: str, code: str | None = None, **extra: Any) -> ProblemDetailsException:
    code = code or _CODES.get(status, "error")
    return ProblemDetailsException(
        status_code=status,
        type_=f"urn:crier:problem:{code}",
        title=_TITLES.get(status, "Error"),
        detail=detail,
        extra={"code": code, **extra},
    )


async def send_problem(
    send: Any, status: int, detail: str, code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None, **extra: Any,
) -> None:
    """The same problem details, sent by a pure ASGI middleware that answers before any handler."""
    code = code or _CODES.get(status, "error")
    body = msgspec.json.encode({
        "type": f"urn:crier:problem:{code}", "title": _TITLES.get(status, "Error"), "status": status,
        "detail": detail, "code": code, **extra,
    })
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]})
    await send({"type": "http.response.body", "body": body})


def invalid(field: str, reason: str) -> ProblemDetailsException:
    return problem(422, f"{field}: {reason}", errors=[{"field": field, "reason": reason}])


# msgspec says "... - at `$.content.subject`" or "... `$[3].email`"; we name the field as a path.
_AT = re.compile(r"\s*-\s*at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")
# A string against one of the character patterns (no U+0000, one line) is said in words, not regex.
_PATTERNS = {f"Expected `str` matching regex {pattern!r}": reason for pattern, reason in PATTERN_REASONS.items()}


def _field_errors(exc: ValidationException) -> list[dict[str, str]]:
    """[{field, reason}] from Litestar's validation errors: it puts the path in `key` (`data` for the
    body itself, `content.subject` for a nested value) and msgspec names unknown and missing fields
    only in the message."""
    errors: list[dict[str, str]] = []
    extra = exc.extra if isinstance(exc.extra, list) else [exc.extra] if exc.extra else []
    for item in extra:
        if not isinstance(item, dict):
            continue
        message = str(item.get("message", ""))
        key = str(item.get("key") or "")
        path = "" if key in ("", "data") else key
        if m := _AT.search(message):
            path = m.group(1) or path
            message = message[: m.start()]
        for pattern, reason in ((_UNKNOWN, "unknown field"), (_MISSING, "required field missing")):
            if m := pattern.search(message):
                path = f"{path}.{m.group(1)}" if path else m.group(1)
                message = reason
                break
        message = _PATTERNS.get(message.strip(), message)
        errors.append({"field": path or "body", "reason": message.strip()})
    if not errors:
        errors.append({"field": "body", "reason": exc.detail})
    return errors


_NOT_JSON = ("JSON is malformed", "Input data was truncated", "'data'")  # the last: no body at all


def _from_validation(exc: ValidationException) -> ProblemDetailsException:
    errors = _field_errors(exc)
    if any(e["reason"].startswith(_NOT_JSON) for e in errors):
        return problem(400, "the request body is missing or is not valid JSON")
    detail = "; ".join(f"{e['field']}: {e['reason']}" for e in errors)
    return problem(422, detail, errors=errors)


def _from_http(exc: HTTPException) -> ProblemDetailsException:
    if isinstance(exc, ProblemDetailsException):
        return exc
    converted = problem(exc.status_code, str(exc.detail))
    converted.headers = exc.headers
    return converted


def _from_domain(exc: DomainError) -> ProblemDetailsException:
    match exc:
        case WrongStatus():
            return problem(409, str(exc), "wrong_status", current_status=exc.status)
        case Invalid():
            return invalid(exc.field, exc.reason)
        case NotFound():
            return problem(404, str(exc))
        case AlreadyExists():
            return problem(409, str(exc), "already_exists")
        case Conflict():
            return problem(409, str(exc), exc.code, **exc.extra)
    return problem(400, str(exc), exc.code)


# What NATS raises while it cannot be reached (its TimeoutError is also a builtin TimeoutError).
_NATS_DOWN = (
    nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError, nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError, nats.errors.StaleConnectionError, nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)
RETRY_AFTER_S = 5  # a dependency that is down: when to try again (a restart or failover takes seconds)


def _dependency_down(exc: Exception) -> str | None:
    """Which dependency `exc` says is unreachable, or None if it is an error of this request."""
    if isinstance(exc, _NATS_DOWN):
        return "the message bus"
    if is_connection_error(exc) or isinstance(exc, asyncpg.TooManyConnectionsError):
        return "the database"
    return None


def _unavailable(request: Request, exc: Exception, dependency: str) -> Response:
    """503 with Retry-After: the request may be fine, the service cannot serve it right now. A command
    is one transaction, so it is done whole or not at all (only a connection lost at the commit
    leaves the client unsure which: commands are idempotent, and a keyed retry is replayed)."""
    log.warning("dependency unavailable", path=request.url.path, dependency=dependency, error=repr(exc))
    unavailable = problem(503, f"{dependency} cannot be reached; retry in {RETRY_AFTER_S} s", retry_after=RETRY_AFTER_S)
    unavailable.headers = {"Retry-After": str(RETRY_AFTER_S)}
    return unavailable.to_response(request)


def _unexpected(request: Request, exc: Exception) -> Response:
    if dependency := _dependency_down(exc):
        return _unavailable(request, exc, dependency)
    if isinstance(exc, SecretUnreadable):  # CRIER_SECRET_KEY lacks the key a provider was sealed with
        log.error("a provider's secrets cannot be opened", path=request.url.path, error=str(exc))
        return problem(503, "a provider's secrets cannot be opened with this deployment's keys (CRIER_SECRET_KEY); "
                            "the operator must add the key they were sealed with", "secrets_unreadable",
                       ).to_response(request)
    log.error("unhandled error", path=request.url.path, exc_info=exc)
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "an unexpected error occurred").to_response(request)


class ProblemRequest(Request):
    """Litestar's request, but a JSON body nested too deeply to decode is a 400 like any broken
    body, not a 500: msgspec decodes recursively and raises RecursionError near Python's recursion
    limit (about 1,000 levels; no input of this API is nested more than a few)."""

    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            raise problem(400, "the request body is nested too deeply to decode") from None


def problem_details_plugin() -> ProblemDetailsPlugin:
    return ProblemDetailsPlugin(
        ProblemDetailsConfig(
            exception_to_problem_detail_map={
                ValidationException: _from_validation,
                HTTPException: _from_http,
                DomainError: _from_domain,
            }
        )
    )


exception_handlers = {Exception: _unexpected}
