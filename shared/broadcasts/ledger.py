"""The ledger read across a tenant's broadcasts: its messages newest first, filtered, a page at a
time from a cursor; and one message by its id.

`messages` has no tenant_id: every read is scoped by the tenant's runs or by each row's broadcast
(a join on its primary key), so another tenant's broadcast or contact id given as a filter matches
nothing. Messages of deleted broadcasts stay in the ledger and are listed: they were sent.

Order and time: `recorded_at`, when the ledger recorded the message (029_messages_reads.sql),
newest first, ties by the ledger key descending. It exists for every status and never changes,
so a cursor holds its place while sends and receipts update the rows around it. Only ledger rows
are listed: recipients whose batch has not been attempted yet are in the broadcast's own records
(shared/broadcasts/messages.py), not here.

How a page is read (measured on 10M rows, 190k broadcasts, a tenant with 100k broadcasts and 100k runs):
- through the tenant's runs (`runs_tenant`), each run's rows by the ledger's primary key, sorted:
  for a tenant whose runs hold at most SMALL_LEDGER rows (2 ms for 1,000 rows a year old), for a
  broadcast_id (that broadcast's rows: 10 ms for 4,000), and for a contact_id (a probe per run:
  0.3 ms for a few hundred runs, 280 ms for 100,000; an index on contact_id would make it 0.1 ms,
  but cost every message sent twice what the time index does, see 029_messages_reads.sql);
- otherwise down the time index (`messages_recorded`) from the cursor, each row's broadcast checked:
  5 ms for a page of 100, any page deep, and the same with since/until; a rare status walks past
  the others (12 ms for `failed` at 1%). The walk costs every newer message of every tenant, so a
  large ledger whose messages are older than most of everyone's could take seconds: it is cut off
  at WALK_TIMEOUT_MS, and since/until or a filter above make it short.
"""
from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import msgspec

from shared.kernel.content import CHANNELS
from shared.kernel.errors import Invalid

MAX_PAGE = 500


class MessageKey(msgspec.Struct, frozen=True):
    """The ledger's primary key: one recipient's message on one channel in one run."""

    broadcast_id: uuid.UUID
    run: int
    contact_id: int
    channel: str


class LedgerMessage(msgspec.Struct, frozen=True, kw_only=True):
    broadcast_id: uuid.UUID
    run: int
    contact_id: int
    channel: str
    address: str
    status: str
    attempts: int
    error: str | None
    provider_message_id: str | None
    recorded_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None
    read_at: datetime | None
    # Engagement (message_engagement, 027): absent until an open or click was recorded.
    opened_at: datetime | None
    clicked_at: datetime | None
    opens: int
    clicks: int

    @property
    def key(self) -> MessageKey:
        return MessageKey(self.broadcast_id, self.run, self.contact_id, self.channel)


class Filters(msgspec.Struct, frozen=True, kw_only=True):
    broadcast_id: uuid.UUID | None = None
    contact_id: int | None = None
    channel: str | None = None
    status: str | None = None
    since: datetime | None = None  # recorded at or after
    until: datetime | None = None  # recorded before


# ---- ids and cursors: opaque, URL-safe, reversible (not signed: they name rows the tenant may read anyway) ----

_ID_V1, _CURSOR_V1 = 1, 2
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
_CHANNEL_CODES = {c: i for i, c in enumerate(CHANNELS)}  # a byte per channel; never reorder, only append


def _pack_key(key: MessageKey) -> bytes:
    return (key.broadcast_id.bytes + key.run.to_bytes(4, "big") + key.contact_id.to_bytes(8, "big")
            + bytes([_CHANNEL_CODES[key.channel]]))


def _unpack_key(raw: bytes) -> MessageKey | None:
    if len(raw) != 29 or raw[28] >= len(CHANNELS):
        return None
    run, contact_id = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:28], "big")
    if not (0 < run < 2**31 and 0 < contact_id < 2**63):
        return None
    return MessageKey(uuid.UUID(bytes=raw[:16]), run, contact_id, CHANNELS[raw[28]])


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str, size: int) -> bytes | None:
    """The bytes of an unpadded base64url string of `size` bytes, or None if it is not one."""
    if len(text) != (size * 4 + 2) // 3 or not text.isascii():
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size and _b64(raw) == text else None  # one spelling per id


def message_id(key: MessageKey) -> str:
    """The message's id in the API: its ledger key, 40 URL-safe characters."""
    return _b64(bytes([_ID_V1]) + _pack_key(key))


def parse_message_id(text: str) -> MessageKey | None:
    """The ledger key a message id names, or None if the text is not an id this API gives out."""
    raw = _unb64(text, 30)
    if raw is None or raw[0] != _ID_V1:
        return None
    return _unpack_key(raw[1:])


def cursor_after(message: LedgerMessage) -> str:
    """Where the page after `message` starts: its time and key."""
    at = (message.recorded_at - _EPOCH) // _MICROSECOND
    return _b64(bytes([_CURSOR_V1]) + at.to_bytes(8, "big", signed=True) + _pack_key(message.key))


def parse_cursor(text: str) -> tuple[datetime, MessageKey]:
    """The position a cursor names; Invalid("cursor") if it is not one this API gave out."""
    raw = _unb64(text, 38)
    key = _unpack_key(raw[9:]) if raw is not None and raw[0] == _CURSOR_V1 else None
    if raw is None or key is None:
        raise Invalid("cursor", "not a cursor from this API: give the `next_cursor` of the page before")
    try:
        at = _EPOCH + int.from_bytes(raw[1:9], "big", signed=True) * _MICROSECOND
    except OverflowError:
        raise Invalid("cursor", "not a cursor from this API: give the `next_cursor` of the page before") from None
    return at, key


# ---- reads ----

_COLUMNS = """m.broadcast_id, m.run, m.contact_id, m.channel, m.address, m.status, m.attempts::int, m.error,
              m.provider_message_id, m.recorded_at, m.sent_at, m.delivered_at, m.read_at,
              e.opened_at, e.clicked_at, coalesce(e.opens, 0) AS opens, coalesce(e.clicks, 0) AS clicks"""
_ENGAGEMENT = """LEFT JOIN message_engagement e ON e.broadcast_id = m.broadcast_id AND e.run = m.run
                                                AND e.contact_id = m.contact_id AND e.channel = m.channel"""
_NEWEST_FIRST = "m.recorded_at DESC, m.broadcast_id DESC, m.run DESC, m.contact_id DESC, m.channel DESC"
# A tenant whose runs hold at most this many ledger rows (runs.recipients + skipped, read from at most
# SMALL_RUNS of its runs) is read run by run and sorted: a few milliseconds, wherever in time its
# messages are. Walking the time index instead costs every newer message of every tenant.
SMALL_LEDGER, SMALL_RUNS = 50_000, 1_000
# The walk of the time index is bounded (see page()): past this, a 503 that asks for a narrower read.
WALK_TIMEOUT_MS = 5_000


class SqlArgs:
    def __init__(self, first: Any) -> None:
        self.values: list[Any] = [first]

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _conditions(filters: Filters, cursor: tuple[datetime, MessageKey] | None, args: SqlArgs) -> list[str]:
    """The filters given and the cursor, on messages `m` (only those given: a prepared `$2 IS NULL OR ...`
    may be planned once for any value, and then uses no index)."""
    where = []
    for column in ("broadcast_id", "contact_id", "channel", "status"):
        if (value := getattr(filters, column)) is not None:
            where.append(f"m.{column} = {args.add(value)}")
    if filters.since is not None:
        where.append(f"m.recorded_at >= {args.add(filters.since)}")
    if filters.until is not None:
        where.append(f"m.recorded_at < {args.add(filters.until)}")
    if cursor is not None:
        at, key = cursor
        where.append(f"(m.recorded_at, m.broadcast_id, m.run, m.contact_id, m.channel) < ({args.add(at)}, "
                     f"{args.add(key.broadcast_id)}, {args.add(key.run)}, {args.add(key.contact_id)}, {args.add(key.channel)})")
    return where


def run_by_run_sql(tenant_id: uuid.UUID, filters: Filters, cursor: tuple[datetime, MessageKey] | None,
                   limit: int) -> tuple[str, list[Any]]:
    """The page read through the tenant's runs (`runs_tenant`, every run that has ledger rows): each
    run's rows by the ledger's primary key (its broadcast and run, and the contact when filtered by
    one), then sorted. Costs the rows of the tenant's runs (those of one broadcast with broadcast_id;
    a probe per run with contact_id)."""
    args = SqlArgs(tenant_id)
    runs = "r.tenant_id = $1" + (f" AND r.broadcast_id = {args.add(filters.broadcast_id)}"
                                 if filters.broadcast_id is not None else "")
    where = ["m.broadcast_id = r.broadcast_id", "m.run = r.run", *_conditions(filters, cursor, args)]
    # OFFSET 0 keeps the subquery per run: the run's key goes into the index condition, whatever the
    # statistics say (else a contact's rows may be found by skipping through every tenant's runs).
    return (f"""SELECT {_COLUMNS} FROM runs r
                CROSS JOIN LATERAL (SELECT * FROM messages m WHERE {' AND '.join(where)} OFFSET 0) m
                {_ENGAGEMENT}
                WHERE {runs} ORDER BY {_NEWEST_FIRST} LIMIT {args.add(limit + 1)}""", args.values)


def time_walk_sql(tenant_id: uuid.UUID, filters: Filters, cursor: tuple[datetime, MessageKey] | None,
                  limit: int) -> tuple[str, list[Any]]:
    """The page read down the time index (`messages_recorded`) from the cursor, each row's broadcast
    checked to be the tenant's, until the page is full: costs every message in between, of any tenant."""
    args = SqlArgs(tenant_id)
    where = ["b.tenant_id = $1", *_conditions(filters, cursor, args)]
    return (f"""SELECT {_COLUMNS} FROM messages m JOIN broadcasts b ON b.id = m.broadcast_id
                {_ENGAGEMENT}
                WHERE {' AND '.join(where)} ORDER BY {_NEWEST_FIRST} LIMIT {args.add(limit + 1)}""", args.values)


class WalkTooLong(Exception):
    """The time index walk took longer than WALK_TIMEOUT_MS: a narrower read is needed."""


async def page(
    con: asyncpg.Connection, tenant_id: uuid.UUID, filters: Filters, limit: int, cursor: str | None = None,
) -> tuple[list[LedgerMessage], str | None]:
    """Up to `limit` of the tenant's messages that pass `filters`, newest first, from `cursor` on;
    and the cursor of the next page (None when this one is the last). Invalid("cursor") for a
    cursor this API did not give out; WalkTooLong when the read was cut off."""
    position = parse_cursor(cursor) if cursor is not None else None
    if filters.broadcast_id is not None or filters.contact_id is not None or await _small(con, tenant_id):
        rows = await con.fetch(*_flat(run_by_run_sql(tenant_id, filters, position, limit)))
    else:
        try:
            async with con.transaction():
                await con.execute(f"SET LOCAL statement_timeout = {WALK_TIMEOUT_MS}")
                rows = await con.fetch(*_flat(time_walk_sql(tenant_id, filters, position, limit)))
        except asyncpg.QueryCanceledError:
            raise WalkTooLong() from None
    found = [LedgerMessage(**dict(r)) for r in rows[:limit]]
    return found, cursor_after(found[-1]) if len(rows) > limit else None


def _flat(query: tuple[str, list[Any]]) -> tuple[Any, ...]:
    return query[0], *query[1]


async def _small(con: asyncpg.Connection, tenant_id: uuid.UUID) -> bool:
    """Whether the tenant's ledger is small enough to read run by run (reads at most SMALL_RUNS runs)."""
    runs, rows = await con.fetchrow(
        "SELECT count(*), coalesce(sum(recipients + skipped), 0) FROM "
        "(SELECT recipients, skipped FROM runs WHERE tenant_id = $1 LIMIT $2) r",
        tenant_id, SMALL_RUNS + 1)
    return runs <= SMALL_RUNS and rows <= SMALL_LEDGER


async def get(con: asyncpg.Connection, tenant_id: uuid.UUID, key: MessageKey) -> LedgerMessage | None:
    """One of the tenant's messages by its ledger key; None for another tenant's, as for a missing one."""
    row = await con.fetchrow(
        f"""SELECT {_COLUMNS} FROM messages m JOIN broadcasts b ON b.id = m.broadcast_id {_ENGAGEMENT}
            WHERE m.broadcast_id = $2 AND m.run = $3 AND m.contact_id = $4 AND m.channel = $5 AND b.tenant_id = $1""",
        tenant_id, key.broadcast_id, key.run, key.contact_id, key.channel,
    )
    return LedgerMessage(**dict(row)) if row else None
