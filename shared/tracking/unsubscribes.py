"""An unsubscribe from a broadcast's message, and its count in `engagement_counters.unsubscribed`.

What counts: the unsubscribe that makes the contact's suppression (its contact and address on the
code's channel, reason `unsubscribed`), once: the same link again, or the link of another broadcast
while the contact is still suppressed, makes nothing and counts nothing. Whether it was made comes
from the suppression's insert itself (shared.audience.suppressions), so two requests at once (a
mailbox provider's one-click POST and the person's own) count one.

Where it counts: the code names the broadcast and channel, not the run, so it counts for the
broadcast's latest run whose ledger has a message to the contact on that channel that went out
or may have (`sending`, `sent`, `unknown`). A recurring broadcast's older mail thus counts for its
latest run to that contact. No such message (a test send's link, or one never sent): suppressed all
the same, counted nowhere. The suppression and the count are one transaction.
"""
from __future__ import annotations

import uuid

import asyncpg

from shared.audience import suppressions

# The run: a probe of the ledger's primary key per run of the broadcast (a broadcast has few runs;
# the ledger has a row per recipient and run).
_COUNT = """
WITH latest AS (
    SELECT max(r.run) AS run FROM runs r
    WHERE r.broadcast_id = $1 AND r.tenant_id = $4 AND EXISTS (
        SELECT FROM messages m WHERE m.broadcast_id = r.broadcast_id AND m.run = r.run AND m.contact_id = $2
                                 AND m.channel = $3 AND m.status IN ('sending', 'sent', 'unknown'))
)
INSERT INTO engagement_counters AS ec (broadcast_id, run, channel, unsubscribed)
SELECT $1, run, $3, 1 FROM latest WHERE run IS NOT NULL
ON CONFLICT (broadcast_id, run, channel) DO UPDATE SET unsubscribed = ec.unsubscribed + 1
RETURNING run
"""


async def unsubscribe(
    con: asyncpg.Connection, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, contact_id: int, channel: str,
    address_sql: str | None,
) -> int | None:
    """Suppress the contact and its address on the channel (shared.audience.suppressions.unsubscribe)
    and count a first unsubscribe (see the module). The run it counted for, else None (not the
    first, no such message, or the contact is gone: then nothing is written)."""
    async with con.transaction():
        if not await suppressions.unsubscribe(con, tenant_id, broadcast_id, contact_id, channel, address_sql):
            return None
        return await con.fetchval(_COUNT, broadcast_id, contact_id, channel, tenant_id)
