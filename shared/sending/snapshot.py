"""The figures of a broadcast's audience that are kept or counted apart from its definition
(shared/sending/audience.py): the runs that count as reached, a list's size, the kept
`remaining`, a retry's recipients, and the run lock the planner's chunks take."""
from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from shared.kernel.audience import Audience
from shared.sending import audience
from shared.sending.jobs import reachable


def reached_runs(reset_run: int, through_run: int) -> list[int]:
    """The runs whose `sent` messages count as reached: after the last reset, up to `through_run`."""
    return list(range(reset_run + 1, through_run + 1))


async def member_count(con: asyncpg.Connection, list_id: uuid.UUID) -> int:
    """The list's size as kept by its triggers: what a first run is accepted with. Counting the
    members with an address over a million-member list took 4.5 s of the `send` call (measured);
    the planner's snapshot has the exact figure."""
    return await con.fetchval("SELECT member_count FROM lists WHERE id = $1", list_id) or 0


async def remaining(
    con: asyncpg.Connection, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, list_id: uuid.UUID, channel: str,
    runs: list[int], at: datetime,
) -> tuple[int, int]:
    """(audience_total, remaining) of a one-list audience: members the run would send to were
    nobody reached, and those of them not reached in `runs`; by the planner's own conditions."""
    reached = audience.Reached(broadcast_id, runs) if runs else None
    counted = await audience.preflight(con, tenant_id, Audience(lists=(list_id,)), channel, at, reached)
    return counted.reached + counted.reach, counted.reach


async def kept_remaining(
    con: asyncpg.Connection, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, broadcast_version: int,
    list_id: uuid.UUID, channel: str, runs: list[int], at: datetime,
) -> tuple[int, int]:
    """`remaining(...)`, kept in audience_counts while the broadcast and the list's membership stay
    as they are and no batch of the broadcast is unfinished (its ledger could still change).

    Not noticed: a contact's address cleared or set, or a suppression added, after the figures were
    kept (the next list or broadcast change recounts)."""
    members_version = await con.fetchval("SELECT members_version FROM lists WHERE id = $1", list_id)
    kept = await con.fetchrow(
        """SELECT total, remaining FROM audience_counts
           WHERE broadcast_id = $1 AND broadcast_version = $2 AND list_id = $3 AND members_version = $4""",
        broadcast_id, broadcast_version, list_id, members_version,
    )
    if kept is not None:
        return kept["total"], kept["remaining"]
    total, left = await remaining(con, tenant_id, broadcast_id, list_id, channel, runs, at)
    settled = not await con.fetchval(
        "SELECT EXISTS (SELECT 1 FROM batches WHERE broadcast_id = $1 AND status IN ('queued', 'sending'))",
        broadcast_id,
    )
    if settled and members_version is not None:
        await con.execute(
            """INSERT INTO audience_counts (broadcast_id, broadcast_version, list_id, members_version, total, remaining)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (broadcast_id) DO UPDATE SET
                   broadcast_version = EXCLUDED.broadcast_version, list_id = EXCLUDED.list_id,
                   members_version = EXCLUDED.members_version, total = EXCLUDED.total,
                   remaining = EXCLUDED.remaining, computed_at = now()""",
            broadcast_id, broadcast_version, list_id, members_version, total, left,
        )
    return total, left


async def retry_counts(
    con: asyncpg.Connection, broadcast_id: uuid.UUID, run: int, channels: tuple[str, ...], statuses: list[str]
) -> dict[str, int]:
    """{status: count} of run `run`'s messages whose ledger status is one of `statuses` and whose
    recipient still has an address on the message's channel (one of `channels`, names from the
    registry, never input): who a retry of that run would go to now. A contact deleted since, or
    without an address now, is not counted (the planner leaves it out too)."""
    if len(channels) == 1:
        still = reachable(channels[0])
    else:
        still = "(" + " OR ".join(f"(x.channel = '{c}' AND {reachable(c)})" for c in channels) + ")"
    rows = await con.fetch(
        f"""SELECT x.status, count(*) AS n FROM messages x JOIN contacts c ON c.id = x.contact_id
            WHERE x.broadcast_id = $1 AND x.run = $2 AND x.status = ANY($3::text[]) AND {still}
            GROUP BY x.status""",
        broadcast_id, run, statuses,
    )
    return {r["status"]: r["n"] for r in rows}


async def retried_split(con: asyncpg.Connection, broadcast_id: uuid.UUID, run: int, retry_of: int) -> dict[str, int]:
    """{status: count}: the status in run `retry_of` of each recipient a retry run `run` snapshotted
    into its batches (one probe of the ledger's key per recipient)."""
    rows = await con.fetch(
        """SELECT x.status, count(*) AS n
           FROM batches bt CROSS JOIN LATERAL unnest(bt.contact_ids) AS q(contact_id)
           JOIN messages x ON x.broadcast_id = bt.broadcast_id AND x.run = $3 AND x.contact_id = q.contact_id
                          AND x.channel = coalesce(bt.channel, x.channel)
           WHERE bt.broadcast_id = $1 AND bt.run = $2
           GROUP BY x.status""",
        broadcast_id, run, retry_of,
    )
    return {r["status"]: r["n"] for r in rows}


# Notified (at commit) when a snapshot chunk wrote batches, so the dispatcher hands them out at once.
DISPATCH_CHANNEL = "crier_dispatch"


async def notify_dispatcher(con: asyncpg.Connection) -> None:
    await con.execute(f"NOTIFY {DISPATCH_CHANNEL}")


async def lock_run(con: asyncpg.Connection, broadcast_id: uuid.UUID, run: int) -> None:
    """Hold the run's lock until the transaction ends: one snapshot chunk, or the dispatcher
    dropping a called-off run's batches, at a time."""
    await con.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"run:{broadcast_id}:{run}")
