"""Broadcast command handlers: build the domain command, run it, return the fresh view row."""
from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import msgspec

from shared.broadcasts import decider as b
from shared.broadcasts import view
from shared.broadcasts.view import BroadcastsView
from shared.kernel.errors import Invalid, NotFound
from shared.platform import commands as service
from shared.sending import snapshot as audience

DECIDER = service.Decider(event_union=b.Event, initial=b.INITIAL, evolve=b.evolve, decide=b.decide)
INLINE = (BroadcastsView(),)


class Actor:
    """Who issued a command, recorded in every event's metadata."""

    def __init__(self, tenant_id: uuid.UUID, actor: str, correlation_id: str | None = None) -> None:
        self.tenant_id, self.actor, self.correlation_id = tenant_id, actor, correlation_id

    def metadata(self) -> dict[str, object]:
        meta: dict[str, object] = {"tenant_id": str(self.tenant_id), "actor": self.actor}
        if self.correlation_id:
            meta["correlation_id"] = self.correlation_id
        return meta


async def _check_owner(con: asyncpg.Connection, actor: Actor, broadcast_id: uuid.UUID) -> None:
    """Another tenant's broadcast is reported exactly like a missing one."""
    owner = await con.fetchval("SELECT tenant_id FROM broadcasts WHERE id = $1", broadcast_id)
    if owner != actor.tenant_id:
        raise NotFound("broadcast not found")


async def run(pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, command: b.Command) -> view.BroadcastRow | None:
    """Run a command on one of the actor's broadcasts; returns its view row (None once deleted)."""
    if not isinstance(command, b.CreateBroadcast):
        async with pool.acquire() as con:
            await _check_owner(con, actor, broadcast_id)
    await service.handle(pool, DECIDER, b.stream_name(broadcast_id), command, actor.metadata(), INLINE)
    async with pool.acquire() as con:
        return await view.get(con, actor.tenant_id, broadcast_id)


async def check_references(
    con: asyncpg.Connection, tenant_id: uuid.UUID, channel: str, list_id: uuid.UUID | None, provider_id: uuid.UUID | None
) -> None:
    """The list and provider a broadcast names must be the tenant's own (and the provider of its channel)."""
    if list_id is not None and not await con.fetchval(
        "SELECT true FROM lists WHERE id = $1 AND tenant_id = $2", list_id, tenant_id
    ):
        raise Invalid("list_id", f"no list {list_id}")
    if provider_id is not None:
        provider_channel = await con.fetchval(
            "SELECT channel FROM providers WHERE id = $1 AND tenant_id = $2 AND NOT deleted", provider_id, tenant_id
        )
        if provider_channel is None:
            raise Invalid("provider_id", f"no provider {provider_id}")
        if provider_channel != channel:
            raise Invalid("provider_id", f"provider is for {provider_channel}, the broadcast is {channel}")


def check_content(content: b.Content) -> None:
    """Templates must parse, so a broadcast never fails at send time for a typo."""
    from shared.content.templates import CompiledContent, TemplateError

    try:
        CompiledContent.compile(content.subject, content.html, content.text)
    except TemplateError as exc:
        raise Invalid(exc.field, exc.reason) from exc
    for field in ("from_email", "reply_to"):
        if (value := getattr(content, field)) is not None and (problem := _address_problem(value)):
            raise Invalid(f"content.{field}", problem)


def _address_problem(value: str) -> str | None:
    """Why `value` is not an address ("news@example.com" or "News <news@example.com>"), or None."""
    from email.utils import parseaddr

    from email_validator import EmailNotValidError, validate_email

    _, address = parseaddr(value)
    if not address or "@" not in address:
        return "not an email address"
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        return str(exc)
    return None


async def create(
    pool: asyncpg.Pool, actor: Actor, command: b.CreateBroadcast, then: b.ScheduleBroadcast | None = None
) -> view.BroadcastRow:
    """Create a draft, and with `then` schedule it in the same transaction (both or neither)."""
    check_content(command.content)
    async with pool.acquire() as con:
        await check_references(con, actor.tenant_id, command.channel, command.list_id, command.provider_id)
        if then is not None:
            stream = b.stream_name(command.broadcast_id)
            async with con.transaction():
                await service.handle(pool, DECIDER, stream, command, actor.metadata(), INLINE, con=con)
                await service.handle(pool, DECIDER, stream, then, actor.metadata(), INLINE, con=con)
    row = await run(pool, actor, command.broadcast_id, command)
    if row is None:  # the id belongs to another tenant's (or a deleted) broadcast
        raise NotFound("broadcast not found")
    return row


async def edit(pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, command: b.EditBroadcast) -> view.BroadcastRow:
    async with pool.acquire() as con:
        current = await view.get(con, actor.tenant_id, broadcast_id)
        if current is None:
            raise NotFound("broadcast not found")
        await check_references(
            con,
            actor.tenant_id,
            current.channel,
            command.list_id if isinstance(command.list_id, uuid.UUID) else None,
            command.provider_id if isinstance(command.provider_id, uuid.UUID) else None,
        )
    if command.content is not msgspec.UNSET:
        merged = msgspec.convert({**current.content, **msgspec.to_builtins(command.content)}, b.Content)
        check_content(merged)
    row = await run(pool, actor, broadcast_id, command)
    assert row is not None
    return row


async def delete(pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, at: datetime) -> None:
    await run(pool, actor, broadcast_id, b.DeleteBroadcast(at=at))


async def send(pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, at: datetime) -> tuple[view.BroadcastRow, int]:
    """Start a top-up run (only members not reached yet); returns the broadcast and how many were queued.

    Nobody left to reach: `queued` is 0 and the status does not change."""
    async with pool.acquire() as con:
        current = await view.get(con, actor.tenant_id, broadcast_id)
        if current is None:
            raise NotFound("broadcast not found")
        if current.status in (b.Status.QUEUED, b.Status.SENDING):
            return current, 0  # a retried send: the run under way is the answer
        # Checked again at send: the list or provider may have been deleted since the broadcast was saved.
        await check_references(con, actor.tenant_id, current.channel, current.list_id, current.provider_id)
        left = await _remaining(con, current) if current.list_id else 0
    outcome = await service.handle(
        pool, DECIDER, b.stream_name(broadcast_id), b.SendBroadcast(audience_size=left, at=at),
        actor.metadata(), INLINE,
    )
    async with pool.acquire() as con:
        row = await view.get(con, actor.tenant_id, broadcast_id)
    assert row is not None
    started = [e for e in outcome.events if e.type == "BroadcastStarted"]
    return row, started[0].data["audience_size"] if started else 0


async def _remaining(con: asyncpg.Connection, row: view.BroadcastRow) -> int:
    """How many a top-up run would go to now (with nobody reached yet: the list's member count)."""
    assert row.list_id is not None
    runs = audience.reached_runs(row.reset_run, row.run)
    if not runs:
        return await audience.member_count(con, row.list_id)
    _, left = await audience.remaining(con, row.id, row.list_id, runs)
    return left


async def audience_of(con: asyncpg.Connection, row: view.BroadcastRow) -> tuple[int, int] | None:
    """(audience_total, remaining) of a broadcast with a list."""
    if row.list_id is None:
        return None
    return await audience.kept_remaining(
        con, row.id, row.version, row.list_id, audience.reached_runs(row.reset_run, row.run))


async def schedule(
    pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, command: b.ScheduleBroadcast
) -> view.BroadcastRow:
    row = await run(pool, actor, broadcast_id, command)
    assert row is not None
    return row


async def fire(pool: asyncpg.Pool, broadcast_id: uuid.UUID, occurrence_at: datetime, at: datetime) -> bool:
    """The scheduler's command: start the run due at `occurrence_at` (once, whoever calls it)."""
    async with pool.acquire() as con:
        row = await con.fetchrow(
            f"SELECT {view._ROW} FROM broadcasts WHERE id = $1 AND NOT deleted", broadcast_id
        )
        if row is None:
            return False
        current = view.BroadcastRow(**dict(row))
        recurring = bool(current.schedule and current.schedule.get("recurrence"))
        if current.list_id is None:
            size = 0
        elif recurring:  # each occurrence goes to the whole current audience
            size = await audience.member_count(con, current.list_id)
        else:
            size = await _remaining(con, current)
    meta = {"tenant_id": str(current.tenant_id), "actor": "scheduler"}
    outcome = await service.handle(
        pool, DECIDER, b.stream_name(broadcast_id),
        b.FireOccurrence(occurrence_at=occurrence_at, audience_size=size, at=at), meta, INLINE,
    )
    return bool(outcome.events)


async def transition(pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, command: b.Command) -> view.BroadcastRow:
    """pause, resume, cancel, stop, reset: the decider says whether the status allows it."""
    row = await run(pool, actor, broadcast_id, command)
    assert row is not None
    return row
