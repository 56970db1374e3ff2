"""What every API schema shares: the input base (unknown fields are a 422), names, pages, health."""
from __future__ import annotations

from typing import Annotated, Generic, TypeVar

import msgspec
from msgspec import Meta

from shared.kernel.limits import MAX_NAME_CHARS

T = TypeVar("T")

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]


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
