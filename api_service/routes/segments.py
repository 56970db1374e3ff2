"""/v1/segments: dynamic audiences, a rule over the tenant's contacts; create, read, change, delete,
and preview who a segment selects now."""
from __future__ import annotations

import uuid
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.datastructures import State
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from api_service.auth import require_write
from api_service.idempotency import MAX_KEY_LENGTH
from api_service.openapi import problem_response
from api_service.problems import problem
from api_service.schemas.audience import Contact
from api_service.schemas.common import Page
from api_service.schemas.segments import (
    Segment,
    SegmentCreate,
    SegmentPatch,
    SegmentPreview,
)
from shared.audience import segment_store
from shared.audience.segment_store import PREVIEW_TIMEOUT_MS, SegmentRow
from shared.broadcasts import view as broadcasts_view
from shared.kernel.limits import MAX_OFFSET

Limit = Annotated[int, QueryParameter(ge=1, le=500, description="page size")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="items to skip")]  # a bigint in SQL
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(name="Idempotency-Key", max_length=MAX_KEY_LENGTH, description="a retried POST with the same key returns the first one's segment"),
]
NOT_FOUND = "segment not found"
PREVIEW_MEMBERS = 10


def _segment(row: SegmentRow) -> Segment:
    return Segment(**msgspec.structs.asdict(row))


class SegmentController(Controller):
    path = "/v1/segments"
    tags = ["segments"]

    @post("/", guards=[require_write], summary="Create a segment: a rule over your contacts, evaluated when a run starts")
    async def create(
        self, request: Request, state: State, data: JSONBody[SegmentCreate], idempotency_key: IdempotencyKey = None
    ) -> Segment:
        async with state.services.pool.acquire() as con:
            row, _ = await segment_store.create_segment(
                con, request.user.tenant_id, data.name, data.rules, idempotency_key=idempotency_key
            )
        return _segment(row)

    @get("/", summary="List the segments, newest first")
    async def list_segments(self, request: Request, state: State, limit: Limit = 50, offset: Offset = 0) -> Page[Segment]:
        async with state.services.pool.acquire() as con:
            rows, total = await segment_store.page_segments(con, request.user.tenant_id, limit, offset)
        return Page(items=[_segment(r) for r in rows], total=total, limit=limit, offset=offset)

    @get("/{segment_id:uuid}", summary="Get a segment")
    async def get_segment(self, request: Request, state: State, segment_id: FromPath[uuid.UUID]) -> Segment:
        async with state.services.pool.acquire() as con:
            row = await segment_store.get_segment(con, request.user.tenant_id, segment_id)
        if row is None:
            raise problem(404, NOT_FOUND)
        return _segment(row)

    @patch("/{segment_id:uuid}", guards=[require_write], summary="Change a segment's name and/or rules")
    async def edit(
        self, request: Request, state: State, segment_id: FromPath[uuid.UUID], data: JSONBody[SegmentPatch]
    ) -> Segment:
        async with state.services.pool.acquire() as con:
            row = await segment_store.update_segment(
                con, request.user.tenant_id, segment_id, name=data.name, rules=data.rules
            )
        if row is None:
            raise problem(404, NOT_FOUND)
        return _segment(row)

    @delete(
        "/{segment_id:uuid}", guards=[require_write],
        summary="Delete a segment; 409 while another segment uses it or a broadcast is snapshotting it",
        responses={409: problem_response("another segment uses this one (`segments`): change it first; or a queued "
                                         "broadcast is snapshotting it (`broadcasts`): retry later")},
    )
    async def delete_segment(self, request: Request, state: State, segment_id: FromPath[uuid.UUID]) -> None:
        tenant_id = request.user.tenant_id
        async with state.services.pool.acquire() as con, con.transaction():
            # A broadcast that still only names it fails its next run with the reason, as with a list.
            if busy := await broadcasts_view.snapshotting_segment(con, tenant_id, segment_id):
                raise problem(
                    409, f"segment is being snapshotted by {len(busy)} queued broadcast(s); retry when they are sending",
                    "segment_in_use", broadcasts=[str(b) for b in busy],
                )
            if not await segment_store.delete_segment(con, tenant_id, segment_id):
                raise problem(404, NOT_FOUND)

    @get("/{segment_id:uuid}/preview", summary=f"How many contacts the segment selects now, and the first {PREVIEW_MEMBERS}")
    async def preview(self, request: Request, state: State, segment_id: FromPath[uuid.UUID]) -> SegmentPreview:
        async with state.services.pool.acquire() as con:
            try:
                found = await segment_store.count_and_preview(
                    con, request.user.tenant_id, segment_id, state.services.clock(), PREVIEW_MEMBERS
                )
            except asyncpg.QueryCanceledError:
                slow = problem(503, f"the segment could not be counted within {PREVIEW_TIMEOUT_MS // 1000} s",
                               retry_after=60)
                slow.headers = {"Retry-After": "60"}
                raise slow from None
        if found is None:
            raise problem(404, NOT_FOUND)
        count, rows = found
        return SegmentPreview(count=count, members=[msgspec.convert(msgspec.structs.asdict(r), Contact) for r in rows])
