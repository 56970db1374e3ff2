"""Request rate limits and progress stream slots per token and per tenant (a Postgres adapter).

The state lives in Postgres so that every API replica counts together, and each check is one
statement, so one round trip:

- Requests: GCRA (the generic cell rate algorithm). Per key (`token:<id>`, `tenant:<id>`) one row
  holds the "theoretical arrival time" (TAT) of the next request. A request at `now` with emission
  interval `T = 1/rate` and burst `B` conforms when `max(TAT, now) + T <= now + B*T`; it then moves
  the TAT to `max(TAT, now) + T`. A non-conforming request changes nothing. The token's row is
  updated first and the tenant's only if the token's request conformed (so a token over its own
  rate does not spend its tenant's budget; a request its tenant refuses still counts for the
  token), both in one `INSERT … ON CONFLICT DO UPDATE … WHERE` chain, whose row locks make
  concurrent requests from any replica take their turn. Time is the database's `now()`: one clock
  for all replicas.
- Failed authentications: the same, per client address (`addr:<address>`), counted only on a
  failure.
- Progress streams: one lease row per open stream, refreshed while it is open; a lease that was
  not refreshed (its replica died) stops counting when it expires.

Limits come from Settings unless the tenant overrides them (`tenants.limits`, `crier tenant limits`).
"""
from __future__ import annotations

import math
import uuid
from typing import Any

import asyncpg
import msgspec

from shared.platform.settings import Settings

# The tenant-overridable limits: the keys of `tenants.limits`.
OVERRIDABLE = (
    "requests_per_s", "burst", "tenant_requests_per_s", "tenant_burst",
    "progress_streams_per_token", "progress_streams_per_tenant",
)
STREAM_LEASE_TTL_S = 30.0  # a dead replica's streams stop counting this long after its last refresh
STREAM_REFRESH_S = 10.0  # an open stream refreshes its lease this often (well within the TTL)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    requests_per_s: float
    burst: int
    tenant_requests_per_s: float
    tenant_burst: int
    progress_streams_per_token: int
    progress_streams_per_tenant: int
    auth_failures_per_minute: int = 10  # per client address; not per tenant (no tenant is known yet)


def defaults(settings: Settings) -> Limits:
    """The limits of a tenant without overrides; a zero or negative rate or burst is refused here,
    at start-up, rather than as a division by zero on every request."""
    validate_overrides({
        "requests_per_s": settings.rate_limit_per_s, "burst": settings.rate_limit_burst,
        "tenant_requests_per_s": settings.tenant_rate_limit_per_s, "tenant_burst": settings.tenant_rate_limit_burst,
        "progress_streams_per_token": settings.progress_streams_per_token,
        "progress_streams_per_tenant": settings.progress_streams_per_tenant,
    })
    if settings.auth_failures_per_minute < 1:
        raise ValueError(f"auth_failures_per_minute must be >= 1, not {settings.auth_failures_per_minute}")
    return Limits(
        requests_per_s=settings.rate_limit_per_s,
        burst=settings.rate_limit_burst,
        tenant_requests_per_s=settings.tenant_rate_limit_per_s,
        tenant_burst=settings.tenant_rate_limit_burst,
        progress_streams_per_token=settings.progress_streams_per_token,
        progress_streams_per_tenant=settings.progress_streams_per_tenant,
        auth_failures_per_minute=settings.auth_failures_per_minute,
    )


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """One policy's state after a request, in the terms of the RateLimit header fields."""

    policy: str  # "token" or "tenant"
    quota: int  # the burst: requests that may come at once
    window_s: int  # seconds in which a spent burst comes back (burst / rate, rounded up)
    remaining: int  # requests that may come right now
    reset_s: int  # seconds until the whole burst is back (0: it is)
    retry_after_s: int | None  # None when this policy let the request through
    wait_s: float = 0.0  # when it did not: exactly how long until it would


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    allowed: bool
    budgets: list[Budget]

    @property
    def retry_after_s(self) -> int:
        return max((b.retry_after_s or 0) for b in self.budgets)

    @property
    def wait_s(self) -> float:
        return max(b.wait_s for b in self.budgets)


# $1 token key, $2 tenant id, $3 tenant key, $4..$7 the default token rate and burst, tenant rate
# and burst. `lim` is materialized once (it is referenced several times).
_TAKE_REQUEST = """
WITH lim AS MATERIALIZED (
    SELECT coalesce((t.limits->>'requests_per_s')::float8, $4) AS rate1,
           coalesce((t.limits->>'burst')::float8, $5) AS burst1,
           coalesce((t.limits->>'tenant_requests_per_s')::float8, $6) AS rate2,
           coalesce((t.limits->>'tenant_burst')::float8, $7) AS burst2,
           extract(epoch FROM now())::float8 AS now
    FROM (VALUES (1)) AS one (x) LEFT JOIN tenants t ON t.id = $2
), tok AS (
    INSERT INTO rate_limits AS r (key, tat)
    SELECT $1, lim.now + 1 / lim.rate1 FROM lim
    ON CONFLICT (key) DO UPDATE SET tat = greatest(r.tat + (SELECT 1 / rate1 FROM lim), EXCLUDED.tat)
        WHERE greatest(r.tat + (SELECT 1 / rate1 FROM lim), EXCLUDED.tat)
              <= (SELECT now + burst1 / rate1 FROM lim)
    RETURNING r.tat
), ten AS (
    INSERT INTO rate_limits AS r (key, tat)
    SELECT $3, lim.now + 1 / lim.rate2 FROM lim WHERE EXISTS (SELECT FROM tok)
    ON CONFLICT (key) DO UPDATE SET tat = greatest(r.tat + (SELECT 1 / rate2 FROM lim), EXCLUDED.tat)
        WHERE greatest(r.tat + (SELECT 1 / rate2 FROM lim), EXCLUDED.tat)
              <= (SELECT now + burst2 / rate2 FROM lim)
    RETURNING r.tat
)
SELECT lim.*,
       (SELECT tat FROM tok) AS token_tat, (SELECT tat FROM ten) AS tenant_tat,
       -- the rows as this statement's snapshot saw them: for Retry-After when a policy said no
       (SELECT tat FROM rate_limits WHERE key = $1) AS token_before,
       (SELECT tat FROM rate_limits WHERE key = $3) AS tenant_before
FROM lim
"""

# $1 key, $2 emission interval T, $3 burst.
_TAKE_ONE = """
INSERT INTO rate_limits AS r (key, tat) VALUES ($1, extract(epoch FROM now()) + $2)
ON CONFLICT (key) DO UPDATE SET tat = greatest(r.tat + $2, EXCLUDED.tat)
    WHERE greatest(r.tat + $2, EXCLUDED.tat) <= EXCLUDED.tat + ($3 - 1) * $2
RETURNING r.tat
"""


def _budget(policy: str, rate: float, burst: float, now: float, tat: float | None, before: float | None) -> Budget:
    """`tat` is the new TAT when the request conformed, else None and `before` is the TAT it met."""
    interval = 1.0 / rate
    window = max(1, math.ceil(burst / rate))
    wait = 0.0
    if tat is not None:
        start, retry = tat, None
    else:
        start = max(before if before is not None else now, now)
        # the next request conforms once max(TAT, t) + T <= t + B*T
        wait = max(0.0, start + interval - now - burst * interval)
        retry = max(1, math.ceil(wait - 1e-9))
    remaining = max(0, math.floor((now + burst * interval - start) / interval + 1e-9))
    reset = max(0, math.ceil(start - now - 1e-9))
    if retry is not None:
        remaining, reset = 0, max(reset, retry)
    return Budget(policy=policy, quota=int(burst), window_s=window, remaining=remaining, reset_s=reset,
                  retry_after_s=retry, wait_s=wait)


async def take_request(con: asyncpg.Connection, tenant_id: uuid.UUID, token_id: uuid.UUID, limits: Limits) -> Decision:
    """Count one request against its token and its tenant; one statement."""
    row = await con.fetchrow(
        _TAKE_REQUEST, f"token:{token_id}", tenant_id, f"tenant:{tenant_id}",
        limits.requests_per_s, float(limits.burst), limits.tenant_requests_per_s, float(limits.tenant_burst),
    )
    now = row["now"]
    token = _budget("token", row["rate1"], row["burst1"], now, row["token_tat"], row["token_before"])
    if row["token_tat"] is None:  # the tenant was not asked: report where it stands
        tenant = _budget("tenant", row["rate2"], row["burst2"], now, max(row["tenant_before"] or now, now), None)
    else:
        tenant = _budget("tenant", row["rate2"], row["burst2"], now, row["tenant_tat"], row["tenant_before"])
    return Decision(allowed=row["tenant_tat"] is not None, budgets=[token, tenant])


async def record_auth_failure(con: asyncpg.Connection, address: str, per_minute: int) -> int | None:
    """Count a failed authentication from `address`; None while under the limit, else the seconds
    until the next attempt may come. Now and then forgets addresses idle for a while."""
    interval = 60.0 / per_minute
    key = f"addr:{address}"
    if await con.fetchval(_TAKE_ONE, key, interval, float(per_minute)) is not None:
        return None
    row = await con.fetchrow("SELECT tat, extract(epoch FROM now())::float8 AS now FROM rate_limits WHERE key = $1", key)
    if row is None:
        return 1
    return max(1, math.ceil(row["tat"] + interval - row["now"] - per_minute * interval - 1e-9))


async def forget_idle(con: asyncpg.Connection) -> int:
    """Delete rows whose budget is whole again: a missing row means exactly that."""
    status = await con.execute("DELETE FROM rate_limits WHERE tat < extract(epoch FROM now()) - 1")
    return int(status.split()[-1])


class StreamGrant(msgspec.Struct, frozen=True, kw_only=True):
    granted: bool
    policy: str  # which limit: "token" or "tenant" (the one that refused, or the tighter one)
    limit: int
    open: int  # streams open under that policy before this one


async def open_stream(
    con: asyncpg.Connection, lease_id: uuid.UUID, tenant_id: uuid.UUID, token_id: uuid.UUID, limits: Limits,
    ttl_s: float = STREAM_LEASE_TTL_S,
) -> StreamGrant:
    """Take a stream slot for the token and its tenant, if both have one free.

    The tenant's row is locked first, so two replicas opening streams for one tenant take turns
    (each statement then sees the other's committed lease); expired leases are deleted on the way."""
    async with con.transaction():
        overrides = await con.fetchval("SELECT limits FROM tenants WHERE id = $1 FOR NO KEY UPDATE", tenant_id)
        effective = apply_overrides(limits, overrides or {})
        per_tenant, per_token = effective.progress_streams_per_tenant, effective.progress_streams_per_token
        row = await con.fetchrow(
            """WITH expired AS (DELETE FROM stream_leases WHERE tenant_id = $1 AND expires_at <= now()),
                    live AS (SELECT token_id FROM stream_leases WHERE tenant_id = $1 AND expires_at > now()),
                    counts AS (SELECT count(*) AS tenant_open, count(*) FILTER (WHERE token_id = $2) AS token_open
                               FROM live),
                    granted AS (
                        INSERT INTO stream_leases (id, tenant_id, token_id, expires_at)
                        SELECT $3, $1, $2, now() + make_interval(secs => $6) FROM counts
                        WHERE tenant_open < $4 AND token_open < $5
                        RETURNING id)
               SELECT tenant_open, token_open, EXISTS (SELECT FROM granted) AS granted FROM counts""",
            tenant_id, token_id, lease_id, per_tenant, per_token, ttl_s,
        )
    token_free, tenant_free = per_token - row["token_open"], per_tenant - row["tenant_open"]
    if token_free <= 0 or (tenant_free > 0 and token_free <= tenant_free):  # the one that refused, or the tighter
        return StreamGrant(granted=row["granted"], policy="token", limit=per_token, open=row["token_open"])
    return StreamGrant(granted=row["granted"], policy="tenant", limit=per_tenant, open=row["tenant_open"])


async def refresh_stream(con: asyncpg.Connection, lease_id: uuid.UUID, ttl_s: float = STREAM_LEASE_TTL_S) -> None:
    await con.execute("UPDATE stream_leases SET expires_at = now() + make_interval(secs => $2) WHERE id = $1",
                      lease_id, ttl_s)


async def close_stream(con: asyncpg.Connection, lease_id: uuid.UUID) -> None:
    await con.execute("DELETE FROM stream_leases WHERE id = $1", lease_id)


def apply_overrides(limits: Limits, overrides: dict[str, Any]) -> Limits:
    return msgspec.structs.replace(limits, **{k: v for k, v in overrides.items() if k in OVERRIDABLE})


def validate_overrides(changes: dict[str, Any]) -> dict[str, float | int]:
    """Overrides as stored: known keys only, rates positive numbers, bursts and stream counts whole."""
    clean: dict[str, float | int] = {}
    for name, value in changes.items():
        if name not in OVERRIDABLE:
            raise ValueError(f"unknown limit {name!r}; known: {', '.join(OVERRIDABLE)}")
        if name.endswith("_per_s"):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a positive number, not {value!r}")
            clean[name] = float(value)
        else:
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if "streams" in name else 1):
                raise ValueError(f"{name} must be a whole number >= {0 if 'streams' in name else 1}, not {value!r}")
            clean[name] = value
    return clean


async def get_overrides(con: asyncpg.Connection, tenant_id: uuid.UUID) -> dict[str, Any] | None:
    """The tenant's own limits ({} for none), or None when there is no such tenant."""
    return await con.fetchval("SELECT limits FROM tenants WHERE id = $1", tenant_id)


async def set_overrides(
    con: asyncpg.Connection, tenant_id: uuid.UUID, changes: dict[str, Any], *, clear: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Merge `changes` into the tenant's overrides and drop the `clear`ed ones; returns the result."""
    clean = validate_overrides(changes)
    for name in clear:
        if name not in OVERRIDABLE:
            raise ValueError(f"unknown limit {name!r}; known: {', '.join(OVERRIDABLE)}")
    result = await con.fetchval(
        "UPDATE tenants SET limits = (limits - $3::text[]) || $2::jsonb WHERE id = $1 RETURNING limits",
        tenant_id, clean, list(clear),
    )
    if result is None:
        raise LookupError(f"no tenant {tenant_id}")
    return result
