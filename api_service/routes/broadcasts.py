"""/v1/broadcasts: create, edit, delete, read, and the event history of one broadcast."""
from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.datastructures import State
from litestar.openapi.spec import Operation, RequestBody
from litestar.params import FromPath, JSONBody, Parameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from api_service.auth import require_write
from api_service.openapi import problem_response
from api_service.problems import problem
from api_service.ratelimit import STREAM_SLOT
from api_service.schemas.broadcasts import (
    AudienceCount,
    AudienceIn,
    Broadcast,
    BroadcastCreate,
    BroadcastPatch,
    HistoryEvent,
    InlineAddress,
    Message,
    Preview,
    PreviewMessage,
    RetryAccepted,
    RetryIn,
    ScheduleFields,
    ScheduleIn,
    SendAccepted,
    TestResult,
    TestSendIn,
    TestSent,
)
from api_service.schemas.common import NO_NUL, Page
from shared.audience.fields import e164, email_problem, normal_email
from shared.audience.recipients import Kind
from shared.broadcasts import decider as b
from shared.broadcasts import handlers, previews, progress, view
from shared.broadcasts import messages as messages_view
from shared.broadcasts.counters import Counters, counters_of, shown
from shared.broadcasts.handlers import Actor
from shared.kernel.audience import Audience
from shared.kernel.errors import Invalid
from shared.kernel.limits import MAX_NAME_CHARS, MAX_OFFSET, PATTERN_REASONS
from shared.platform import eventstore
from shared.tenants.store import Principal

Limit = Annotated[int, Parameter(ge=1, le=500, description="page size")]
Offset = Annotated[int, Parameter(ge=0, le=MAX_OFFSET, description="items to skip")]  # a bigint in SQL
WRONG_STATUS = problem_response("the broadcast's status does not allow it (`current_status` says which it is)")
StatusFilter = Annotated[b.Status | None, Parameter(description="only broadcasts in this status")]
# Its limits are checked by the handler, so that a 422 names `filter[search]` (Litestar's would name
# the Python parameter), and shown in the OpenAPI document as they are checked.
BroadcastSearch = Annotated[str | None, QueryParameter(
    name="filter[search]", schema_extra={"maxLength": MAX_NAME_CHARS, "pattern": NO_NUL},
    description="only broadcasts whose name contains this, in any case")]
BroadcastSort = Annotated[Literal["created_at", "-created_at", "name", "-name", "status", "-status"], QueryParameter(
    description="the order: a field, descending with a leading `-` (ties by id)")]


def search_of(search: str | None) -> str | None:
    """The name search, checked (an empty one is no search)."""
    if search and len(search) > MAX_NAME_CHARS:
        raise Invalid("filter[search]", f"at most {MAX_NAME_CHARS} characters")
    if search and "\x00" in search:
        raise Invalid("filter[search]", PATTERN_REASONS[NO_NUL])
    return search or None
MessageStatus = Literal["queued", "sending", "sent", "failed", "unknown", "suppressed", "dropped", "skipped",
                        "delivered", "read", "bounced", "complained"]
MessageStatusFilter = Annotated[MessageStatus | None, QueryParameter(
    description="only records in this status: queued, sending, sent, failed, unknown (handed to the provider, "
                "no answer), suppressed (after the snapshot, before its batch was sent), dropped, skipped "
                "(a multi-channel broadcast's channel the recipient has no address on: error `no_address`), or "
                "what a provider's receipt said since: delivered, read, bounced, complained")]


@dataclass
class OptionalBodyOperation(Operation):
    """The OpenAPI operation of a route whose body may be left out (Litestar marks every body required)."""

    def __post_init__(self) -> None:
        if isinstance(self.request_body, RequestBody):
            self.request_body.required = False


def actor_of(request: Request[Principal, Any, Any]) -> Actor:
    principal = request.user
    return Actor(principal.tenant_id, f"token:{principal.token_id}", request.headers.get("x-request-id"))


def to_response(
    row: view.BroadcastRow, counters: Counters | None = None, audience: tuple[int, int] | None = None
) -> Broadcast:
    data = msgspec.to_builtins(row)
    target = row.target
    data["audience"] = msgspec.to_builtins(target) if target is not None else {}
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
    data["channels"], data["channel_policy"] = list(row.channels), row.channel_policy
    data["providers"] = {c: p for c in row.channels if (p := row.provider_of(c)) is not None}
    tracks = row.tracks
    data["track_opens"], data["track_clicks"], data["track_text_links"] = tracks.opens, tracks.clicks, tracks.text_links
    return msgspec.convert(data, Broadcast, strict=False)


async def with_counters(
    pool: Any, rows: list[view.BroadcastRow], audiences: bool = False, clock: Any = None
) -> list[Broadcast]:
    async with pool.acquire() as con:
        counters = await counters_of(con, [r.id for r in rows])
        sizes = {}
        if audiences:  # only for one broadcast at a time: it counts the list
            for r in rows:
                if r.status not in {s.value for s in b.ACTIVE}:
                    sizes[r.id] = await handlers.audience_of(con, r, clock())
    return [to_response(r, counters.get(r.id), sizes.get(r.id)) for r in rows]


def schedule_command(data: ScheduleFields, at: datetime, min_interval_s: int) -> b.ScheduleBroadcast:
    """The domain command from the API's schedule fields (naive times are local to `timezone`); a
    cron may fire at most once per `min_interval_s` (the deployment's CRIER_MIN_CRON_INTERVAL_S)."""
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
    return b.ScheduleBroadcast(scheduled_at=None if recurrence else scheduled_at, schedule=schedule, at=at,
                               min_interval_s=min_interval_s)


def audience_command(data: AudienceIn) -> tuple[Audience, list[tuple[Kind, int | str]]]:
    """The audience for a command, and its ad-hoc recipients to resolve (addresses checked and in
    normal form here: a bad one is a 422 naming `audience.recipients[i].email`)."""
    refs: list[tuple[Kind, int | str]] = []
    for i, item in enumerate(data.recipients):
        if isinstance(item, int):
            refs.append(("contact_id", item))
        elif isinstance(item, str):
            refs.append(("external_id", item))
        elif (item.email is None) == (item.phone is None):
            raise Invalid(f"audience.recipients[{i}]", "give exactly one of email and phone")
        elif item.email is not None:
            if reason := email_problem(item.email):
                raise Invalid(f"audience.recipients[{i}].email", reason)
            refs.append(("email", normal_email(item.email)))
        else:
            assert isinstance(item, InlineAddress) and item.phone is not None
            number, reason = e164(item.phone)
            if number is None:
                raise Invalid(f"audience.recipients[{i}].phone", reason or "not a phone number")
            refs.append(("phone", number))
    audience = Audience(lists=tuple(dict.fromkeys(data.lists)), segments=tuple(dict.fromkeys(data.segments)),
                        exclude_lists=tuple(dict.fromkeys(data.exclude_lists)),
                        exclude_segments=tuple(dict.fromkeys(data.exclude_segments)))
    return audience, refs


def routing_command(
    channels: tuple[str, ...], policy: str, providers: dict[str, uuid.UUID], provider_id: uuid.UUID | None
) -> tuple[uuid.UUID | None, b.Routing | None]:
    """The first channel's provider and the routing of the others (None for one channel)."""
    if len(set(channels)) != len(channels):
        raise Invalid("channels", "each channel at most once")
    others = dict(providers)
    first = others.pop(channels[0], None)
    if first is not None and provider_id is not None and first != provider_id:
        raise Invalid(f"providers.{channels[0]}", "differs from provider_id: give one of them")
    for channel in others:
        if channel not in channels:
            raise Invalid(f"providers.{channel}", f"{channel} is not one of the broadcast's channels")
    routing = b.Routing(channels=channels, channel_policy=policy, providers=others) if len(channels) > 1 else None
    return provider_id or first, routing


def wants_schedule(data: ScheduleFields) -> bool:
    return data.scheduled_at is not None or data.recurring or data.cron is not None


class BroadcastController(Controller):
    path = "/v1/broadcasts"
    tags = ["broadcasts"]

    @post("/", guards=[require_write], summary="Create a broadcast (in draft)")
    async def create(self, request: Request, state: State, data: JSONBody[BroadcastCreate]) -> Broadcast:
        services = state.services
        if data.audience is not None and data.list_id is not None:
            raise Invalid("list_id", "give either list_id or audience, not both")
        audience, refs = audience_command(data.audience) if data.audience is not None else (None, [])
        if (data.template_id is None) == (data.content is None):
            raise Invalid("content", "give either content or template_id")
        channels = tuple(data.channels or ("email",))
        provider_id, routing = routing_command(channels, data.channel_policy, data.providers, data.provider_id)
        command = b.CreateBroadcast(
            broadcast_id=uuid.uuid4(),
            tenant_id=request.user.tenant_id,
            name=data.name,
            channel=channels[0],
            list_id=data.list_id,
            audience=audience,
            provider_id=provider_id,
            content=msgspec.convert(msgspec.to_builtins(data.content), b.Content) if data.content else b.Content(),
            at=services.clock(),
            routing=routing,
            template_id=data.template_id,
            provider_ids=tuple(data.provider_ids or ()),
            tracking=b.Tracking(opens=data.track_opens, clicks=data.track_clicks, text_links=data.track_text_links),
        )
        # With a schedule it is created straight into `scheduled`, in the same transaction.
        min_interval_s = services.settings.min_cron_interval_s
        then = schedule_command(data, command.at, min_interval_s) if wants_schedule(data) else None
        return to_response(await handlers.create(services.pool, actor_of(request), command, then, refs))

    @get("/", summary="List broadcasts: by status, a name search, in a sort order",
         description=(
             "`filter[search]`: only broadcasts whose name contains it, in any case (`%`, `_` and `\\` are "
             "themselves, not wildcards). `sort`: `created_at`, `name` (in any case) or `status` (by its name, "
             "then by `created_at`), `-` before it for descending; default `-created_at`, the newest first. "
             "Ties go by id, in the same direction, so pages never overlap or skip."))
    async def list_broadcasts(
        self, request: Request, state: State, status: StatusFilter = None, search: BroadcastSearch = None,
        sort: BroadcastSort = "-created_at", limit: Limit = 50, offset: Offset = 0,
    ) -> Page[Broadcast]:
        async with state.services.pool.acquire() as con:
            rows, total = await view.page(
                con, request.user.tenant_id, status.value if status else None, limit, offset,
                search=search_of(search), sort=sort,
            )
        items = await with_counters(state.services.pool, rows)
        return Page(items=items, total=total, limit=limit, offset=offset)

    @get("/{broadcast_id:uuid}", summary="Get a broadcast")
    async def get_broadcast(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID]) -> Broadcast:
        async with state.services.pool.acquire() as con:
            row = await view.get(con, request.user.tenant_id, broadcast_id)
        if row is None:
            raise problem(404, "broadcast not found")
        return (await with_counters(state.services.pool, [row], audiences=True, clock=state.services.clock))[0]

    @patch("/{broadcast_id:uuid}", guards=[require_write], summary="Edit a broadcast (draft, scheduled, paused)",
           responses={409: WRONG_STATUS})
    async def edit(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID], data: JSONBody[BroadcastPatch]) -> Broadcast:
        changes = msgspec.structs.asdict(data)
        routing = {f: changes.pop(f) for f in ("channels", "channel_policy", "providers")}
        tracking = {f.removeprefix("track_"): v for f in ("track_opens", "track_clicks", "track_text_links")
                    if (v := changes.pop(f)) is not msgspec.UNSET}
        if changes.get("content") is not msgspec.UNSET:
            changes["content"] = msgspec.convert(msgspec.to_builtins(data.content), b.ContentChanges)
            if data.template_id is msgspec.UNSET:  # inline content given: the template no longer applies
                changes["template_id"] = None
        if data.audience is not msgspec.UNSET and data.list_id is not msgspec.UNSET:
            raise Invalid("list_id", "give either list_id or audience, not both")
        refs: list[tuple[Kind, int | str]] = []
        if isinstance(data.audience, AudienceIn):
            changes["audience"], refs = audience_command(data.audience)
        command = b.EditBroadcast(**changes, at=state.services.clock())
        row = await handlers.edit(state.services.pool, actor_of(request), broadcast_id, command, refs,
                                  {k: v for k, v in routing.items() if v is not msgspec.UNSET}, tracking)
        return (await with_counters(state.services.pool, [row]))[0]

    @delete("/{broadcast_id:uuid}", guards=[require_write], summary="Delete a broadcast", responses={409: WRONG_STATUS})
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

    @post("/{broadcast_id:uuid}/retry", guards=[require_write], status_code=202,
          summary="Send the latest run again to its failed (and/or unknown) recipients, once it ended",
          description=(
              "202 with the new run: it goes to the recipients of the latest run whose status there is one of "
              '`statuses` (default `["failed"]`; the body may be left out) and who still have an address. '
              "`unknown` ones (handed to the provider, no answer) may have arrived: they are sent again only "
              "when asked for. 409 `wrong_status` unless the latest run ended (completed, partially_failed, "
              "failed, cancelled); 409 `nothing_to_retry` when it has no such recipient."),
          operation_class=OptionalBodyOperation,
          responses={409: problem_response(
              "the latest run has not ended (`wrong_status`, with `current_status`), or has no recipient with "
              "those statuses who can still be reached (`nothing_to_retry`, with `run` and `statuses`)")})
    async def retry(
        self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID], data: JSONBody[RetryIn | None] = None,
    ) -> RetryAccepted:
        services = state.services
        statuses = (data or RetryIn()).statuses
        row, queued = await handlers.retry(services.pool, actor_of(request), broadcast_id, statuses, services.clock())
        shown_statuses = [s for s in b.RETRY_STATUSES if s in statuses]
        # A repeat while the retry runs decides nothing: `run` is that retry's, `retry_of` the run before.
        return RetryAccepted(status=row.status, queued=queued, run=row.run, retry_of=row.run - 1,
                             statuses=shown_statuses)

    @get("/{broadcast_id:uuid}/messages", summary="One record per recipient: address, status, attempts, error")
    async def messages(
        self,
        request: Request,
        state: State,
        broadcast_id: FromPath[uuid.UUID],
        status: MessageStatusFilter = None,
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
        command = schedule_command(data, state.services.clock(), state.services.settings.min_cron_interval_s)
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
        services = state.services
        items = await previews.preview(services.pool, request.user.tenant_id, broadcast_id, limit, services.clock(),
                                       services.settings.public_base_url)
        return Preview(items=[msgspec.convert(msgspec.to_builtins(i), PreviewMessage) for i in items])

    @get("/{broadcast_id:uuid}/audience",
         summary="Preflight: how many the next send would reach, and why the others would not get it")
    async def audience(self, request: Request, state: State, broadcast_id: FromPath[uuid.UUID]) -> AudienceCount:
        channel, counted = await handlers.preflight(
            state.services.pool, request.user.tenant_id, broadcast_id, state.services.clock())
        return AudienceCount(channel=channel, **dataclasses.asdict(counted))

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
        services, tenant_id = state.services, request.user.tenant_id
        async with services.pool.acquire() as con:
            if await progress.snapshot(con, tenant_id, broadcast_id) is None:
                raise problem(404, "broadcast not found")

        async def updates() -> AsyncIterator[ServerSentEventMessage]:
            # What the projector publishes on NATS, on the app's one connection; no polling per client.
            async for update in progress.follow(services.pool, services.nats, services.names, tenant_id,
                                                broadcast_id, services.settings.progress_reread_s):
                if update.snapshot is None:
                    yield ServerSentEventMessage(data=None, comment="keep-alive")
                else:
                    yield ServerSentEventMessage(event="finished" if update.final else "progress",
                                                 data=msgspec.json.encode(update.snapshot).decode())

        return ServerSentEvent(updates())
