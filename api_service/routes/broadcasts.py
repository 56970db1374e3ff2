"""/v1/broadcasts: create, edit, delete, read, and the event history of one broadcast."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody, Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from api_service.auth import require_write
from api_service.problems import problem
from api_service.ratelimit import STREAM_SLOT
from api_service.schemas.audience import email_problem
from api_service.schemas.broadcasts import (
    Broadcast,
    BroadcastCreate,
    BroadcastPatch,
    HistoryEvent,
    Message,
    Preview,
    PreviewMessage,
    ScheduleFields,
    ScheduleIn,
    SendAccepted,
    TestResult,
    TestSendIn,
    TestSent,
)
from api_service.schemas.common import Page
from shared.broadcasts import decider as b
from shared.broadcasts import handlers, previews, progress, view
from shared.broadcasts import messages as messages_view
from shared.broadcasts.counters import Counters, counters_of, shown
from shared.broadcasts.handlers import Actor
from shared.broadcasts.status import ACTIVE, ENDED
from shared.kernel.errors import Invalid
from shared.platform import eventstore
from shared.tenants.store import Principal

Limit = Annotated[int, Parameter(ge=1, le=500, description="page size")]
Offset = Annotated[int, Parameter(ge=0)]
StatusFilter = Annotated[b.Status | None, Parameter(description="only broadcasts in this status")]


def actor_of(request: Request[Principal, Any, Any]) -> Actor:
    principal = request.user
    return Actor(principal.tenant_id, f"token:{principal.token_id}", request.headers.get("x-request-id"))


def to_response(
    row: view.BroadcastRow, counters: Counters | None = None, audience: tuple[int, int] | None = None
) -> Broadcast:
    data = msgspec.to_builtins(row)
    data["counters"] = shown(counters, row.status)
    schedule = row.schedule or None
    recurrence = (schedule or {}).get("recurrence")
    data["recurring"] = bool(recurrence)
    data["next_run_at"] = row.scheduled_at if recurrence else None
    data["schedule"] = None if schedule is None else {
        "timezone": (recurrence or schedule)["timezone"], "cron": recurrence["cron"] if recurrence else None,
        "missed_policy": schedule["missed_policy"], "max_lateness_s": schedule["max_lateness_s"],
    }
    data["audience_total"], data["remaining"] = audience if audience else (None, None)
    return msgspec.convert(data, Broadcast, strict=False)


async def with_counters(pool: Any, rows: list[view.BroadcastRow], audiences: bool = False) -> list[Broadcast]:
    async with pool.acquire() as con:
        counters = await counters_of(con, [r.id for r in rows])
        sizes = {}
        if audiences:  # only for one broadcast at a time: it counts the list
            for r in rows:
                if r.status not in {s.value for s in b.ACTIVE}:
                    sizes[r.id] = await handlers.audience_of(con, r)
    return [to_response(r, counters.get(r.id), sizes.get(r.id)) for r in rows]


def schedule_command(data: ScheduleFields, at: datetime) -> b.ScheduleBroadcast:
    """The domain command from the API's schedule fields (naive times are local to `timezone`)."""
    from shared.broadcasts.schedule import zone

    try:
        tz = zone(data.timezone)
    except ValueError as exc:
        raise Invalid("timezone", str(exc)) from exc
    if data.recurring and not data.cron:
        raise Invalid("cron", "required for a recurring broadcast")
    if data.cron and not data.recurring:
        raise Invalid("recurring", "must be true when a cron is given")
    scheduled_at = data.scheduled_at
    if scheduled_at is not None and scheduled_at.tzinfo is None:
        scheduled_at = scheduled_at.replace(tzinfo=tz)
    recurrence = b.Recurrence(cron=data.cron, timezone=data.timezone) if data.recurring and data.cron else None
    schedule = b.Schedule(recurrence=recurrence, timezone=data.timezone, missed_policy=data.missed_policy,
                          max_lateness_s=data.max_lateness_s)
    return b.ScheduleBroadcast(scheduled_at=None if recurrence else scheduled_at, schedule=schedule, at=at)


def wants_schedule(data: ScheduleFields) -> bool:
    return data.scheduled_at is not None or data.recurring or data.cron is not None


class BroadcastController(Controller):
    path = "/v1/broadcasts"
    tags = ["broadcasts"]

    @post("/", guards=[require_write], summary="Create a broadcast (in draft)")
    async def create(self, request: Request, state: State, data: JSONBody[BroadcastCreate]) -> Broadcast:
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
        # With a schedule it is created straight into `scheduled`, in the same transaction.
        then = schedule_command(data, command.at) if wants_schedule(data) else None
        return to_response(await handlers.create(services.pool, actor_of(request), command, then))

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
    async def get_broadcast(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID]) -> Broadcast:
        async with state.services.pool.acquire() as con:
            row = await view.get(con, request.user.tenant_id, broadcast_id)
        if row is None:
            raise problem(404, "broadcast not found")
        return (await with_counters(state.services.pool, [row], audiences=True))[0]

    @patch("/{broadcast_id:uuid}", guards=[require_write], summary="Edit a broadcast (draft, scheduled, paused)")
    async def edit(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID], data: JSONBody[BroadcastPatch]) -> Broadcast:
        changes = msgspec.structs.asdict(data)
        if changes.get("content") is not msgspec.UNSET:
            changes["content"] = msgspec.convert(msgspec.to_builtins(data.content), b.ContentChanges)
        command = b.EditBroadcast(**changes, at=state.services.clock())
        row = await handlers.edit(state.services.pool, actor_of(request), broadcast_id, command)
        return (await with_counters(state.services.pool, [row]))[0]

    @delete("/{broadcast_id:uuid}", guards=[require_write], summary="Delete a broadcast")
    async def delete_broadcast(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID]) -> None:
        await handlers.delete(state.services.pool, actor_of(request), broadcast_id, state.services.clock())

    @get("/{broadcast_id:uuid}/events", summary="The history of a broadcast: every event, who, when")
    async def history(
        self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID], limit: Limit = 500, offset: Offset = 0
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
    async def send(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID]) -> SendAccepted:
        services = state.services
        row, queued = await handlers.send(services.pool, actor_of(request), broadcast_id, services.clock())
        return SendAccepted(status=row.status, queued=queued, run=row.run)

    @get("/{broadcast_id:uuid}/messages", summary="One record per recipient: address, status, attempts, error")
    async def messages(
        self,
        request: Request,
        state: State,
        broadcast_id: FromPath[uuid.UUID],
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

    @post("/{broadcast_id:uuid}/schedule", guards=[require_write], status_code=200,
          summary="Schedule or reschedule (one-off at a time, or recurring with a cron)")
    async def schedule(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID], data: JSONBody[ScheduleIn]) -> Broadcast:
        if not wants_schedule(data):
            raise Invalid("scheduled_at", "required unless the broadcast is recurring")
        command = schedule_command(data, state.services.clock())
        row = await handlers.schedule(state.services.pool, actor_of(request), broadcast_id, command)
        return (await with_counters(state.services.pool, [row]))[0]

    async def _transition(self, request: Request, state: State, broadcast_id: uuid.UUID, command: Any) -> Broadcast:
        row = await handlers.transition(state.services.pool, actor_of(request), broadcast_id, command)
        return (await with_counters(state.services.pool, [row]))[0]

    @post("/{broadcast_id:uuid}/pause", guards=[require_write], status_code=200,
          summary="Pause sending; unsent messages are kept")
    async def pause(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID]) -> Broadcast:
        return await self._transition(request, state, broadcast_id, b.PauseBroadcast(at=state.services.clock()))

    @post("/{broadcast_id:uuid}/resume", guards=[require_write], status_code=200,
          summary="Resume a paused broadcast exactly where it stopped")
    async def resume(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID]) -> Broadcast:
        return await self._transition(request, state, broadcast_id, b.ResumeBroadcast(at=state.services.clock()))

    @post("/{broadcast_id:uuid}/cancel", guards=[require_write], status_code=200,
          summary="Cancel for good: unsent messages are dropped, recipients reached stay reached")
    async def cancel(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID]) -> Broadcast:
        return await self._transition(request, state, broadcast_id, b.CancelBroadcast(at=state.services.clock()))

    @post("/{broadcast_id:uuid}/stop", guards=[require_write], status_code=200,
          summary="Stop and go back to draft: unsent messages are dropped")
    async def stop(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID]) -> Broadcast:
        return await self._transition(request, state, broadcast_id, b.StopBroadcast(at=state.services.clock()))

    @post("/{broadcast_id:uuid}/reset", guards=[require_write], status_code=200,
          summary="A finished broadcast back to draft, with the reached set cleared")
    async def reset(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID]) -> Broadcast:
        return await self._transition(request, state, broadcast_id, b.ResetBroadcast(at=state.services.clock()))

    @get("/{broadcast_id:uuid}/preview", summary="The resolved messages of the first recipients; nothing is sent")
    async def preview(
        self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID],
        limit: Annotated[int, Parameter(ge=1, le=10)] = 10,
    ) -> Preview:
        items = await previews.preview(state.services.pool, request.user.tenant_id, broadcast_id, limit)
        return Preview(items=[PreviewMessage(**msgspec.structs.asdict(i)) for i in items])

    @post("/{broadcast_id:uuid}/test", guards=[require_write], status_code=200,
          summary="Send the content now to a few addresses, as a test (not counted)")
    async def test_send(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID], data: JSONBody[TestSendIn]) -> TestSent:
        if not data.emails and not data.contact_ids:
            raise Invalid("emails", "give at least one address in emails or contact_ids")
        for i, email in enumerate(data.emails):
            if reason := email_problem(email):
                raise Invalid(f"emails[{i}]", reason)
        results = await previews.test_send(
            state.services.pool, actor_of(request), broadcast_id, data.emails, data.contact_ids,
            state.services.clock(), allow_private_networks=state.services.settings.allow_private_networks,
        )
        return TestSent(results=[TestResult(address=a, ok=ok, error=e) for a, ok, e in results])

    @get("/{broadcast_id:uuid}/progress", summary="Server-Sent Events: status and counters as they change",
         opt={STREAM_SLOT: True})  # holds one of the token's and tenant's stream slots while open
    async def progress_stream(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID]) -> ServerSentEvent:
        pool, tenant_id = state.services.pool, request.user.tenant_id
        async with pool.acquire() as con:
            if await progress.snapshot(con, tenant_id, broadcast_id) is None:
                raise problem(404, "broadcast not found")

        async def updates() -> AsyncIterator[ServerSentEventMessage]:
            # Ends once a run it saw under way ends, or at once on a broadcast already finished; on
            # a draft or scheduled one it waits for the run to start.
            last, saw_running = None, False
            while True:
                async with pool.acquire() as con:
                    snap = await progress.snapshot(con, tenant_id, broadcast_id)
                if snap is None:  # deleted meanwhile
                    return
                status = snap["status"]
                saw_running = saw_running or status in ACTIVE
                final = status in ENDED or (saw_running and status not in ACTIVE)
                if snap != last or final:
                    last = snap
                    yield ServerSentEventMessage(event="finished" if final else "progress",
                                                 data=msgspec.json.encode(snap).decode())
                if final:
                    return
                await asyncio.sleep(progress.INTERVAL_S)

        return ServerSentEvent(updates())
