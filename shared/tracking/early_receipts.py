"""Receipts held because they named no message yet (migration 032), applied again: each time the
housekeeping ticks (EARLY_RECEIPTS_EVERY_S), up to PER_TENANT of each tenant's held receipts (see
_TAKE for which), per tenant and channel as the receipts endpoint applies them
(shared/tracking/receipts.py). Those that now name a message are done; those older than
EARLY_RECEIPT_TTL_S are dropped."""
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
PER_TENANT = 200  # held receipts of one tenant tried per pass: its share
TENANTS_PER_PASS = 50  # with PER_TENANT, at most 10,000 receipts in a pass's transaction


class Retried(msgspec.Struct, frozen=True, kw_only=True):
    applied: int  # held receipts that found their message and were applied
    expired: int  # held receipts dropped: still nothing after EARLY_RECEIPT_TTL_S


async def apply_again(con: asyncpg.Connection) -> Retried:
    """One pass, in one transaction (SKIP LOCKED: two passes at once take different receipts)."""
    async with con.transaction():
        expired = int((await con.execute(
            f"DELETE FROM early_receipts WHERE received_at < now() - interval '{EARLY_RECEIPT_TTL_S} seconds'")
        ).split()[-1])
        rows = await con.fetch(_TAKE, PER_TENANT)
        groups: dict[tuple[uuid.UUID, str], list[tuple[int, Receipt]]] = defaultdict(list)
        for row in rows:
            groups[(row["tenant_id"], row["channel"])].append(
                (row["id"], msgspec.json.decode(row["receipt"], type=Receipt)))
        done: set[int] = set()
        for (tenant_id, channel), held in groups.items():
            found = await receipts.apply_held(con, tenant_id, channel, [r for _, r in held])
            done.update(i for i, r in held if r.provider_message_id in found)
        if done:
            await con.execute("DELETE FROM early_receipts WHERE id = ANY($1::bigint[])", list(done))
        if tried := [row["id"] for row in rows if row["id"] not in done]:
            await con.execute("UPDATE early_receipts SET tried_at = now() WHERE id = ANY($1::bigint[])", tried)
    return Retried(applied=len(done), expired=expired)


# Each tenant's share: the untried first, newest first (a receipt just held is the likeliest to
# find its message: it is being written), then the least recently tried; of TENANTS_PER_PASS
# tenants drawn at random when more hold receipts (a bound on a pass). Applied in the order they
# came (a message's receipts are folded in that order).
_TAKE = f"""
SELECT e.id, e.tenant_id, e.channel, e.receipt::text AS receipt
FROM (SELECT tenant_id FROM (SELECT DISTINCT tenant_id FROM early_receipts) d
      ORDER BY random() LIMIT {TENANTS_PER_PASS}) t,
LATERAL (SELECT x.id, x.tenant_id, x.channel, x.receipt FROM early_receipts x WHERE x.tenant_id = t.tenant_id
         ORDER BY x.tried_at NULLS FIRST, x.id DESC LIMIT $1 FOR UPDATE SKIP LOCKED) e
ORDER BY e.id"""
