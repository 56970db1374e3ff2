"""What every API schema shares: the input base (unknown fields are a 422), names, pages, health."""
from __future__ import annotations

from typing import Annotated, Generic, TypeVar

import msgspec
from msgspec import Meta

T = TypeVar("T")

Name = Annotated[str, Meta(min_length=1, max_length=200)]


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
