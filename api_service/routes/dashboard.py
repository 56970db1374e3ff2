"""GET /v1/dashboard: the tenant's broadcasts over a window of time, their counters summed, per
channel, and the latest of them one by one (shared/tracking/dashboard.py says which broadcasts a
window holds and what reading it costs)."""
from __future__ import annotations

import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import QueryParameter

from api_service.schemas.broadcasts import Counters
from shared.broadcasts.counters import counters_by_status, counters_of, shown
from shared.kernel.errors import Invalid
from shared.tenants.store import Principal
from shared.tracking import dashboard
from shared.tracking.dashboard import ChannelTotals

DEFAULT_DAYS = 30  # the window when `from` is left out: the 30 days before `to`
DEFAULT_SPAN = timedelta(days=DEFAULT_DAYS)
# A year, leap or not. Every broadcast in the window is summed, so a read costs what the window holds
# (shared/tracking/dashboard.py): a bound on the span is one on the cost, for a tenant that sends steadily.
MAX_DAYS = 366
MAX_LIMIT = 500
MAX_MOMENT_CHARS = 64  # longer than any ISO 8601 date and time
_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)

# Strings, parsed by the handler, so that a 422 names `from` (Litestar's would name the Python parameter).
_MOMENT = ("an ISO 8601 date and time (`2026-11-01T00:00:00Z`; UTC when it has no offset) or date "
           "(its midnight, UTC)")
From = Annotated[str | None, QueryParameter(
    name="from", schema_extra={"format": "date-time", "maxLength": MAX_MOMENT_CHARS},
    description=f"the window's start (inclusive), {_MOMENT}; default {DEFAULT_DAYS} days before `to`")]
To = Annotated[str | None, QueryParameter(
    schema_extra={"format": "date-time", "maxLength": MAX_MOMENT_CHARS},
    description=f"the window's end (exclusive), {_MOMENT}; default now. At most {MAX_DAYS} days after `from`")]
Limit = Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT, description="broadcasts listed one by one, the latest first")]


class DashboardBroadcast(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    name: str
    status: str
    channels: list[str]  # its first channel first
    started_at: datetime  # when its latest run started: in [from, to)
    sent_at: datetime | None  # when that run finished (null while it runs, or if it was called off)
    counters: Counters  # as GET /v1/broadcasts/{id} shows them


class Dashboard(msgspec.Struct, kw_only=True):
    since: datetime = msgspec.field(name="from")  # the window as applied (defaults filled in), in UTC
    to: datetime
    broadcasts: int  # broadcasts whose latest run started in the window: all of them are in `totals`
    totals: Counters  # the sum of their counters
    channels: list[ChannelTotals]  # per channel, what is counted per channel (sends are counted per run)
    items: list[DashboardBroadcast]  # the `limit` latest started of them
    limit: int


def moment(field: str, raw: str | None) -> datetime | None:
    """A query's ISO 8601 date and time, in UTC (one without an offset is UTC already); a 422 naming
    `field` when it is not one."""
    if raw is None:
        return None
    if len(raw) > MAX_MOMENT_CHARS:
        raise Invalid(field, f"at most {MAX_MOMENT_CHARS} characters")
    try:
        at = datetime.fromisoformat(raw.upper())  # RFC 3339 allows a lower-case `t` and `z`
        return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)
    except ValueError:
        raise Invalid(field, "not an ISO 8601 date and time (such as 2026-11-01T00:00:00Z) or date") from None
    except OverflowError:  # an offset that takes it out of the years 1-9999
        raise Invalid(field, "out of range") from None


def window_of(since_raw: str | None, until_raw: str | None, now: datetime) -> tuple[datetime, datetime]:
    """[from, to) from the query, defaults filled in; a 422 naming the field that makes it empty or too long."""
    until = moment("to", until_raw) or now
    since = moment("from", since_raw)
    if since is None:  # the 30 days before `to`, or as many as there are after the year 1 began
        since = max(until, _EARLIEST + DEFAULT_SPAN) - DEFAULT_SPAN
    if until <= since:
        if until_raw is None:
            raise Invalid("from", "must be before now (`to` left out)")
        raise Invalid("to", "must be after `from`")
    if until - since > timedelta(days=MAX_DAYS):
        raise Invalid("from", f"at most {MAX_DAYS} days before `to`")
    return since, until


class DashboardController(Controller):
    path = "/v1/dashboard"
    tags = ["broadcasts"]

    @get("/", summary="The tenant's broadcasts over a window of time: counters summed, per channel, one by one",
         description=(
             "The broadcasts whose latest run started in [`from`, `to`) (their `started_at`; so each broadcast is in "
             "one window at most, and a recurring one in that of its latest occurrence), deleted ones left out. "
             "`totals`: their `counters` summed (each broadcast's over all its runs, as GET /v1/broadcasts/{id} "
             "shows them). `channels`: per channel, how many of them send on it and the figures counted per "
             "channel (delivered, read, opens, clicks, bounced, complained, unsubscribed ...); the send counters "
             "(total, sent, failed ...) are counted per run, not per channel, and are in `totals` and each item. "
             "`items`: the `limit` latest started, with their counters."))
    async def dashboard(self, request: Request[Principal, object, object], state: State, since: From = None,
                        to: To = None, limit: Limit = 100) -> Dashboard:
        since_at, until_at = window_of(since, to, state.services.clock())
        async with state.services.pool.acquire() as con:
            return await dashboard_of(con, request.user.tenant_id, since_at, until_at, limit)


async def dashboard_of(con: asyncpg.Connection, tenant_id: uuid.UUID, since: datetime, until: datetime,
                       limit: int) -> Dashboard:
    """The dashboard of the tenant's broadcasts in [since, until), its parts read in one snapshot."""
    async with con.transaction(isolation="repeatable_read", readonly=True):
        window = await dashboard.window(con, tenant_id, since, until, limit)
        by_status = await counters_by_status(con, dashboard.BROADCASTS_IN_WINDOW, tenant_id, since, until)
        counters = await counters_of(con, [b.id for b in window.latest]) if window.latest else {}
    # Counters as a broadcast shows them: its unsent messages queued or dropped by its status.
    totals: Counter[str] = Counter()
    for status, summed in by_status.items():
        totals.update(shown(summed, status))
    items = [DashboardBroadcast(id=b.id, name=b.name, status=b.status, channels=b.channels, started_at=b.started_at,
                                sent_at=b.sent_at, counters=Counters(**shown(counters.get(b.id), b.status)))
             for b in window.latest]
    return Dashboard(since=since, to=until, broadcasts=window.broadcasts, totals=Counters(**totals),
                     channels=window.channels, items=items, limit=limit)
