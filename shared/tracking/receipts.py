"""Delivery receipts (a Postgres adapter): a provider's statuses applied to the ledger, counted in
engagement_counters, and hard bounces and complaints suppressed, all of one request in one
transaction.

Matching. A receipt names its message by the provider's id, scoped to the tenant of the provider
the receipt came to (messages has no tenant_id: its broadcast has). Twilio's SID and WhatsApp's
wamid are found through the partial index messages_provider_message_id (migration 028), which
holds only sms and whatsapp rows: email, push, telegram and webhook sends pay nothing for it. An
email needs no index: the Message-ID Crier sets (shared/channels/smtp.py, message_id_of) is the
ledger key itself, `<broadcast.run.contact.channel@crier>`, so its row is one probe of the primary
key, and it must also be that row's provider_message_id (so it was really sent with that id).

Statements, whatever the number of statuses: the rows, locked in key order (two requests about
the same messages wait for each other instead of deadlocking); then one UPDATE of the rows that
moved, the suppressions, and last the counters (a broadcast's counter row is what concurrent
requests contend for, so it is held the shortest). What a row's receipts do is decided in Python
(receipt_statuses.fold), in the order they came.

A receipt that matches no row changes nothing then, and is held (migration 032) if it may be
one of ours: a message whose outcome the sender has not written yet (a provider that reports
within moments of its API's answer) is found when the housekeeping applies it again
(shared/tracking/early_receipts.py). An email id Crier did not set is not held; a Twilio SID or
a wamid of another system on the same account is, until it expires.
"""
from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence

import asyncpg
import msgspec

from shared.audience import suppressions
from shared.audience.erasure import ERASED
from shared.channels import accounts
from shared.tracking.receipt_statuses import (
    HANDED_OVER,
    LedgerState,
    Moved,
    Receipt,
    fold,
)

# The provider kinds that take receipts, and the config field (a sealed secret) that verifies them.
VERIFIED_BY: dict[str, str] = {"twilio": "auth_token", "whatsapp_cloud": "app_secret", "smtp": "receipt_secret"}
# The channels whose ledger rows the provider_message_id index holds (its predicate, migration 028).
INDEXED_CHANNELS = ("sms", "whatsapp")
EMAIL_ID_DOMAIN = "@crier"
_ATTEMPTS = 3  # a deadlock (with an erasure, say) is retried
MAX_EARLY_RECEIPTS = 10_000  # held per tenant (migration 032); past it, a receipt that names nothing is dropped


class Applied(msgspec.Struct, frozen=True, kw_only=True):
    received: int  # receipts in the request that say something (statuses the ledger takes)
    matched: int  # ledger rows they name, of this tenant, that were handed over
    moved: int  # of those, rows whose status or times changed
    held: int = 0  # receipts that named no row yet, held to be applied again


class LedgerKey(msgspec.Struct, frozen=True):
    broadcast_id: uuid.UUID
    run: int
    contact_id: int
    channel: str


async def receipt_provider(con: asyncpg.Connection, provider_id: uuid.UUID) -> accounts.ProviderRow | None:
    """The live provider `provider_id` if its kind takes receipts (secrets opened), else None.
    Raises ProviderSecretsUnreadable when its secrets open with no key of this deployment."""
    row = await accounts.find(con, provider_id)
    return row if row is not None and row.kind in VERIFIED_BY else None


def email_ledger_key(provider_message_id: str) -> LedgerKey | None:
    """The ledger key in a Message-ID Crier set (without angle brackets), None for any other id."""
    local, at, domain = provider_message_id.rpartition("@")
    if not at or "@" + domain != EMAIL_ID_DOMAIN:
        return None
    parts = local.split(".")
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit() or len(parts[1]) > 9 or len(parts[2]) > 18:
        return None
    try:
        broadcast_id = uuid.UUID(parts[0])
    except ValueError:
        return None
    return LedgerKey(broadcast_id, int(parts[1]), int(parts[2]), parts[3])


_COLUMNS = "m.broadcast_id, m.run, m.contact_id, m.channel, m.address, m.provider_message_id, m.status, " \
           "m.delivered_at, m.read_at, m.error"
_LOCK = "ORDER BY m.broadcast_id, m.run, m.contact_id, m.channel FOR UPDATE OF m"

# By provider id: `m.channel IN (...)` repeats the index's predicate, so the planner sees it holds.
_BY_PROVIDER_ID = f"""
SELECT {_COLUMNS} FROM messages m JOIN broadcasts b ON b.id = m.broadcast_id
WHERE m.provider_message_id = ANY($2::text[]) AND m.channel IN ({", ".join(f"'{c}'" for c in INDEXED_CHANNELS)})
  AND m.channel = $3 AND b.tenant_id = $1 AND m.status = ANY($4::text[])
{_LOCK}"""

_BY_KEY = f"""
SELECT {_COLUMNS}
FROM unnest($2::uuid[], $3::int[], $4::bigint[], $5::text[]) AS k(broadcast_id, run, contact_id, provider_message_id)
JOIN messages m ON m.broadcast_id = k.broadcast_id AND m.run = k.run AND m.contact_id = k.contact_id
               AND m.channel = $6 AND m.provider_message_id = k.provider_message_id
JOIN broadcasts b ON b.id = m.broadcast_id
WHERE b.tenant_id = $1 AND m.status = ANY($7::text[])
{_LOCK}"""

_UPDATE = """
UPDATE messages m SET status = u.status, delivered_at = u.delivered_at, read_at = u.read_at, error = u.error
FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[],
            $8::text[]) AS u(broadcast_id, run, contact_id, channel, status, delivered_at, read_at, error)
WHERE m.broadcast_id = u.broadcast_id AND m.run = u.run AND m.contact_id = u.contact_id AND m.channel = u.channel
"""

_COUNT = """
INSERT INTO engagement_counters AS e (broadcast_id, run, channel, delivered, read, bounced, complained)
SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::int[], $5::int[], $6::int[], $7::int[])
ON CONFLICT (broadcast_id, run, channel) DO UPDATE
SET delivered = e.delivered + excluded.delivered, read = e.read + excluded.read,
    bounced = e.bounced + excluded.bounced, complained = e.complained + excluded.complained
"""


async def apply_receipts(
    con: asyncpg.Connection, tenant_id: uuid.UUID, channel: str, receipts: Sequence[Receipt]
) -> Applied:
    """Apply one request's receipts (in the order they came) to the tenant's messages on `channel`,
    in one transaction: the ledger, the engagement counters, and the suppressions of hard bounces
    and complaints; those that name no message yet are held (see the module). Applying the same
    receipts again changes nothing."""
    applied, _ = await _in_transaction(con, tenant_id, channel, receipts, hold=True)
    return applied


async def apply_held(
    con: asyncpg.Connection, tenant_id: uuid.UUID, channel: str, receipts: Sequence[Receipt]
) -> set[str]:
    """Apply held receipts again as apply_receipts does, holding nothing: the provider message ids
    that named a message this time."""
    _, found = await _in_transaction(con, tenant_id, channel, receipts, hold=False)
    return found


async def _in_transaction(
    con: asyncpg.Connection, tenant_id: uuid.UUID, channel: str, receipts: Sequence[Receipt], *, hold: bool
) -> tuple[Applied, set[str]]:
    if not receipts:
        return Applied(received=0, matched=0, moved=0), set()
    by_id: dict[str, list[Receipt]] = defaultdict(list)
    for receipt in receipts:
        by_id[receipt.provider_message_id].append(receipt)
    for attempt in range(_ATTEMPTS):
        try:
            async with con.transaction():
                return await _apply(con, tenant_id, channel, by_id, len(receipts), hold)
        except asyncpg.DeadlockDetectedError:
            if attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def _rows(
    con: asyncpg.Connection, tenant_id: uuid.UUID, channel: str, ids: list[str]
) -> list[asyncpg.Record]:
    if channel in INDEXED_CHANNELS:
        return await con.fetch(_BY_PROVIDER_ID, tenant_id, ids, channel, list(HANDED_OVER))
    keyed = [(key, i) for i in ids if (key := email_ledger_key(i)) is not None and key.channel == channel]
    if not keyed:
        return []
    return await con.fetch(
        _BY_KEY, tenant_id, [k.broadcast_id for k, _ in keyed], [k.run for k, _ in keyed],
        [k.contact_id for k, _ in keyed], [i for _, i in keyed], channel, list(HANDED_OVER))


async def _apply(
    con: asyncpg.Connection, tenant_id: uuid.UUID, channel: str, by_id: dict[str, list[Receipt]], received: int,
    hold: bool,
) -> tuple[Applied, set[str]]:
    rows = await _rows(con, tenant_id, channel, list(by_id))
    found = {row["provider_message_id"] for row in rows}
    moved: list[tuple[asyncpg.Record, Moved]] = []
    for row in rows:
        state = LedgerState(status=row["status"], delivered_at=row["delivered_at"], read_at=row["read_at"],
                            error=row["error"])
        if (change := fold(state, by_id[row["provider_message_id"]])) is not None:
            moved.append((row, change))
    if moved:
        await con.execute(_UPDATE, *_columns([
            (r["broadcast_id"], r["run"], r["contact_id"], r["channel"], m.state.status, m.state.delivered_at,
             m.state.read_at, m.state.error) for r, m in moved]))
        if suppressed := _suppressions(moved):
            await suppressions.add_suppressions(con, tenant_id, suppressed)
        await con.execute(_COUNT, *_columns(_counts(moved)))
    held = 0
    if hold and (early := [r for i, rs in by_id.items() if i not in found and _may_be_ours(channel, i) for r in rs]):
        held = await con.fetchval(_HOLD, tenant_id, channel, early, MAX_EARLY_RECEIPTS)  # jsonb: msgspec encodes
    return Applied(received=received, matched=len(rows), moved=len(moved), held=held), found


# Up to the tenant's room: all of them or none (a request's receipts are applied together). One
# held already (a replay of the request) is not held twice.
_HOLD = """
WITH room AS (SELECT $4 - count(*) AS left FROM early_receipts WHERE tenant_id = $1),
held AS (
    INSERT INTO early_receipts (tenant_id, channel, receipt)
    SELECT $1, $2, u.r FROM unnest($3::jsonb[]) WITH ORDINALITY AS u(r, ord), room
    WHERE room.left >= cardinality($3::jsonb[])
      AND NOT EXISTS (SELECT FROM early_receipts e WHERE e.tenant_id = $1 AND e.channel = $2 AND e.receipt = u.r)
    ORDER BY ord
    RETURNING 1
)
SELECT count(*) FROM held"""


def _may_be_ours(channel: str, provider_message_id: str) -> bool:
    """Whether a row may yet carry this id: on an indexed channel any id (a SID is given out by the
    provider), on email only a Message-ID Crier set for that channel."""
    if channel in INDEXED_CHANNELS:
        return True
    key = email_ledger_key(provider_message_id)
    return key is not None and key.channel == channel


def _columns(rows: list[tuple]) -> list[list]:
    return [list(column) for column in zip(*rows)]


def _counts(moved: list[tuple[asyncpg.Record, Moved]]) -> list[tuple]:
    """The counters to add, per broadcast, run and channel, in key order (so that concurrent
    requests lock counter rows in the same order)."""
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for row, m in moved:
        total = counts[(row["broadcast_id"], row["run"], row["channel"])]
        for i, n in enumerate((m.delivered, m.read, m.bounced, m.complained)):
            total[i] += n
    return [(*key, *total) for key, total in sorted(counts.items())]


def _suppressions(moved: list[tuple[asyncpg.Record, Moved]]) -> list[suppressions.NewSuppression]:
    """A hard bounce suppresses the address the message went to (as the sender buries a dead one); a
    complaint, the person too (the contact and the address, as an unsubscribe does). An erased
    contact's row no longer knows its address, and its contact id is never reused: nothing to do."""
    items = []
    for row, m in moved:
        if m.suppress is None or row["address"] == ERASED:
            continue
        items.append(suppressions.NewSuppression(
            channel=row["channel"], reason=m.suppress, broadcast_id=row["broadcast_id"],
            address=suppressions.normal_address(row["channel"], row["address"]),
            contact_id=row["contact_id"] if m.suppress == "complained" else None,
        ))
    return items
