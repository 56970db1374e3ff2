"""Broadcast command handlers: each command is one trip on one connection, in one transaction —
load the stream, fold it, check what the decider cannot (the tenant owns it, the list and provider
it names exist), decide, append, update the broadcasts view, and read the fresh view row."""
from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from shared.audience.recipients import Kind, resolve_recipients
from shared.broadcasts import decider as b
from shared.broadcasts import view
from shared.broadcasts.status import EDITABLE, RETRYABLE, SENDABLE
from shared.broadcasts.view import BroadcastsView
from shared.channels import accounts
from shared.content import template_store
from shared.content.checks import check_content
from shared.content.template_store import TemplateRow
from shared.kernel.audience import Audience
from shared.kernel.content import Content, missing_channels
from shared.kernel.errors import Invalid, NotFound
from shared.platform import commands
from shared.sending import audience, snapshot

DECIDER = commands.Decider(event_union=b.Event, initial=b.INITIAL, evolve=b.evolve, decide=b.decide)
INLINE = (BroadcastsView(),)

# What a handler decides with, given the connection and the folded state: the commands to run.
Prepare = Callable[[asyncpg.Connection, b.State], Awaitable[Sequence[b.Command]]]


class Actor:
    """Who issued a command, recorded in every event's metadata."""

    def __init__(self, tenant_id: uuid.UUID, actor: str, correlation_id: str | None = None) -> None:
        self.tenant_id, self.actor, self.correlation_id = tenant_id, actor, correlation_id

    def metadata(self) -> dict[str, object]:
        meta: dict[str, object] = {"tenant_id": str(self.tenant_id), "actor": self.actor}
        if self.correlation_id:
            meta["correlation_id"] = self.correlation_id
        return meta


async def _execute(
    pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, prepare: Prepare
) -> tuple[commands.Outcome[b.State], view.BroadcastRow | None]:
    """One of the actor's broadcasts: another tenant's is reported exactly like a missing one.
    Returns the outcome and the broadcast's view row (None once deleted)."""
    stream = b.stream_name(broadcast_id)

    async def trip(con: asyncpg.Connection) -> tuple[commands.Outcome[b.State], view.BroadcastRow | None]:
        state, version = await commands.load(con, DECIDER, stream)
        if state.exists and state.tenant_id != actor.tenant_id:
            raise NotFound("broadcast not found")
        decided = await prepare(con, state)
        outcome = await commands.decide_and_append(
            con, DECIDER, stream, state, version, decided, actor.metadata(), INLINE)
        return outcome, await view.get(con, actor.tenant_id, broadcast_id)

    return await commands.in_one_trip(pool, trip)


async def _row(pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, prepare: Prepare) -> view.BroadcastRow:
    _, row = await _execute(pool, actor, broadcast_id, prepare)
    if row is None:  # deleted by this very command's twin, or never this tenant's
        raise NotFound("broadcast not found")
    return row


def _just(*decided: b.Command) -> Prepare:
    async def prepare(con: asyncpg.Connection, state: b.State) -> Sequence[b.Command]:
        return decided

    return prepare


async def check_references(
    con: asyncpg.Connection, tenant_id: uuid.UUID, channel: str, list_id: uuid.UUID | None, provider_id: uuid.UUID | None,
    audience: Audience | None = None, routing: b.Routing | None = None, template_id: uuid.UUID | None = None,
    provider_ids: Sequence[uuid.UUID] = (),
) -> None:
    """The lists, segments, contacts, providers and template a broadcast names must be the tenant's
    own (and each provider one of its channel's, `provider_ids` the first channel's)."""
    if template_id is not None and await _template(con, tenant_id, template_id) is None:
        raise Invalid("template_id", f"no template {template_id}")
    for other, other_provider in (routing.providers.items() if routing is not None else ()):
        found = await accounts.channel_of(con, tenant_id, other_provider)
        if found is None:
            raise Invalid(f"providers.{other}", f"no provider {other_provider}")
        if found != other:
            raise Invalid(f"providers.{other}", f"provider is for {found}, not {other}")
    if list_id is not None and not await con.fetchval(
        "SELECT true FROM lists WHERE id = $1 AND tenant_id = $2", list_id, tenant_id
    ):
        raise Invalid("list_id", f"no list {list_id}")
    if audience is not None:
        await _check_audience(con, tenant_id, audience)
    if provider_id is not None:
        provider_channel = await accounts.channel_of(con, tenant_id, provider_id)
        if provider_channel is None:
            raise Invalid("provider_id", f"no provider {provider_id}")
        if provider_channel != channel:
            raise Invalid("provider_id", f"provider is for {provider_channel}, the broadcast is {channel}")
    for i, pooled in enumerate(provider_ids):
        found = await accounts.channel_of(con, tenant_id, pooled)
        if found is None:
            raise Invalid(f"provider_ids[{i}]", f"no provider {pooled}")
        if found != channel:
            raise Invalid(f"provider_ids[{i}]", f"provider is for {found}, the broadcast is {channel}")


async def _template(con: asyncpg.Connection, tenant_id: uuid.UUID, template_id: uuid.UUID) -> TemplateRow | None:
    """The tenant's template, held until the command's transaction ends: a delete of it waits, and
    then sees the broadcast using it (template_store.in_use)."""
    return await template_store.get(con, tenant_id, template_id, for_share=True)


async def template_version(con: asyncpg.Connection, tenant_id: uuid.UUID, state: b.State) -> int:
    """The version of the broadcast's template a run starting now renders (0: it has none), checked
    to have content for each of the broadcast's channels."""
    if state.template_id is None:
        return 0
    found = await _template(con, tenant_id, state.template_id)
    if found is None:
        raise Invalid("template_id", f"no template {state.template_id}")
    if missing := missing_channels(found.content, state.channels):
        raise Invalid("template_id", f"the template has nothing to send on {missing[0]}")
    return found.version


async def _check_audience(con: asyncpg.Connection, tenant_id: uuid.UUID, audience: Audience) -> None:
    for field, table, ids in (
        ("lists", "lists", audience.lists), ("segments", "segments", audience.segments),
        ("exclude_lists", "lists", audience.exclude_lists), ("exclude_segments", "segments", audience.exclude_segments),
    ):
        if not ids:
            continue
        rows = await con.fetch(f"SELECT id FROM {table} WHERE tenant_id = $1 AND id = ANY($2::uuid[])", tenant_id, ids)
        found = {r["id"] for r in rows}
        for i, one in enumerate(ids):
            if one not in found:
                raise Invalid(f"audience.{field}[{i}]", f"no {table[:-1]} {one}")


def covers(content: Content, channels: tuple[str, ...]) -> None:
    """An inline content must have something for each of the broadcast's channels."""
    if missing := missing_channels(content, channels):
        if missing[0] == "email":
            raise Invalid("content.subject", "required: the broadcast sends on email")
        raise Invalid(f"content.{missing[0]}", f"required: the broadcast sends on {missing[0]}")


def _checked_changes(current: b.Content, changes: b.ContentChanges) -> b.ContentChanges:  # type: ignore[valid-type]
    """An edit's content checked as it will be once merged (shared/content/checks.py), its HTML
    repaired."""
    checked = check_content(b.merge_content(current, changes), stored=current)
    given = {f: getattr(checked, f) for f in b.ContentChanges.__struct_fields__
             if getattr(changes, f) is not msgspec.UNSET}
    return msgspec.structs.replace(changes, **given)


async def _with_recipients(
    con: asyncpg.Connection, tenant_id: uuid.UUID, audience: Audience, refs: Sequence[tuple[Kind, int | str]]
) -> Audience:
    """The audience with its ad-hoc recipients as contact ids (contacts made for new addresses, in
    the command's transaction: a command that fails leaves none behind)."""
    if not refs:
        return audience
    return msgspec.structs.replace(audience, recipients=tuple(await resolve_recipients(con, tenant_id, refs)))


async def create(
    pool: asyncpg.Pool, actor: Actor, command: b.CreateBroadcast, then: b.ScheduleBroadcast | None = None,
    recipients: Sequence[tuple[Kind, int | str]] = (),
) -> view.BroadcastRow:
    """Create a draft, and with `then` schedule it in the same trip (both or neither). `recipients`
    are the audience's ad-hoc recipients, made into contact ids here."""
    if command.template_id is None:
        command = msgspec.structs.replace(command, content=check_content(command.content))
        covers(command.content, command.routing.channels if command.routing else (command.channel,))

    async def prepare(con: asyncpg.Connection, state: b.State) -> Sequence[b.Command]:
        created = command
        if command.audience is not None and recipients:
            audience = await _with_recipients(con, actor.tenant_id, command.audience, recipients)
            created = msgspec.structs.replace(command, audience=audience)
        await check_references(con, actor.tenant_id, command.channel, command.list_id, command.provider_id,
                               created.audience, command.routing, command.template_id, command.provider_ids)
        return [created] if then is None else [created, then]

    return await _row(pool, actor, command.broadcast_id, prepare)


def edited_routing(state: b.State, changes: dict[str, Any]) -> dict[str, Any]:
    """EditBroadcast's `channel`, `routing` and `provider_id` from an edit of `channels`,
    `channel_policy` and `providers` (each replacing the stored one) merged into the state's."""
    if not changes:
        return {}
    channels = tuple(changes.get("channels", state.channels))
    policy = changes.get("channel_policy", state.routing.channel_policy if state.routing else "all")
    current = {**(state.routing.providers if state.routing else {})}
    if state.provider_id is not None:
        current[state.channel] = state.provider_id
    providers = dict(changes["providers"]) if "providers" in changes else {
        c: p for c, p in current.items() if c in channels}
    if len(set(channels)) != len(channels):
        raise Invalid("channels", "each channel at most once")
    first = providers.pop(channels[0], None)
    for channel in providers:
        if channel not in channels:
            raise Invalid(f"providers.{channel}", f"{channel} is not one of the broadcast's channels")
    routing = b.Routing(channels=channels, channel_policy=policy, providers=providers) if len(channels) > 1 else None
    return {"channel": channels[0], "routing": routing, "provider_id": first}


async def edit(
    pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, command: b.EditBroadcast,
    recipients: Sequence[tuple[Kind, int | str]] = (), routing: dict[str, Any] | None = None,
    tracking: dict[str, bool] | None = None,
) -> view.BroadcastRow:
    """`routing`: changes of `channels`, `channel_policy`, `providers` (see edited_routing);
    `tracking`: of the Tracking fields, merged into the stored ones."""
    async def prepare(con: asyncpg.Connection, state: b.State) -> Sequence[b.Command]:
        edited = command
        if tracking:
            edited = msgspec.structs.replace(edited, tracking=msgspec.structs.replace(state.tracking, **tracking))
        if state.live and routing and state.status in EDITABLE:
            changed = edited_routing(state, routing)
            if command.provider_id is not msgspec.UNSET:  # given as such, it wins
                changed["provider_id"] = command.provider_id
            edited = msgspec.structs.replace(edited, **changed)
        if state.live:  # otherwise the decider says it is not found
            audience = edited.audience if isinstance(edited.audience, Audience) else None
            if audience is not None and recipients and state.status in EDITABLE:
                audience = await _with_recipients(con, actor.tenant_id, audience, recipients)
                edited = msgspec.structs.replace(edited, audience=audience)
            await check_references(
                con, actor.tenant_id, edited.channel if isinstance(edited.channel, str) else state.channel,
                edited.list_id if isinstance(edited.list_id, uuid.UUID) else None,
                edited.provider_id if isinstance(edited.provider_id, uuid.UUID) else None,
                audience,
                edited.routing if isinstance(edited.routing, b.Routing) else None,
                edited.template_id if isinstance(edited.template_id, uuid.UUID) else None,
                _pool_after(state, edited),
            )
            if isinstance(edited.content, b.ContentChanges) and state.content is not None:
                edited = msgspec.structs.replace(edited, content=_checked_changes(state.content, edited.content))
            template = edited.template_id if edited.template_id is not msgspec.UNSET else state.template_id
            if template is None and state.status in EDITABLE:
                content = b.merge_content(state.content, edited.content) if isinstance(
                    edited.content, b.ContentChanges) else state.content
                after = edited.routing if edited.routing is not msgspec.UNSET else state.routing
                channel = edited.channel if isinstance(edited.channel, str) else state.channel
                covers(content, after.channels if after else (channel,))
        return [edited]

    return await _row(pool, actor, broadcast_id, prepare)


def _pool_after(state: b.State, edited: b.EditBroadcast) -> tuple[uuid.UUID, ...]:
    """The provider pool an edit leaves (checked against the channel it leaves): the one given, none
    when another provider replaces it, else the stored one."""
    if edited.provider_ids is not msgspec.UNSET:
        return tuple(edited.provider_ids)
    if edited.provider_id is not msgspec.UNSET and edited.provider_id != state.provider_id:
        return ()
    return state.provider_ids


async def delete(pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, at: datetime) -> None:
    await _execute(pool, actor, broadcast_id, _just(b.DeleteBroadcast(at=at)))


async def send(pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, at: datetime) -> tuple[view.BroadcastRow, int]:
    """Start a top-up run (only members not reached yet); returns the broadcast and how many were queued.

    Nobody left to reach, or a run already under way: `queued` is 0 and the status does not change."""
    async def prepare(con: asyncpg.Connection, state: b.State) -> Sequence[b.Command]:
        size = 0
        if state.live and state.status in SENDABLE:  # the audience is counted only when a run may start
            # Checked again at send: a list, segment or provider may have been deleted since the broadcast was saved.
            await check_references(con, actor.tenant_id, state.channel, state.list_id, state.provider_id,
                                   state.audience, state.routing)
            version = await template_version(con, actor.tenant_id, state)
            size = await _top_up_size(con, actor.tenant_id, broadcast_id, state, at)
            return [b.SendBroadcast(audience_size=size, at=at, template_version=version)]
        return [b.SendBroadcast(audience_size=size, at=at)]

    outcome, row = await _execute(pool, actor, broadcast_id, prepare)
    assert row is not None
    started = [e for e in outcome.events if e.type == "BroadcastStarted"]
    return row, started[0].data["audience_size"] if started else 0


async def retry(
    pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, statuses: Sequence[str], at: datetime
) -> tuple[view.BroadcastRow, int]:
    """Start a retry run: the latest run's recipients with those ledger statuses, again. Returns the
    broadcast and how many were queued (0: a repeat while the retry it started is under way)."""
    async def prepare(con: asyncpg.Connection, state: b.State) -> Sequence[b.Command]:
        counts: dict[str, int] = {}
        if state.live and state.status in RETRYABLE:  # the ledger is counted only when a retry may start
            # The provider is checked again, as at send (it may have been deleted since); the list
            # is not: a retry goes to the run's recipients, not to the list's members.
            await check_references(con, actor.tenant_id, state.channel, None, state.provider_id, None, state.routing)
            version = await template_version(con, actor.tenant_id, state)
            counts = await snapshot.retry_counts(con, broadcast_id, state.run, state.channels, list(statuses))
            return [b.RetryBroadcast(statuses=tuple(statuses), failed=counts.get("failed", 0),
                                     unknown=counts.get("unknown", 0), at=at, template_version=version)]
        return [b.RetryBroadcast(statuses=tuple(statuses), failed=0, unknown=0, at=at)]

    outcome, row = await _execute(pool, actor, broadcast_id, prepare)
    assert row is not None
    started = [e for e in outcome.events if e.type == "BroadcastStarted"]
    return row, started[0].data["audience_size"] if started else 0


async def _top_up_size(
    con: asyncpg.Connection, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, state: b.State, at: datetime,
    top_up: bool = True,
) -> int:
    """How many a run would go to now: for a top-up, those not reached by the runs since the last
    reset. A first run to one list is accepted with the list's member count (counting its members
    with an address took 4.5 s of the call for a million, measured); the snapshot has the exact figure."""
    target = state.target
    if target is None or target.empty:
        return 0
    runs = snapshot.reached_runs(state.reset_run, state.run) if top_up else []
    if target.single_list is not None and not runs:
        return await snapshot.member_count(con, target.single_list)
    reached = audience.Reached(broadcast_id, runs) if runs else None
    try:
        counted = await audience.preflight(con, tenant_id, target, state.channel, at, reached)
    except audience.MissingSegment as exc:
        raise Invalid(exc.field, f"no segment {exc.segment_id}") from exc
    return counted.reach


async def audience_of(con: asyncpg.Connection, row: view.BroadcastRow, at: datetime) -> tuple[int, int] | None:
    """(audience_total, remaining) of a broadcast with an audience: those with an address on its
    channel, and those of them the next send would reach."""
    target = row.target
    if target is None or target.empty:
        return None
    runs = snapshot.reached_runs(row.reset_run, row.run)
    if target.single_list is not None:  # kept while the list and the broadcast stay as they are
        return await snapshot.kept_remaining(
            con, row.tenant_id, row.id, row.version, target.single_list, row.channel, runs, at)
    try:
        counted = await audience.preflight(
            con, row.tenant_id, target, row.channel, at, audience.Reached(row.id, runs) if runs else None)
    except audience.MissingSegment:
        return None
    return counted.reached + counted.reach, counted.reach


async def preflight(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, at: datetime
) -> tuple[str, audience.Preflight]:
    """What the next send would do with each contact of the broadcast's audience."""
    async with pool.acquire() as con:
        row = await view.get(con, tenant_id, broadcast_id)
        if row is None:
            raise NotFound("broadcast not found")
        target = row.target
        if target is None:
            return row.channel, audience.Preflight(0, 0, 0, 0, 0, 0)
        runs = snapshot.reached_runs(row.reset_run, row.run)
        try:
            counted = await audience.preflight(
                con, tenant_id, target, row.channel, at, audience.Reached(broadcast_id, runs) if runs else None)
        except audience.MissingSegment as exc:
            raise Invalid(exc.field, f"no segment {exc.segment_id}") from exc
    return row.channel, counted


async def schedule(
    pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, command: b.ScheduleBroadcast
) -> view.BroadcastRow:
    return await _row(pool, actor, broadcast_id, _just(command))


async def transition(pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, command: b.Command) -> view.BroadcastRow:
    """pause, resume, cancel, stop, reset: the decider says whether the status allows it. A resume
    closes the breakers of the broadcast's providers: it is the user saying "try again"."""
    async def prepare(con: asyncpg.Connection, state: b.State) -> Sequence[b.Command]:
        if isinstance(command, b.ResumeBroadcast) and state.live and state.tenant_id == actor.tenant_id:
            providers = [p for c in state.channels if (p := state.provider_of(c)) is not None]
            await con.execute("UPDATE provider_breakers SET errors = 0 WHERE provider_id = ANY($1::uuid[])", providers)
        return [command]

    return await _row(pool, actor, broadcast_id, prepare)



async def fire(pool: asyncpg.Pool, broadcast_id: uuid.UUID, occurrence_at: datetime, at: datetime) -> bool:
    """The scheduler's command: start the run due at `occurrence_at` (once, whoever calls it)."""
    stream = b.stream_name(broadcast_id)

    async def trip(con: asyncpg.Connection) -> bool:
        state, version = await commands.load(con, DECIDER, stream)
        if not state.live:
            return False
        # A recurring occurrence goes to the whole current audience, a one-off schedule is a top-up.
        assert state.tenant_id is not None
        try:
            size = await _top_up_size(con, state.tenant_id, broadcast_id, state, at, top_up=not state.recurring)
            template = await template_version(con, state.tenant_id, state)
        except Invalid:  # a segment or the template gone: nobody to send to, the occurrence is skipped
            size, template = 0, 0
        command = b.FireOccurrence(occurrence_at=occurrence_at, audience_size=size, at=at, template_version=template)
        metadata: dict[str, Any] = {"tenant_id": str(state.tenant_id), "actor": "scheduler"}
        outcome = await commands.decide_and_append(con, DECIDER, stream, state, version, [command], metadata, INLINE)
        return bool(outcome.events)

    return await commands.in_one_trip(pool, trip)
