"""The Postgres event store: append with an expected version, read a stream, read in commit order.

Commit-order reads are gap-safe: a `bigserial` is handed out at insert but becomes visible at
commit, so "position > last seen" skips a transaction that commits late. Readers only take
events whose transaction is older than every transaction still running (the xid8 horizon), in
`(transaction_id, global_position)` order, and checkpoint that pair.
"""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from shared.kernel.streams import SEPARATOR, category_of

NOTIFY_CHANNEL = "crier_events"  # notified by the events_notify trigger (migration 001)
ANY_VERSION = -1  # expected_version that accepts whatever the stream holds
NO_STREAM = 0  # expected_version of a stream that must not exist yet


class WrongExpectedVersion(Exception):
    def __init__(self, stream_name: str, expected: int, actual: int | None = None) -> None:
        self.stream_name, self.expected, self.actual = stream_name, expected, actual
        super().__init__(f"stream {stream_name}: expected version {expected}, found {actual}")


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any] = {}
    id: uuid.UUID = msgspec.field(default_factory=uuid.uuid4)


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True):
    global_position: int
    transaction_id: int
    stream_name: str
    position: int
    id: uuid.UUID
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    created_at: datetime

    @property
    def category(self) -> str:
        return category_of(self.stream_name)

    @property
    def checkpoint(self) -> "Checkpoint":
        return Checkpoint(self.transaction_id, self.global_position)


class Checkpoint(msgspec.Struct, frozen=True):
    transaction_id: int = 0
    global_position: int = 0


_COLUMNS = "global_position, transaction_id, stream_name, position, id, type, data, metadata, created_at"


def _recorded(row: asyncpg.Record) -> RecordedEvent:
    return RecordedEvent(**dict(row))


async def stream_version(con: asyncpg.Connection, stream_name: str) -> int:
    return await con.fetchval(
        "SELECT coalesce(max(position), 0) FROM events WHERE stream_name = $1", stream_name
    )


async def _lock_stream(con: asyncpg.Connection, stream_name: str) -> None:
    """Hold the stream's lock until the transaction ends. Without it two ANY_VERSION appenders read
    the same version and the second fails on the unique key, although it accepts any version.

    A statement of its own: under READ COMMITTED the version read that follows takes its snapshot
    after the lock was granted, so it sees what the previous holder committed (a lock taken inside
    the reading statement would come after that statement's snapshot). The key's namespace
    (`stream:`) keeps it apart from the other transaction locks hashed the same way."""
    await con.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"stream:{stream_name}")


async def append(
    con: asyncpg.Connection, stream_name: str, events: list[NewEvent], expected_version: int
) -> list[RecordedEvent]:
    """Append events after `expected_version` (events already in the stream); returns them as stored.

    Runs in the caller's transaction when there is one, so views and checkpoints written in the
    same transaction commit or roll back with the events. A concurrent writer that got there first
    surfaces as WrongExpectedVersion, either here or from the unique (stream_name, position).

    ANY_VERSION appends to one stream are serialised (`_lock_stream`), so concurrent ones all land,
    one after another. They only wait for each other: a writer with an explicit version (or
    NO_STREAM) takes no lock, so mixing both kinds on one stream can still fail the ANY_VERSION one,
    as can a REPEATABLE READ caller, whose snapshot predates the lock.
    """
    if not events:
        return []
    if expected_version == ANY_VERSION and not con.is_in_transaction():
        # The stream lock lasts until the transaction ends: outside one it needs one of its own,
        # held from the version read to the insert.
        async with con.transaction():
            return await append(con, stream_name, events, expected_version)
    if expected_version == NO_STREAM:
        start = 0  # a stream that exists already fails on the unique (stream_name, position) below
    elif expected_version != ANY_VERSION:
        actual = await stream_version(con, stream_name)
        if actual != expected_version:
            raise WrongExpectedVersion(stream_name, expected_version, actual)
        start = expected_version
    else:
        await _lock_stream(con, stream_name)
        start = await stream_version(con, stream_name)
    try:
        rows = await con.fetch(
            f"""INSERT INTO events (stream_name, position, id, type, data, metadata)
                SELECT $1, $2 + ord, id, type, data, metadata
                FROM unnest($3::uuid[], $4::text[], $5::jsonb[], $6::jsonb[])
                     WITH ORDINALITY AS e(id, type, data, metadata, ord)
                ORDER BY ord
                RETURNING {_COLUMNS}""",
            stream_name,
            start,
            [e.id for e in events],
            [e.type for e in events],
            [e.data for e in events],
            [e.metadata for e in events],
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "events_stream_name_position_key":
            raise WrongExpectedVersion(stream_name, expected_version) from exc
        raise
    return sorted((_recorded(r) for r in rows), key=lambda e: e.position)


def first_event_insert(p: int) -> str:
    """SQL: insert one event as the first of a new stream, from parameters $p to $p+4 (see
    `first_event_arguments`), for a writer that records it in one statement with its other changes
    (one round trip, where `append` in a transaction takes four). The unique (stream_name,
    position) still refuses a second first event."""
    return (f"INSERT INTO events (stream_name, position, id, type, data, metadata) "
            f"SELECT ${p}::text, 1, ${p + 1}::uuid, ${p + 2}::text, ${p + 3}::jsonb, ${p + 4}::jsonb")


def first_event_arguments(stream_name: str, event: NewEvent) -> tuple[Any, ...]:
    return stream_name, event.id, event.type, event.data, event.metadata


async def read_stream(con: asyncpg.Connection, stream_name: str, after_position: int = 0) -> list[RecordedEvent]:
    rows = await con.fetch(
        f"SELECT {_COLUMNS} FROM events WHERE stream_name = $1 AND position > $2 ORDER BY position",
        stream_name,
        after_position,
    )
    return [_recorded(r) for r in rows]


async def read_committed(
    con: asyncpg.Connection,
    after: Checkpoint,
    limit: int = 500,
    categories: tuple[str, ...] | None = None,
) -> list[RecordedEvent]:
    """Events committed after `after`, in commit order, never past a transaction still running."""
    category_filter = f"AND split_part(stream_name, '{SEPARATOR}', 1) = ANY($4::text[])" if categories else ""
    args: list[Any] = [after.transaction_id, after.global_position, limit]
    if categories:
        args.append(list(categories))
    rows = await con.fetch(
        f"""SELECT {_COLUMNS} FROM events
            WHERE (transaction_id, global_position) > ($1::xid8, $2::bigint)
              AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
              {category_filter}
            ORDER BY transaction_id, global_position
            LIMIT $3""",
        *args,
    )
    return [_recorded(r) for r in rows]


async def load_checkpoint(con: asyncpg.Connection, name: str, *, for_update: bool = False) -> Checkpoint:
    """The reader's checkpoint; FOR UPDATE serialises two readers of one name (a leader hand-over)."""
    await con.execute("INSERT INTO checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING", name)
    row = await con.fetchrow(
        "SELECT transaction_id, global_position FROM checkpoints WHERE name = $1"
        + (" FOR UPDATE" if for_update else ""),
        name,
    )
    return Checkpoint(row["transaction_id"], row["global_position"])


async def save_checkpoint(con: asyncpg.Connection, name: str, checkpoint: Checkpoint) -> None:
    await con.execute(
        """INSERT INTO checkpoints (name, transaction_id, global_position, updated_at)
           VALUES ($1, $2, $3, now())
           ON CONFLICT (name) DO UPDATE SET transaction_id = $2, global_position = $3, updated_at = now()""",
        name,
        checkpoint.transaction_id,
        checkpoint.global_position,
    )


async def find_event(con: asyncpg.Connection, event_id: uuid.UUID) -> RecordedEvent | None:
    row = await con.fetchrow(f"SELECT {_COLUMNS} FROM events WHERE id = $1", event_id)
    return _recorded(row) if row else None


class Lag(msgspec.Struct, frozen=True, kw_only=True):
    """How far a reader in commit order is behind: events past its checkpoint (counted up to a cap)
    and the age of the oldest of them, by the database's clock (0 when caught up)."""

    behind: int
    behind_capped: bool  # `behind` is the cap: there are at least that many
    oldest_age_s: float


async def lag(
    con: asyncpg.Connection, name: str, categories: tuple[str, ...] | None = None, cap: int = 10_000
) -> Lag:
    """The lag of the reader checkpointed as `name` (reading only `categories`, if given): one index
    range scan per category from the checkpoint, stopping at `cap` events, cheap enough for a
    readiness probe. Counts every event visible past the checkpoint, so a long transaction holding
    readers back shows as lag."""
    row = await con.fetchrow("SELECT transaction_id, global_position FROM checkpoints WHERE name = $1", name)
    after = (row["transaction_id"], row["global_position"]) if row else (0, 0)
    # Every scan is ORDER BY the index's order with a LIMIT, so that the planner walks the index from
    # the checkpoint (a generic plan guessed a third of the table past it and scanned all of it).
    past = "(transaction_id, global_position) > ($1::xid8, $2::bigint)"
    if categories:
        category = f"split_part(stream_name, '{SEPARATOR}', 1)"
        found = await con.fetchrow(
            f"""SELECT least(sum(o.behind), $4)::int AS behind, extract(epoch FROM now() - min(o.oldest)) AS age
                FROM unnest($3::text[]) AS c(name) CROSS JOIN LATERAL (
                    SELECT count(*) AS behind, min(created_at) AS oldest
                    FROM (SELECT created_at FROM events WHERE {category} = c.name AND {past}
                          ORDER BY transaction_id, global_position LIMIT $4) e) o""",
            *after, list(categories), cap,
        )
    else:
        found = await con.fetchrow(
            f"""SELECT count(*)::int AS behind, extract(epoch FROM now() - min(created_at)) AS age
                FROM (SELECT created_at FROM events WHERE {past}
                      ORDER BY transaction_id, global_position LIMIT $3) e""",
            *after, cap,
        )
    behind = found["behind"]
    return Lag(behind=behind, behind_capped=behind >= cap, oldest_age_s=max(0.0, float(found["age"] or 0)))
