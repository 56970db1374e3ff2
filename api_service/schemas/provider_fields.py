"""The field types and checks every provider kind's schema shares (api_service/schemas/providers.py
and the provider_<kind>.py modules), in a module of their own so those import it, not each other."""
from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from api_service.schemas.common import NO_NUL, Input
from shared.channels.accounts import (
    DEFAULT_BATCH_DELAY_MS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_RETRIES,
)
from shared.channels.ratelimit import parse_windows
from shared.channels.twilio import MAX_CONCURRENCY as TWILIO_MAX_CONCURRENCY
from shared.kernel.errors import Invalid
from shared.kernel.limits import MAX_PROVIDER_WEIGHT

Secret = Annotated[str, Meta(max_length=1024, pattern=NO_NUL)]
BatchSize = Annotated[int, Meta(ge=1, le=10000, description="recipients per batch job")]
BatchDelayMs = Annotated[int, Meta(ge=0, le=86_400_000, description="delay between batches (0: none)")]
MaxRetries = Annotated[int, Meta(ge=0, le=10, description="resends of a message after a transient failure")]
TimeoutS = Annotated[float, Meta(gt=0, le=300, description="seconds to wait for the server on each command")]
HttpUrl = Annotated[str, Meta(min_length=8, max_length=2048, pattern=r"^https?://[^\s\x00]+$")]
Concurrency = Annotated[int, Meta(ge=1, le=TWILIO_MAX_CONCURRENCY, description=(
    "requests in flight at once for this account, per sender process"))]
InsecureHttp = Annotated[bool, Meta(description=(
    "send the account credentials over plain http: readable by anyone on the path. Required to save an http:// "
    "base_url"
))]


RateWindow = Annotated[dict[str, Any], Meta(description=(
    '{"limit": 30, "per": "second"|"minute"|"hour"|"day", "burst"?: n}: at most `limit` messages per `per`, '
    "across every sender process together"))]
RateLimits = Annotated[list[RateWindow], Meta(max_length=4, description=(
    "the account's rate limits (at most 4 windows, one per `per`); null: the kind's documented ceiling "
    "(Telegram 30/second, WhatsApp 80/second per number, a Twilio long code 1/second, FCM 600,000/minute), "
    "[]: none"))] | None
Weight = Annotated[int, Meta(ge=1, le=MAX_PROVIDER_WEIGHT, description=(
    "this provider's share of a broadcast's load when the broadcast names several (`provider_ids`): "
    "batches go to each in proportion to its weight"))]
OnUnknown = Annotated[Literal["mark_unknown", "resend"], Meta(description=(
    "a message a sender that died had handed over, without hearing back: `mark_unknown` (never resent by "
    "itself; a retry asking for `unknown` sends it) or `resend` (sent again: the recipient may get it twice)"))]

class SendingSettings(Input, kw_only=True):
    """What every kind's create body takes besides its own fields (each kind's struct inherits it,
    so a setting every account has is declared once): batches, retries, rate limits, the fate of a
    message a dead sender left in flight, and the share of a broadcast's load."""

    batch_size: BatchSize = DEFAULT_BATCH_SIZE
    batch_delay_ms: BatchDelayMs = DEFAULT_BATCH_DELAY_MS
    max_retries: MaxRetries = DEFAULT_MAX_RETRIES
    rate_limits: RateLimits = None
    on_unknown: OnUnknown = "mark_unknown"
    weight: Weight = 1


class SendingShown(msgspec.Struct, kw_only=True):
    """What every kind's response shows besides its own fields (SendingSettings as stored)."""

    batch_size: int
    batch_delay_ms: int
    max_retries: int
    created_at: datetime
    updated_at: datetime
    rate_limits: list[dict[str, Any]] | None = None  # None: the kind's default
    on_unknown: str = "mark_unknown"
    weight: int = 1


_URL_HOST = re.compile(r"^[A-Za-z0-9._:-]+$")  # what urlsplit leaves of a name or an address (no brackets)


def check_url(field: str, value: str | None) -> None:
    """An http(s) URL with a host, nothing in it that would be a credential or not part of an endpoint."""
    if value is None:
        return
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises for a port that is not a number or out of range
    except ValueError as exc:
        raise Invalid(field, f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not _URL_HOST.match(parts.hostname):
        raise Invalid(field, "must be an http or https URL with a host")
    if parts.username is not None or parts.password is not None:
        raise Invalid(field, "must not carry a user or password")


def check_rate_limits(value: list[dict[str, Any]] | None) -> None:
    if value is None:
        return
    try:
        parse_windows(value)
    except (ValueError, TypeError) as exc:
        raise Invalid("rate_limits", str(exc)) from None
