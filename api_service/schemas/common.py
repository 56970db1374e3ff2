"""What every API schema shares: the input base (unknown fields are a 422), names, pages, health,
the strings Postgres can hold, and the problem details every error is."""
from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

import msgspec
from msgspec import Meta

from shared.kernel.limits import MAX_NAME_CHARS, NO_NUL_PATTERN, ONE_LINE_PATTERN

T = TypeVar("T")

# Every string the API stores or queries by carries one of these patterns (shared/kernel/limits.py):
# Postgres text and jsonb cannot hold U+0000, so it is a 422 naming the field rather than a driver
# error; header values are also single lines. Shown as `pattern` in the OpenAPI document.
NO_NUL = NO_NUL_PATTERN
ONE_LINE = ONE_LINE_PATTERN

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS, pattern=NO_NUL)]


def text(max_length: int, *, one_line: bool = False, **meta: Any) -> Any:
    """A string type of at most `max_length` characters, without U+0000 (and on one line)."""
    return Annotated[str, Meta(max_length=max_length, pattern=ONE_LINE if one_line else NO_NUL, **meta)]


class Input(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: a field the API does not know (or only returns) is an error."""


class Page(msgspec.Struct, Generic[T], kw_only=True):
    items: list[T]
    total: int
    limit: int
    offset: int


class Health(msgspec.Struct):
    status: str
    checks: dict[str, str] = {}


class ReaderLag(msgspec.Struct, kw_only=True):
    """How far a reader of the event store is behind (0 and 0.0 when caught up)."""

    behind: int  # committed events past its checkpoint, counted up to 10,000
    behind_capped: bool  # there are at least `behind`
    oldest_age_s: float  # age of the oldest of them


class Readiness(msgspec.Struct, kw_only=True):
    status: str
    checks: dict[str, str] = {}
    relay: ReaderLag | None = None  # events not yet published to NATS
    projector: ReaderLag | None = None  # events not yet folded into the async views (the slowest one)
    parked_events: int | None = None  # events the relay set aside as too large for NATS (never published)


class FieldError(msgspec.Struct, kw_only=True):
    field: str  # a path into the request: `content.subject`, `[3].email`, a query parameter's name
    reason: str


class Problem(msgspec.Struct, kw_only=True):
    """An RFC 9457 problem: every error answer (`application/problem+json`). `code` is stable;
    some problems add members (`current_status`, `retry_after`, `violated_policies`, ...)."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[FieldError] | msgspec.UnsetType = msgspec.UNSET  # 422: the failing fields
