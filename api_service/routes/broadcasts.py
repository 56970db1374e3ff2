"""/v1/broadcasts: create, edit, delete, read, and the event history of one broadcast."""
from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.datastructures import State
from litestar.params import Parameter

from api_service.auth import require_write
from api_service.problems import problem
from api_service.schemas import Broadcast, BroadcastCreate, BroadcastPatch, HistoryEvent, Message, Page, SendAccepted
from shared import eventstore
from shared.domain import broadcast as b
from shared.handlers import broadcasts as handlers
from shared.handlers.broadcasts import Actor
from shared.tenants import Principal
from shared.views import broadcasts as view
from shared.views import messages as messages_view
from shared.views.counters import Counters, counters_of

Limit = Annotated[int, Parameter(ge=1, le=500, description="page size")]
Offset = Annotated[int, Parameter(ge=0)]
StatusFilter = Annotated[b.Status | None, Parameter(description="only broadcasts in this status")]


def actor_of(request: Request[Principal, Any, Any]) -> Actor:
    principal = request.user
    return Actor(principal.tenant_id, f"token:{principal.token_id}", request.headers.get("x-request-id"))


def to_response(row: view.BroadcastRow, counters: Counters | None = None) -> Broadcast:
    data = msgspec.to_builtins(row)
    data["counters"] = msgspec.to_builtins(counters or Counters())
    return msgspec.convert(data, Broadcast, strict=False)


async def with_counters(pool: Any, rows: list[view.BroadcastRow]) -> list[Broadcast]:
    async with pool.acquire() as con:
        counters = await counters_of(con, [r.id for r in rows])
    return [to_response(r, counters.get(r.id)) for r in rows]


class BroadcastController(Controller):
    path = "/v1/broadcasts"
    tags = ["broadcasts"]

    @post("/", guards=[require_write], summary="Create a broadcast (in draft)")
    async def create(self, request: Request, state: State, data: BroadcastCreate) -> Broadcast:
        services = state.services
        command = b.CreateBroadcast(
            broadcast_id=uuid.uuid4(),
            tenant_id=request.user.tenant_id,
            name=data.name,
            list_id=data.list_id,
            provider_id=data.provider_id,
            content=msgspec.convert(msgspec.to_builtins(data.content), b.Content),
            at=services.clock(),
        )
        return to_response(await handlers.create(services.pool, actor_of(request), command))

    @get("/", summary="List broadcasts")
    async def list_broadcasts(
        self, request: Request, state: State, status: StatusFilter = None, limit: Limit = 50, offset: Offset = 0
    ) -> Page[Broadcast]:
        async with state.services.pool.acquire() as con:
            rows, total = await view.page(
                con, request.user.tenant_id, status.value if status else None, limit, offset
            )
        items = await with_counters(state.services.pool, rows)
        return Page(items=items, total=total, limit=limit, offset=offset)

    @get("/{broadcast_id:uuid}", summary="Get a broadcast")
    async def get_broadcast(self, request: Request, state: State, broadcast_id: uuid.UUID) -> Broadcast:
        async with state.services.pool.acquire() as con:
            row = await view.get(con, request.user.tenant_id, broadcast_id)
        if row is None:
            raise problem(404, "broadcast not found")
        return (await with_counters(state.services.pool, [row]))[0]

    @patch("/{broadcast_id:uuid}", guards=[require_write], summary="Edit a broadcast (draft, scheduled, paused)")
    async def edit(self, request: Request, state: State, broadcast_id: uuid.UUID, data: BroadcastPatch) -> Broadcast:
        changes = msgspec.structs.asdict(data)
        if changes.get("content") is not msgspec.UNSET:
            changes["content"] = msgspec.convert(msgspec.to_builtins(data.content), b.ContentChanges)
        command = b.EditBroadcast(**changes, at=state.services.clock())
        row = await handlers.edit(state.services.pool, actor_of(request), broadcast_id, command)
        return (await with_counters(state.services.pool, [row]))[0]

    @delete("/{broadcast_id:uuid}", guards=[require_write], summary="Delete a broadcast")
    async def delete_broadcast(self, request: Request, state: State, broadcast_id: uuid.UUID) -> None:
        await handlers.delete(state.services.pool, actor_of(request), broadcast_id, state.services.clock())

    @get("/{broadcast_id:uuid}/events", summary="The history of a broadcast: every event, who, when")
    async def history(
        self, request: Request, state: State, broadcast_id: uuid.UUID, limit: Limit = 500, offset: Offset = 0
    ) -> Page[HistoryEvent]:
        async with state.services.pool.acquire() as con:
            if await view.get(con, request.user.tenant_id, broadcast_id) is None:
                raise problem(404, "broadcast not found")
            events = await eventstore.read_stream(con, b.stream_name(broadcast_id))
        items = [
            HistoryEvent(
                position=e.position,
                id=e.id,
                type=e.type,
                data=e.data,
                actor=e.metadata.get("actor"),
                correlation_id=e.metadata.get("correlation_id"),
                created_at=e.created_at,
            )
            for e in events[offset : offset + limit]
        ]
        return Page(items=items, total=len(events), limit=limit, offset=offset)

    @post("/{broadcast_id:uuid}/send", guards=[require_write], status_code=202, summary="Send the broadcast now")
    async def send(self, request: Request, state: State, broadcast_id: uuid.UUID) -> SendAccepted:
        services = state.services
        row, queued = await handlers.send(services.pool, actor_of(request), broadcast_id, services.clock())
        return SendAccepted(status=row.status, queued=queued, run=row.run)

    @get("/{broadcast_id:uuid}/messages", summary="One record per recipient: address, status, attempts, error")
    async def messages(
        self,
        request: Request,
        state: State,
        broadcast_id: uuid.UUID,
        status: Annotated[str | None, Parameter(description="queued, sending, sent or failed")] = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> Page[Message]:
        async with state.services.pool.acquire() as con:
            if await view.get(con, request.user.tenant_id, broadcast_id) is None:
                raise problem(404, "broadcast not found")
            records, total = await messages_view.page(con, broadcast_id, status, limit, offset)
        items = [msgspec.convert(msgspec.to_builtins(r), Message) for r in records]
        return Page(items=items, total=total, limit=limit, offset=offset)
