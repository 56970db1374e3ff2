"""Request and response bodies of /v1/suppressions, and the checks the struct types cannot do."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from api_service.problems import problem
from api_service.schemas.common import ONE_LINE, Input
from shared.audience.fields import email_problem, phone_problem
from shared.audience.suppressions import (
    MAX_ADDRESS_CHARS,
    REASONS,
    SCOPES,
    NewSuppression,
    normal_address,
)

MAX_SUPPRESSIONS = 10_000  # per POST /v1/suppressions
MAX_ERRORS = 50

Scope = Literal[SCOPES]  # type: ignore[valid-type]
Reason = Literal[REASONS]  # type: ignore[valid-type]
Address = Annotated[str, Meta(
    min_length=1, max_length=MAX_ADDRESS_CHARS, pattern=ONE_LINE,
    description="an email (any case), an E.164 phone, or the address on another channel",
    examples=["ada@example.com"],
)]
ContactId = Annotated[int, Meta(ge=1, le=2**63 - 1)]


class SuppressionIn(Input, kw_only=True):
    """Who not to send to: a contact, an address, or both (either then matches), on one channel or
    on `all`. Adding one that exists is not an error: the first is kept."""

    channel: Annotated[Scope, Meta(description="a channel, or `all` for every channel")]  # type: ignore[valid-type]
    reason: Reason = "manual"  # type: ignore[valid-type]
    contact_id: ContactId | None = None
    address: Address | None = None
    broadcast_id: uuid.UUID | None = None  # the broadcast that led to it, if any


SuppressionsIn = Annotated[list[SuppressionIn], Meta(max_length=MAX_SUPPRESSIONS)]


class Suppression(msgspec.Struct, kw_only=True):
    id: int
    channel: str
    contact_id: int | None
    address: str | None
    reason: str
    broadcast_id: uuid.UUID | None
    created_at: datetime


class SuppressionsAdded(msgspec.Struct, kw_only=True):
    """The answer to an array: how many were new, how many were there already, and the id of each
    item in request order."""

    created: int
    existing: int
    ids: list[int]


class SuppressionsDeleted(msgspec.Struct, kw_only=True):
    deleted: int


def address_problem(channel: str, address: str) -> str | None:
    """Why `address` cannot be suppressed on `channel`, or None (other channels: any one line)."""
    if not address.strip():
        return "must not be blank"
    if channel == "email" or (channel == "all" and "@" in address):
        return email_problem(address.strip())
    if channel in ("sms", "whatsapp"):
        return phone_problem(address.strip())
    return None


def new_suppressions(items: list[SuppressionIn], array: bool) -> list[NewSuppression]:
    """Check every item (422 naming each bad field, `[3].address` in an array) and normalise addresses."""
    errors: list[dict[str, str]] = []

    def bad(i: int, field: str, reason: str) -> None:
        errors.append({"field": f"[{i}].{field}" if array else field, "reason": reason})

    for i, item in enumerate(items):
        if item.contact_id is None and item.address is None:
            bad(i, "address", "give an address or a contact_id (or both)")
        elif item.address is not None and (reason := address_problem(item.channel, item.address)):
            bad(i, "address", reason)
    if errors:
        detail = "; ".join(f"{e['field']}: {e['reason']}" for e in errors[:5])
        if len(errors) > 5:
            detail += f"; and {len(errors) - 5} more"
        raise problem(422, detail, errors=errors[:MAX_ERRORS])
    return [
        NewSuppression(
            channel=item.channel, reason=item.reason, contact_id=item.contact_id, broadcast_id=item.broadcast_id,
            address=normal_address(item.channel, item.address) if item.address is not None else None,
        )
        for item in items
    ]
