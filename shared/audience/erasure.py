"""Erasing a contact (GDPR): the contact and its memberships go; the send history keeps the contact
id, with its addresses redacted; the counters stay as they were.

Where a contact's addresses are kept besides its row: the ledger (`messages.address`, and the
provider's error text, which may quote it) and the batches a run was planned into
(`batches.addresses`, parallel to `contact_ids`). Both are reached through the tenant's runs
(`runs_tenant`, 019_contacts_more.sql): a probe of the ledger's primary key (broadcast_id, run,
contact_id) per run, and the batches of each run by theirs, so nothing of another tenant is read.
"""
from __future__ import annotations

import uuid

import asyncpg
import msgspec

ERASED = "[erased]"  # what an erased address reads as

# The plan must be those probes whatever the statistics say (right after a send they may say the
# ledger is empty): a scan would read every tenant's ledger and batches.
_PROBES_ONLY = "SET LOCAL enable_seqscan = off"

# The run lock of shared.sending.snapshot.lock_run (this package sits below sending, so it spells the
# key itself; tests/test_contact_fields.py checks that the two exclude each other). Held, no planner
# is between reading this contact and writing it into a batch, and a planner that starts later
# finds it gone. Taken in one order, so two erasures never wait on each other in a circle.
_LOCK_RUNS_BEING_PLANNED = """
    SELECT pg_advisory_xact_lock(hashtextextended('run:' || r.broadcast_id || ':' || r.run, 0))
    FROM (SELECT broadcast_id, run FROM runs WHERE tenant_id = $1 AND NOT planned ORDER BY broadcast_id, run) r"""

# The rows to redact, found and locked: for each of the tenant's runs, one probe of the table's
# primary key (LATERAL: the run's key goes into the index condition, whatever the statistics say).
# Locked by this statement, the rows cannot change before the next one, which updates them by their
# ctid; a row a concurrent transaction changed first is waited for, and found as it then is.
_FIND_LEDGER_ROWS = """
    SELECT coalesce(array_agg(x.ctid), '{}') FROM runs r CROSS JOIN LATERAL (
        SELECT m.ctid FROM messages m
        WHERE m.broadcast_id = r.broadcast_id AND m.run = r.run AND m.contact_id = $2
        FOR NO KEY UPDATE) x
    WHERE r.tenant_id = $1"""
# Batches hold a run's recipients in contact-id order, but only reading `contact_ids` says which
# one holds the contact: the run's batches are read by key, never another tenant's.
_FIND_BATCHES = """
    SELECT coalesce(array_agg(x.ctid), '{}') FROM runs r CROSS JOIN LATERAL (
        SELECT bt.ctid FROM batches bt
        WHERE bt.broadcast_id = r.broadcast_id AND bt.run = r.run AND $2 = ANY(bt.contact_ids)
          AND cardinality(bt.addresses) >= array_position(bt.contact_ids, $2)
        FOR NO KEY UPDATE) x
    WHERE r.tenant_id = $1"""

# The batches' copies of the address: an element of `addresses` put to ERASED, the arrays staying
# parallel. A batch whose `addresses` is shorter (or empty) holds no copy to erase.
_REDACT_BATCHES = f"""
    UPDATE batches SET addresses[array_position(contact_ids, $2)] = '{ERASED}'
    WHERE ctid = ANY($1::tid[]) AND $2 = ANY(contact_ids)"""

# The ledger rows: the address, and the address wherever the error quotes it (an SMTP server's
# reply often does: "550 <ann@example.com>: no such user"), found ignoring case, as a literal.
_REDACT_LEDGER = rf"""
    UPDATE messages SET address = '{ERASED}',
           error = CASE WHEN error IS NULL OR address = '' THEN error
                        ELSE regexp_replace(error, regexp_replace(address, '([^A-Za-z0-9])', '\\\1', 'g'),
                                            '{ERASED}', 'gi') END
    WHERE ctid = ANY($1::tid[]) AND contact_id = $2"""

_ATTEMPTS = 3  # a deadlock with a sender's transaction (detected by Postgres) is retried


class Erased(msgspec.Struct, frozen=True, kw_only=True):
    ledger_rows: int  # ledger rows whose address was redacted
    batches: int  # batches whose copy of the address was redacted


async def erase_contact(con: asyncpg.Connection, tenant_id: uuid.UUID, contact_id: int) -> Erased | None:
    """Erase the tenant's contact in one transaction: its ledger rows keep the contact id (counters
    and history still add up) with the address redacted, the batches' copies of the address are
    redacted, and the contact and its memberships are deleted (the lists' counts follow). None if
    the contact is not the tenant's."""
    for attempt in range(_ATTEMPTS):
        try:
            return await _erase(con, tenant_id, contact_id)
        except asyncpg.DeadlockDetectedError:
            if attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def _erase(con: asyncpg.Connection, tenant_id: uuid.UUID, contact_id: int) -> Erased | None:
    async with con.transaction():
        await con.execute(_PROBES_ONLY)
        # Locked first: an upsert or PATCH of this contact waits, then finds it gone.
        if not await con.fetchval(
            "SELECT true FROM contacts WHERE id = $1 AND tenant_id = $2 FOR UPDATE", contact_id, tenant_id
        ):
            return None
        await con.fetch(_LOCK_RUNS_BEING_PLANNED, tenant_id)
        # Batches before the ledger: a worker finishing a batch locks the batch row, then writes its ledger.
        batches = await con.fetchval(_FIND_BATCHES, tenant_id, contact_id)
        if batches:
            await con.execute(_REDACT_BATCHES, batches, contact_id)
        ledger = await con.fetchval(_FIND_LEDGER_ROWS, tenant_id, contact_id)
        if ledger:
            await con.execute(_REDACT_LEDGER, ledger, contact_id)
        # The list_members trigger removes the memberships (and the lists' member counts follow).
        await con.execute("DELETE FROM contacts WHERE id = $1 AND tenant_id = $2", contact_id, tenant_id)
    return Erased(ledger_rows=len(ledger), batches=len(batches))
