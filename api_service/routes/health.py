"""Liveness and readiness probes for Kubernetes."""
from __future__ import annotations

import asyncio

from litestar import Response, get
from litestar.datastructures import State

from api_service.schemas.common import Health


@get("/healthz", summary="The process is up", tags=["health"])
async def healthz() -> Health:
    return Health("ok")


@get("/readyz", summary="Postgres and NATS are reachable", tags=["health"])
async def readyz(state: State) -> Response[Health]:
    services = state.services
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            async with services.pool.acquire() as con:
                await con.fetchval("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as exc:  # any failure means not ready, and says why
        checks["postgres"] = f"error: {exc!r}"
    try:
        async with asyncio.timeout(2):
            await services.nats.flush(timeout=2)
        checks["nats"] = "ok" if services.nats.is_connected else "error: disconnected"
    except Exception as exc:
        checks["nats"] = f"error: {exc!r}"
    ready = all(v == "ok" for v in checks.values())
    return Response(Health("ok" if ready else "unavailable", checks), status_code=200 if ready else 503)
