"""RFC 9457 problem details for every error, with a stable `code` and the failing fields."""
from __future__ import annotations

import re
from typing import Any

import msgspec
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
    DomainError,
    Invalid,
    NotFound,
    WrongStatus,
)
from shared.platform.logging import get_logger

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
    return problem(400, str(exc), exc.code)


def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", path=request.url.path, exc_info=exc)
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "an unexpected error occurred").to_response(request)


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
