"""Receipts held because they named no message yet (migration 032), applied again: each time the
housekeeping ticks (EARLY_RECEIPTS_EVERY_S), the oldest held ones, per tenant and channel in the
order they came, as the receipts endpoint applies them (shared/tracking/receipts.py). Those that
now name a message are done; those older than EARLY_RECEIPT_TTL_S are dropped."""
from __future__ import annotations

import uuid
from collections import defaultdict

import asyncpg
import msgspec

from shared.tracking import receipts
from shared.tracking.receipt_statuses import Receipt

EARLY_RECEIPTS_EVERY_S = 2.0
# Long past any sender's moment between a provider's answer and its ledger row, short enough that
# another system's receipts on a shared account do not pile up.
EARLY_RECEIPT_TTL_S = 600
_BATCH = 1000  # held receipts applied per tick: a bound on one transaction


class Retried(msgspec.Struct, frozen=True, kw_only=True):
    applied: int  # held receipts that found their message and were applied
    expired: int  # held receipts dropped: still nothing after EARLY_RECEIPT_TTL_S


async def apply_again(con: asyncpg.Connection) -> Retried:
    """One pass over the oldest held receipts, in one transaction (SKIP LOCKED: two passes at once
    take different ones)."""
    async with con.transaction():
        expired = int((await con.execute(
            f"DELETE FROM early_receipts WHERE received_at < now() - interval '{EARLY_RECEIPT_TTL_S} seconds'")
        ).split()[-1])
        rows = await con.fetch(
            "SELECT id, tenant_id, channel, receipt::text AS receipt FROM early_receipts ORDER BY id LIMIT $1 "
            "FOR UPDATE SKIP LOCKED", _BATCH)
        groups: dict[tuple[uuid.UUID, str], list[tuple[int, Receipt]]] = defaultdict(list)
        for row in rows:
            groups[(row["tenant_id"], row["channel"])].append(
                (row["id"], msgspec.json.decode(row["receipt"], type=Receipt)))
        done: list[int] = []
        for (tenant_id, channel), held in groups.items():
            found = await receipts.apply_held(con, tenant_id, channel, [r for _, r in held])
            done += [i for i, r in held if r.provider_message_id in found]
        if done:
            await con.execute("DELETE FROM early_receipts WHERE id = ANY($1::bigint[])", done)
    return Retried(applied=len(done), expired=expired)
