"""Request and response bodies of /v1/segments; the rules are checked by shared.audience.segments."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from api_service.schemas.audience import Contact
from api_service.schemas.common import Input, Name
from shared.audience.segment_rules import MAX_CONDITIONS, MAX_DEPTH, MAX_RULES_BYTES

Rules = Annotated[dict[str, Any], Meta(
    description=(
        "a rule: `{all: [rules]}`, `{any: [rules]}`, `{not: rule}`, a condition `{field, op, value}` "
        "(fields: external_id, email, phone, locale, timezone, whatsapp, telegram_chat_id, created_at, "
        "updated_at, push_tokens, attributes.<path>; ops: eq ne in not_in contains starts_with exists gt "
        "gte lt lte between; times in ISO 8601 or relative: now, -30d, +2h, -15m, -1w), "
        "`{member_of: list or segment id}`, or `{any_of: attributes.<path>, where: rule over the fields "
        f"of the array's elements}}`. At most {MAX_CONDITIONS} conditions, {MAX_DEPTH} levels, "
        f"{MAX_RULES_BYTES:,} bytes as JSON; README.md, Segments, has the details"
    ),
    examples=[{"all": [
        {"field": "attributes.plan", "op": "eq", "value": "pro"},
        {"field": "created_at", "op": "between", "value": ["-30d", "now"]},
        {"any_of": "attributes.bookings", "where": {"all": [
            {"field": "status", "op": "eq", "value": "accepted"},
            {"field": "date", "op": "gte", "value": "2026-04-01"},
        ]}},
    ]}],
)]


class SegmentCreate(Input, kw_only=True):
    name: Name
    rules: Rules


class SegmentPatch(Input, kw_only=True):
    name: Name | UnsetType = UNSET
    rules: Rules | UnsetType = UNSET


class Segment(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    name: str
    rules: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class SegmentPreview(msgspec.Struct, kw_only=True):
    """Who the segment selects now: how many, and the first of them by contact id."""

    count: int
    members: list[Contact]
