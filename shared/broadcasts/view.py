"""The broadcasts view: one row per broadcast, updated inline with every append to its stream.

Inline (in the command's transaction) so a client reads its own write at once; like any
projection it can be rebuilt from the log (`crier rebuild broadcasts`).
"""
from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import msgspec

from shared.broadcasts import decider as b
from shared.broadcasts.status import ACTIVE, Status, sql_list
from shared.kernel.audience import Audience, of_list
from shared.platform import codec, db
from shared.platform.eventstore import RecordedEvent


class BroadcastsView:
    name = "broadcasts"
    categories = (b.CATEGORY,)

    async def apply(self, con: asyncpg.Connection, event: RecordedEvent) -> None:
        decoded = codec.from_recorded(event, b.Event)
        broadcast_id = b.id_from_stream(event.stream_name)
        match decoded:
            case b.BroadcastCreated():
                await con.execute(
                    """INSERT INTO broadcasts (id, tenant_id, name, channel, status, list_id, provider_id,
                                               content, version, created_at, updated_at, audience, routing,
                                               template_id, provider_ids, tracking)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12, $13, $14, $15)
                       ON CONFLICT (id) DO NOTHING""",
                    decoded.broadcast_id,
                    decoded.tenant_id,
                    decoded.name,
                    decoded.channel,
                    b.Status.DRAFT.value,
                    decoded.list_id,
                    decoded.provider_id,
                    msgspec.to_builtins(decoded.content),
                    event.position,
                    decoded.at,
                    msgspec.to_builtins(decoded.audience),
                    msgspec.to_builtins(decoded.routing),
                    decoded.template_id,
                    list(decoded.provider_ids),
                    msgspec.to_builtins(decoded.tracking) or None,
                )
            case b.BroadcastEdited():
                changes = {
                    f: getattr(decoded, f)
                    for f in ("name", "list_id", "audience", "provider_id", "content", "channel", "routing",
                              "template_id", "provider_ids", "tracking")
                    if getattr(decoded, f) is not msgspec.UNSET
                }
                for f in ("content", "audience", "routing", "tracking"):
                    if f in changes:
                        changes[f] = msgspec.to_builtins(changes[f])
                if "provider_ids" in changes:
                    changes["provider_ids"] = list(changes["provider_ids"])
                sets = ", ".join(f"{col} = ${i + 4}" for i, col in enumerate(changes))
                await con.execute(
                    f"UPDATE broadcasts SET version = $2, updated_at = $3{', ' + sets if sets else ''} WHERE id = $1",
                    broadcast_id,
                    event.position,
                    decoded.at,
                    *changes.values(),
                )
            case b.BroadcastStarted():
                await self._set_status(con, broadcast_id, event, b.Status.QUEUED, decoded.at, run=decoded.run)
                # A one-off schedule is used up; a recurring one stays (its next time is set at the run's end).
                # The run has not finished: sent_at is the previous run's no more.
                await con.execute(
                    """UPDATE broadcasts SET scheduled_at = NULL, resumes = 0, template_version = $2,
                           schedule = CASE WHEN schedule ? 'recurrence' AND schedule->'recurrence' <> 'null'
                                           THEN schedule END,
                           started_at = $3, sent_at = NULL
                       WHERE id = $1""",
                    broadcast_id, decoded.template_version, decoded.at,
                )
            case b.BroadcastScheduled():
                await self._set_status(con, broadcast_id, event, b.Status.SCHEDULED, decoded.at)
                await con.execute(
                    "UPDATE broadcasts SET scheduled_at = $2, schedule = $3 WHERE id = $1",
                    broadcast_id, decoded.scheduled_at, msgspec.to_builtins(decoded.schedule),
                )
            case b.OccurrenceSkipped():
                await self._set_status(con, broadcast_id, event, b.Status.DRAFT, decoded.at)
                await self._unschedule(con, broadcast_id)
            case b.BroadcastPaused():
                reason = f"{decoded.reason}: {decoded.detail}" if decoded.reason and decoded.detail else decoded.reason
                await self._set_status(con, broadcast_id, event, b.Status.PAUSED, decoded.at, reason=reason)
            case b.BroadcastResumed():
                await self._set_status(con, broadcast_id, event, b.Status.SENDING, decoded.at)
                await con.execute("UPDATE broadcasts SET resumes = $2 WHERE id = $1", broadcast_id, decoded.resumes)
            case b.BroadcastCancelled():
                await self._set_status(con, broadcast_id, event, b.Status.CANCELLED, decoded.at)
                await self._unschedule(con, broadcast_id)
            case b.BroadcastStopped():
                await self._set_status(con, broadcast_id, event, b.Status.DRAFT, decoded.at)
                await self._unschedule(con, broadcast_id)
            case b.BroadcastReset():
                await self._set_status(con, broadcast_id, event, b.Status.DRAFT, decoded.at)
                await self._unschedule(con, broadcast_id)
                await con.execute(
                    "UPDATE broadcasts SET reset_run = $2 WHERE id = $1", broadcast_id, decoded.through_run
                )
            case b.TestSent():
                await con.execute("UPDATE broadcasts SET version = $2 WHERE id = $1", broadcast_id, event.position)
            case b.AudienceSnapshotted():
                await self._set_status(con, broadcast_id, event, b.Status.SENDING, decoded.at)
            case b.BroadcastCompleted():
                await self._set_status(con, broadcast_id, event, b.Status.COMPLETED, decoded.at)
                await self._sent(con, broadcast_id, decoded.at)
            case b.BroadcastPartiallyFailed():
                # Events stored before it had a reason: the same words from their counts.
                reason = decoded.reason or b.shortfall(decoded.total, decoded.failed, decoded.unknown)
                await self._set_status(con, broadcast_id, event, b.Status.PARTIALLY_FAILED, decoded.at, reason=reason)
                await self._sent(con, broadcast_id, decoded.at)
            case b.BroadcastFailed():
                await self._set_status(con, broadcast_id, event, b.Status.FAILED, decoded.at, reason=decoded.reason)
                await self._sent(con, broadcast_id, decoded.at)
            case b.BroadcastDeleted():
                await con.execute(
                    "UPDATE broadcasts SET deleted = true, version = $2, updated_at = $3 WHERE id = $1",
                    broadcast_id,
                    event.position,
                    decoded.at,
                )

    async def _set_status(
        self, con: asyncpg.Connection, broadcast_id: str, event: RecordedEvent, status: b.Status, at: datetime,
        run: int | None = None, reason: str | None = None,
    ) -> None:
        """Every status change; `reason` only with a failed or partially failed end (cleared otherwise)."""
        await con.execute(
            """UPDATE broadcasts SET status = $2, version = $3, updated_at = $4, run = coalesce($5, run),
                                     status_reason = $6
               WHERE id = $1""",
            broadcast_id, status.value, event.position, at, run, reason,
        )

    @staticmethod
    async def _sent(con: asyncpg.Connection, broadcast_id: str, at: datetime) -> None:
        """The latest run finished (the decider finishes only the latest run, and only once)."""
        await con.execute("UPDATE broadcasts SET sent_at = $2 WHERE id = $1", broadcast_id, at)

    @staticmethod
    async def _unschedule(con: asyncpg.Connection, broadcast_id: str) -> None:
        await con.execute("UPDATE broadcasts SET scheduled_at = NULL, schedule = NULL WHERE id = $1", broadcast_id)

    async def clear(self, con: asyncpg.Connection) -> None:
        await con.execute("TRUNCATE broadcasts")



class BroadcastRow(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    channel: str
    status: str
    list_id: uuid.UUID | None
    provider_id: uuid.UUID | None
    content: dict
    run: int
    reset_run: int
    resumes: int
    scheduled_at: datetime | None
    schedule: dict | None
    version: int
    created_at: datetime
    updated_at: datetime
    status_reason: str | None = None  # why the latest run failed or partially failed
    audience: dict | None = None  # set instead of list_id for anything but one list
    routing: dict | None = None  # {channels, channel_policy, providers}: more than one channel
    template_id: uuid.UUID | None = None
    template_version: int = 0  # of the latest run
    provider_ids: list[uuid.UUID] = []  # the first channel's pool, when more than one provider
    tracking: dict | None = None  # {opens, clicks, text_links} as set (b.Tracking); null: nothing tracked
    started_at: datetime | None = None  # when the latest run started
    sent_at: datetime | None = None  # when the latest run finished (null while it runs, or called off)

    @property
    def tracks(self) -> b.Tracking:
        return msgspec.convert(self.tracking, b.Tracking) if self.tracking else b.NO_TRACKING

    @property
    def channels(self) -> tuple[str, ...]:
        """Every channel it sends on, `channel` first."""
        return tuple(self.routing.get("channels") or (self.channel,)) if self.routing else (self.channel,)

    @property
    def channel_policy(self) -> str:
        return self.routing.get("channel_policy", "all") if self.routing else "all"

    def provider_of(self, channel: str) -> uuid.UUID | None:
        routing = msgspec.convert(self.routing, b.Routing) if self.routing else None
        return b.provider_of(channel, self.channel, self.provider_id, routing)

    @property
    def target(self) -> Audience | None:
        """Who the next run goes to: the audience, or the one list."""
        if self.audience is not None:
            return msgspec.convert(self.audience, Audience)
        return of_list(self.list_id)


_ROW = (
    "id, tenant_id, name, channel, status, list_id, provider_id, content, run, reset_run, resumes, scheduled_at, "
    "schedule, version, created_at, updated_at, status_reason, audience, routing, template_id, template_version, "
    "provider_ids, tracking, started_at, sent_at"
)


async def get(con: asyncpg.Connection, tenant_id: uuid.UUID, broadcast_id: uuid.UUID) -> BroadcastRow | None:
    """One live broadcast of this tenant; another tenant's broadcast is as absent as a missing one."""
    row = await con.fetchrow(
        f"SELECT {_ROW} FROM broadcasts WHERE id = $1 AND tenant_id = $2 AND NOT deleted", broadcast_id, tenant_id
    )
    return BroadcastRow(**dict(row)) if row else None


# The list's orders by `sort` (a leading `-`: descending). Each walks one of 029's indexes, either
# way, and stops at the page; ties go by id in the same direction, so equal keys never shuffle
# between pages. Status sorts by its name, newest last within one (oldest last with `-status`).
SORTS = {
    "created_at": "created_at, id",
    "-created_at": "created_at DESC, id DESC",
    "name": "lower(name), id",
    "-name": "lower(name) DESC, id DESC",
    "status": "status, created_at, id",
    "-status": "status DESC, created_at DESC, id DESC",
}
DEFAULT_SORT = "-created_at"


async def page(
    con: asyncpg.Connection, tenant_id: uuid.UUID, status: str | None, limit: int, offset: int, *,
    search: str | None = None, sort: str = DEFAULT_SORT,
) -> tuple[list[BroadcastRow], int]:
    """A page of the tenant's live broadcasts in `sort` order (SORTS), of those in `status` whose name
    holds `search` in any case, and how many there are."""
    # Only the conditions given, so that each combination gets a plan of its own (a prepared
    # `$2 IS NULL OR ...` may be planned once for any value, and then uses neither index).
    where, args = ["tenant_id = $1", "NOT deleted"], [tenant_id]
    if status is not None:
        args.append(status)
        where.append(f"status = ${len(args)}")
    if search is not None:
        args.append(db.contains_pattern(search))
        where.append(f"lower(name) LIKE ${len(args)} ESCAPE '\\'")
    condition = " AND ".join(where)
    total = await con.fetchval(f"SELECT count(*) FROM broadcasts WHERE {condition}", *args)
    rows = await con.fetch(
        f"""SELECT {_ROW} FROM broadcasts WHERE {condition} ORDER BY {SORTS[sort]}
            LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}""",
        *args, limit, offset,
    )
    return [BroadcastRow(**dict(r)) for r in rows], total


async def active_with_provider(con: asyncpg.Connection, tenant_id: uuid.UUID, provider_id: uuid.UUID) -> list[uuid.UUID]:
    """Broadcasts whose current run still sends through this provider (on any of its channels)."""
    rows = await con.fetch(
        f"""SELECT id FROM broadcasts WHERE tenant_id = $1
              AND (provider_id = $2 OR $2 = ANY(provider_ids)
                   OR EXISTS (SELECT FROM jsonb_each_text(routing->'providers') p WHERE p.value = $2::text))
              AND status IN {sql_list(ACTIVE)}
            AND NOT deleted ORDER BY created_at""",
        tenant_id, provider_id,
    )
    return [r["id"] for r in rows]


async def snapshotting_list(con: asyncpg.Connection, tenant_id: uuid.UUID, list_id: uuid.UUID) -> list[uuid.UUID]:
    """Broadcasts whose planner is reading this list right now (status queued): their list, or a list
    their audience includes or excludes."""
    rows = await con.fetch(
        f"""SELECT id FROM broadcasts WHERE tenant_id = $1 AND status = '{Status.QUEUED.value}' AND NOT deleted
              AND (list_id = $2 OR audience->'lists' ? $3 OR audience->'exclude_lists' ? $3)""",
        tenant_id, list_id, str(list_id),
    )
    return [r["id"] for r in rows]


async def snapshotting_segment(con: asyncpg.Connection, tenant_id: uuid.UUID, segment_id: uuid.UUID) -> list[uuid.UUID]:
    """Broadcasts whose planner is evaluating this segment right now (status queued)."""
    rows = await con.fetch(
        f"""SELECT id FROM broadcasts WHERE tenant_id = $1 AND status = '{Status.QUEUED.value}' AND NOT deleted
              AND (audience->'segments' ? $2 OR audience->'exclude_segments' ? $2)""",
        tenant_id, str(segment_id),
    )
    return [r["id"] for r in rows]
