"""GET /v1/broadcasts/{id}/stats: a broadcast's engagement per channel, per link and over time
(shared/tracking/stats.py says what each part reads and what it costs)."""
from __future__ import annotations

import uuid
from typing import Annotated, Literal

from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import FromPath, Parameter

from api_service.problems import problem
from shared.broadcasts.status import ACTIVE
from shared.tenants.store import Principal
from shared.tracking.stats import Stats, broadcast_stats

BucketFilter = Annotated[Literal["minute", "hour"] | None, Parameter(
    description="the timeline's buckets: a minute (the default while a run is sending) or an hour (after)")]


class StatsController(Controller):
    path = "/v1/broadcasts"
    tags = ["broadcasts"]

    @get("/{broadcast_id:uuid}/stats", summary="A broadcast's sends, opens, clicks and receipts per channel, "
                                               "per link and over time")
    async def stats(self, request: Request[Principal, object, object], state: State, broadcast_id: FromPath[uuid.UUID],
                    bucket: BucketFilter = None) -> Stats:
        tenant_id = request.user.tenant_id
        async with state.services.pool.acquire() as con:
            status = await con.fetchval("SELECT status FROM broadcasts WHERE id = $1 AND tenant_id = $2 AND NOT deleted",
                                        broadcast_id, tenant_id)
            if status is None:
                raise problem(404, "broadcast not found")
            chosen = bucket or ("minute" if status in ACTIVE else "hour")
            return await broadcast_stats(con, tenant_id, broadcast_id, chosen)
