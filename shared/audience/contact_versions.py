"""A contact's former data (migration 031 keeps it): what GET /v1/messages/{id} renders an older
message with. Kept CONTACT_VERSIONS_KEPT_DAYS; the housekeeping task drops what is older."""
from __future__ import annotations

import asyncpg

from shared.kernel.limits import CONTACT_VERSIONS_KEPT_DAYS

# A batch per statement: a sweep after a long outage never holds one huge delete.
_SWEEP_BATCH = 10_000


def as_recorded_sql(contact_sql: str) -> str:
    """SQL: the contact `c` as it was when something recorded at $3 was made from it: its first
    version that ended after $3, else the contact as it is ($1 tenant, $2 contact id); no row if
    it was erased. `contact_sql` is the SELECT list over `c`."""
    return f"""
        SELECT {contact_sql} FROM (
            SELECT 0 AS pick, v.contact FROM (
                SELECT v.contact FROM contact_versions v
                WHERE v.contact_id = $2 AND v.tenant_id = $1 AND v.valid_until > $3
                ORDER BY v.valid_until, v.seq LIMIT 1) v
            UNION ALL
            SELECT 1, to_jsonb(now_) FROM contacts now_ WHERE now_.id = $2 AND now_.tenant_id = $1
        ) v, jsonb_populate_record(NULL::contacts, v.contact) c
        ORDER BY v.pick LIMIT 1"""


def exact_since_sql() -> str:
    """SQL: the oldest recording time whose contact data is still kept exactly."""
    return f"now() - interval '{CONTACT_VERSIONS_KEPT_DAYS} days'"


async def sweep(con: asyncpg.Connection) -> int:
    """Drop versions older than the retention; the number dropped."""
    dropped = 0
    while True:
        status = await con.execute(
            f"""DELETE FROM contact_versions WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM contact_versions WHERE valid_until < {exact_since_sql()} LIMIT {_SWEEP_BATCH}))""")
        count = int(status.split()[-1])
        dropped += count
        if count < _SWEEP_BATCH:
            return dropped
