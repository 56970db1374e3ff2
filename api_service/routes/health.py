"""Liveness and readiness probes for Kubernetes."""
from __future__ import annotations

import asyncio

from litestar import Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec

from api_service.schemas.common import Health, ReaderLag, Readiness
from shared.background import async_projections
from shared.platform import eventstore, relay


@get("/healthz", summary="The process is up", tags=["health"])
async def healthz() -> Health:
    return Health("ok")


@get("/readyz", summary="Postgres and NATS are reachable, and the relay and projector keep up", tags=["health"],
     responses={503: ResponseSpec(Readiness, description="not ready: `checks` says which check failed and why")})
async def readyz(state: State) -> Response[Readiness]:
    """503 when Postgres or NATS cannot be reached, or when the relay or the projector is behind by
    more than `ready_max_lag_s` (the age of the oldest committed event it has not taken yet): a relay
    stuck on one event held up every tenant's sends while this still answered ok."""
    services = state.services
    checks: dict[str, str] = {}
    ready = Readiness(status="ok", checks=checks)
    try:
        async with asyncio.timeout(2):
            async with services.pool.acquire() as con:
                await con.fetchval("SELECT 1")
                checks["postgres"] = "ok"
                ready.relay = _lag(await eventstore.lag(con, relay.CHECKPOINT))
                projectors = [await eventstore.lag(con, p.name, p.categories) for p, _ in async_projections()]
                ready.projector = _lag(max(projectors, key=lambda lag: lag.oldest_age_s))
                ready.parked_events = await relay.parked_count(con)
    except Exception as exc:  # any failure means not ready, and says why
        checks.setdefault("postgres", f"error: {exc!r}")
        if checks["postgres"] == "ok":
            checks["lag"] = f"error: {exc!r}"
    limit = services.settings.ready_max_lag_s
    for name, lag in (("relay", ready.relay), ("projector", ready.projector)):
        if lag is not None:
            late = lag.oldest_age_s > limit
            checks[name] = f"behind by {lag.oldest_age_s:.1f}s (over {limit:g}s)" if late else "ok"
    try:
        async with asyncio.timeout(2):
            await services.nats.flush(timeout=2)
        checks["nats"] = "ok" if services.nats.is_connected else "error: disconnected"
    except Exception as exc:
        checks["nats"] = f"error: {exc!r}"
    ok = all(v == "ok" for v in checks.values())
    ready.status = "ok" if ok else "unavailable"
    return Response(ready, status_code=200 if ok else 503)


def _lag(lag: eventstore.Lag) -> ReaderLag:
    return ReaderLag(behind=lag.behind, behind_capped=lag.behind_capped, oldest_age_s=round(lag.oldest_age_s, 3))
