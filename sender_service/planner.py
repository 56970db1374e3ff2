"""The planner: turns BroadcastStarted into batches, written to Postgres.

It snapshots the list's members with an address on the run's channel (for a retry run: the
recipients of the run retried with the ledger statuses asked for), in contact-id order, into
`batches` rows, and records how far it got in `runs` in the same transaction (`planned_through`,
the last contact id snapshotted), so a planner that crashes resumes there and none is written
twice or skipped. It publishes nothing itself: the dispatcher hands the batches to JetStream a
fair share at a time (sender_service.dispatcher), so planning is a bounded piece of work and
several runs are planned at once. The one exception is a resume, which publishes again the
batches workers held while the run was paused (at most a window of them).
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

import asyncpg
import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared.audience.segments import SqlArgs
from shared.broadcasts import decider as b
from shared.broadcasts.handlers import DECIDER, INLINE
from shared.broadcasts.status import RUNNING
from shared.channels import accounts
from shared.channels.registry import address_sql
from shared.kernel.audience import Audience
from shared.platform import commands
from shared.platform.bus import (
    PLANNER_CONSUMER,
    EventEnvelope,
    KeepAlive,
    Names,
    await_acks,
    pull_each,
)
from shared.platform.logging import get_logger
from shared.sending import audience, snapshot
from shared.sending.jobs import Job, encode_job

log = get_logger(__name__)
READ_CHUNK = 10_000  # members read per query; split into batch_size jobs


class Plan:
    """What the planner needs to know about a run, from its BroadcastStarted event."""

    def __init__(self, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, started: b.BroadcastStarted) -> None:
        self.tenant_id, self.broadcast_id, self.started = tenant_id, broadcast_id, started

    @property
    def run(self) -> int:
        return self.started.run

    def job(self, seq: int, resumes: int = 0, channel: str | None = None, provider_id: uuid.UUID | None = None) -> Job:
        """Batch `seq`'s job (`channel` and `provider_id`: a multi-channel run's batch's own)."""
        s = self.started
        channel = channel or s.channel
        return Job(tenant_id=self.tenant_id, broadcast_id=self.broadcast_id, run=self.run, seq=seq,
                   channel=channel, provider_id=provider_id or s.provider_id, resumes=resumes,
                   pool=s.provider_ids if channel == s.channel else ())

    @property
    def multichannel(self) -> bool:
        return len(self.started.channels) > 1

    @property
    def reached_runs(self) -> list[int]:
        """Runs whose reached recipients a top-up leaves out (none for a recurring occurrence or a retry)."""
        return snapshot.reached_runs(self.started.reset_run, self.run - 1) if self.started.top_up else []

    @property
    def retry(self) -> bool:
        return self.started.retry_of > 0


async def _may_go_on(con: asyncpg.Connection, plan: Plan) -> bool:
    """The run is still the broadcast's current one and not paused, cancelled or stopped.

    Read from the broadcasts view, which is written in the same transaction as the events."""
    row = await con.fetchrow("SELECT status, run, deleted FROM broadcasts WHERE id = $1", plan.broadcast_id)
    return row is not None and row["run"] == plan.run and row["status"] in RUNNING and not row["deleted"]



# For the chunk's transaction only (SET LOCAL): see _snapshot_chunk.
_ORDERED_LOOKUPS = "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off"
# A batch's recipients, as a worker reads them, stay under about this many bytes (a batch is cut
# early if need be), so large attributes bound a worker's memory, not only batch_size does.
JOB_BYTES = 512 * 1024


def _recipient_bytes(channel: str) -> str:
    """SQL: about the size of contact `c` as a recipient. An estimate, not its JSON: rendering the
    JSON of every contact here as well as in the worker cost a fifth of a 1M send (measured). The
    stored size of attributes may be compressed (or numbers shorter than their text), so it is a
    bound on memory within a small factor, not an exact one; nothing exact depends on it."""
    return (f"octet_length({address_sql(channel)}) + coalesce(octet_length(c.external_id), 0) "
            f"+ coalesce(octet_length(c.email), 0) + coalesce(octet_length(c.phone), 0) "
            f"+ coalesce(octet_length(c.locale), 0) + pg_column_size(c.attributes) + 40")


def _chunk_sql(channel: str, members: str, keep: str, p: dict[str, str], cut_by_size: bool) -> str:
    """One statement for a chunk of the snapshot: the next candidates (`members`, a query of
    contact ids in id order), their contacts that `keep` (the audience's conditions over `c`), cut
    into batches of p["batch_size"] recipients that are written to `batches` (p["broadcast"],
    p["run"], seq from p["seq"]), each returned with its count and (about) its recipients' size.
    Cut by size too, a batch also ends before its recipients reach p["size_limit"] bytes. The last
    row says where the chunk ended even when none of its candidates is a recipient."""
    if cut_by_size:
        numbered = f"""SELECT *, dense_rank() OVER (ORDER BY by_count, by_size) - 1 AS k
                        FROM (SELECT *, sum(bytes) OVER (PARTITION BY by_count ORDER BY id) / {p["size_limit"]} AS by_size
                              FROM recipients) sized"""
    else:
        numbered = "SELECT *, by_count AS k FROM recipients"
    return f"""
        WITH members AS (
            {members}
        ), recipients AS (
            SELECT id, address, bytes, (row_number() OVER (ORDER BY id) - 1) / {p["batch_size"]} AS by_count
            FROM (SELECT c.id, {address_sql(channel)} AS address, {_recipient_bytes(channel)} AS bytes
                  FROM members m
                  CROSS JOIN LATERAL (SELECT * FROM contacts c WHERE c.id = m.contact_id AND {keep}
                                      OFFSET 0) c) r
        ), numbered AS ({numbered}
        ), batched AS (
            SELECT k, count(*) AS n, array_agg(id ORDER BY id) AS ids, array_agg(address ORDER BY id) AS addresses,
                   sum(bytes) AS bytes
            FROM numbered GROUP BY k
        ), written AS (
            INSERT INTO batches (broadcast_id, run, seq, contact_ids, addresses{", channel, provider_id" if "channel" in p else ""})
            SELECT {p["broadcast"]}, {p["run"]}, {p["seq"]} + k, ids, addresses{
                f", {p['channel']}, {p['provider']}" if "channel" in p else ""} FROM batched
        )
        SELECT (SELECT max(contact_id) FROM members) AS last_member, b.k, b.n, b.bytes
        FROM (SELECT) one LEFT JOIN batched b ON true ORDER BY b.k"""


class _TooBig(Exception):
    """A batch's recipients came out over JOB_BYTES."""


async def _write_batches(
    con: asyncpg.Connection, channel: str, members: str, keep: str, p: dict[str, str], args: SqlArgs
) -> list[asyncpg.Record]:
    """_chunk_sql's rows: cut by count, or by size too when a batch came out over JOB_BYTES."""
    try:
        async with con.transaction():  # a savepoint, rolled back when a batch comes out too big
            rows = await con.fetch(_chunk_sql(channel, members, keep, p, cut_by_size=False), *args.values)
            if any(r["bytes"] is not None and r["bytes"] > JOB_BYTES for r in rows):
                raise _TooBig()
    except _TooBig:  # rare (large attributes): cut the batches by size too
        p["size_limit"] = args.add(JOB_BYTES, "bigint")
        rows = await con.fetch(_chunk_sql(channel, members, keep, p, cut_by_size=True), *args.values)
    return rows


async def _snapshot_chunk(
    con: asyncpg.Connection, plan: Plan, after: int, batch_size: int, seq: int
) -> bool:
    """Read the next members after contact id `after` and write them as batches, in the caller's
    transaction. Returns False when no member was left (the snapshot is complete)."""
    # The plan must walk the list's members in contact-id order and look each contact up by its key.
    # Right after a bulk import the statistics are stale or missing, and Postgres planned a bitmap
    # scan of every remaining member plus a sort per chunk (31 ms a chunk, quadratic over the
    # snapshot: 3.1 s of a 1M send) or a hash join over all contacts (1 s a chunk), both measured.
    await con.execute(_ORDERED_LOOKUPS)
    args, channel = SqlArgs([]), plan.started.channel
    reached = audience.Reached(plan.broadcast_id, plan.reached_runs) if plan.reached_runs else None
    # A retry goes to the run retried's recipients (below), with the same checks on each.
    target = Audience() if plan.retry else plan.started.target
    resolved = await audience.resolve(con, plan.tenant_id, target, channel, plan.started.at, args, reached)
    after_p, limit_p = args.add(after, "bigint"), args.add(READ_CHUNK, "int")
    p = {"broadcast": args.add(plan.broadcast_id, "uuid"), "run": args.add(plan.run, "int"),
         "batch_size": args.add(batch_size, "int"), "seq": args.add(seq, "int")}
    if plan.retry:  # read along the ledger's primary key
        members = f"""SELECT x.contact_id FROM messages x
            WHERE x.broadcast_id = {p["broadcast"]} AND x.run = {args.add(plan.started.retry_of, "int")}
              AND x.contact_id > {after_p} AND x.status = ANY({args.add(list(plan.started.retry_statuses), "text[]")})
            ORDER BY x.contact_id LIMIT {limit_p}"""
    else:
        members = resolved.candidates(after_p, limit_p)
    rows = await _write_batches(con, channel, members, resolved.recipient, p, args)
    last_member = rows[0]["last_member"]
    if last_member is None:
        await con.execute("UPDATE runs SET planned = true WHERE broadcast_id = $1 AND run = $2", plan.broadcast_id, plan.run)
        return False
    batches = [r for r in rows if r["k"] is not None]  # none when no member of the chunk has an address
    await con.execute(
        """UPDATE runs SET planned_through = $3, batches = batches + $4, recipients = recipients + $5
           WHERE broadcast_id = $1 AND run = $2""",
        plan.broadcast_id, plan.run, last_member, len(batches), sum(r["n"] for r in batches),
    )
    if batches:
        await snapshot.notify_dispatcher(con)
    return True


def _skipped_sql(channels: tuple[str, ...], policy: str, members: str, member: str, p: dict[str, str]) -> str:
    """SQL: record in the ledger, as `skipped` (`no_address`), each member's channels the policy
    would have used and it has no address on: under `all` every such channel; under
    `first_available` those before its first channel with an address (all of them if none).
    Returns how many rows it wrote."""
    checks = []
    for i, channel in enumerate(channels):
        missing = f"{address_sql(channel)} IS NULL"
        if policy == "first_available":  # tried only while no earlier channel had an address
            missing = " AND ".join([missing] + [f"{address_sql(c)} IS NULL" for c in channels[:i]])
        checks.append(f"('{channel}', {missing})")
    return f"""
        WITH written AS (
            INSERT INTO messages (broadcast_id, run, contact_id, channel, batch_seq, address, status, attempts, error)
            SELECT {p["broadcast"]}, {p["run"]}, c.id, ch.channel, -1, '', 'skipped', 0, 'no_address'
            FROM ({members}) m
            CROSS JOIN LATERAL (SELECT * FROM contacts c WHERE c.id = m.contact_id AND {member} OFFSET 0) c
            CROSS JOIN LATERAL (VALUES {", ".join(checks)}) ch(channel, missing)
            WHERE ch.missing
            ON CONFLICT DO NOTHING RETURNING 1)
        SELECT count(*) FROM written"""


async def _planned(con: asyncpg.Connection, plan: Plan) -> bool:
    """The snapshot is complete: no candidate was left."""
    await con.execute("UPDATE runs SET planned = true WHERE broadcast_id = $1 AND run = $2", plan.broadcast_id, plan.run)
    return False


async def _snapshot_chunk_channels(
    con: asyncpg.Connection, plan: Plan, after: int, batch_size: int, seq: int
) -> bool:
    """_snapshot_chunk for a run on several channels: the chunk's candidates are read once to fix
    where it ends, then each channel's recipients among them (by the policy) are written as that
    channel's batches, and the channels skipped for want of an address as ledger rows."""
    await con.execute(_ORDERED_LOOKUPS)
    started = plan.started
    channels, policy = started.channels, started.routing.channel_policy if started.routing else "all"
    reached = audience.Reached(plan.broadcast_id, plan.reached_runs) if plan.reached_runs else None
    target = Audience() if plan.retry else started.target

    def retried(args: SqlArgs, channel: str | None, bound: str | None) -> str:
        """The run retried's recipients with the statuses asked for (on `channel`), after `after`."""
        on = f" AND x.channel = {args.add(channel, 'text')}" if channel else ""
        upto = f" AND x.contact_id <= {bound}" if bound else ""
        return f"""SELECT DISTINCT x.contact_id FROM messages x
            WHERE x.broadcast_id = {args.add(plan.broadcast_id, "uuid")} AND x.run = {args.add(started.retry_of, "int")}
              AND x.contact_id > {args.add(after, "bigint")}{upto}{on}
              AND x.status = ANY({args.add(list(started.retry_statuses), "text[]")})
            ORDER BY x.contact_id{"" if bound else " LIMIT " + args.add(READ_CHUNK, "int")}"""

    # Where the chunk ends: its last candidate, whichever channel it goes on (a retry: read from the
    # ledger; else the end of the first channel's candidates, which are every channel's).
    last_member = None
    if plan.retry:
        args = SqlArgs([])
        last_member = await con.fetchval(f"SELECT max(contact_id) FROM ({retried(args, None, None)}) m", *args.values)
        if last_member is None:
            return await _planned(con, plan)
    batches = recipients = 0
    for i, channel in enumerate(channels):
        args = SqlArgs([])
        resolved = await audience.resolve(con, plan.tenant_id, target, channel, started.at, args, reached)
        keep = resolved.recipient
        if plan.retry:  # the channel each failed on, again
            members = retried(args, channel, args.add(last_member, "bigint"))
        else:
            members = resolved.candidates(args.add(after, "bigint"), args.add(READ_CHUNK, "int"))
            if i > 0:
                members = f"SELECT contact_id FROM ({members}) m WHERE contact_id <= {args.add(last_member, 'bigint')}"
            if policy == "first_available" and i > 0:  # only who has no address on an earlier channel
                keep += "".join(f" AND {address_sql(c)} IS NULL" for c in channels[:i])
        p = {"broadcast": args.add(plan.broadcast_id, "uuid"), "run": args.add(plan.run, "int"),
             "batch_size": args.add(batch_size, "int"), "seq": args.add(seq + batches, "int"),
             "channel": args.add(channel, "text"), "provider": args.add(started.provider_of(channel), "uuid")}
        rows = await _write_batches(con, channel, members, keep, p, args)
        if i == 0 and not plan.retry:
            last_member = rows[0]["last_member"]
            if last_member is None:
                return await _planned(con, plan)
        written = [r for r in rows if r["k"] is not None]
        batches += len(written)
        recipients += sum(r["n"] for r in written)
    skipped = 0
    if not plan.retry:
        args = SqlArgs([])
        resolved = await audience.resolve(con, plan.tenant_id, target, channels[0], started.at, args, reached)
        chunk = resolved.candidates(args.add(after, "bigint"), args.add(READ_CHUNK, "int"))
        members = f"SELECT contact_id FROM ({chunk}) m WHERE contact_id <= {args.add(last_member, 'bigint')}"
        p = {"broadcast": args.add(plan.broadcast_id, "uuid"), "run": args.add(plan.run, "int")}
        skipped = await con.fetchval(_skipped_sql(channels, policy, members, resolved.member, p), *args.values)
    await con.execute(
        """UPDATE runs SET planned_through = $3, batches = batches + $4, recipients = recipients + $5,
                           skipped = skipped + $6
           WHERE broadcast_id = $1 AND run = $2""",
        plan.broadcast_id, plan.run, last_member, batches, recipients, skipped,
    )
    if batches:
        await snapshot.notify_dispatcher(con)
    return True


class Planner:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, names: Names) -> None:
        self.pool, self.js, self.names = pool, js, names

    async def plan(self, plan: Plan, between_chunks: Callable[[], Awaitable[None]]) -> None:
        """Snapshot the audience into batches; resumable after a crash or a pause."""
        async with self.pool.acquire() as con:
            if not await _may_go_on(con, plan):
                log.info("run not going on, nothing to plan", broadcast_id=str(plan.broadcast_id), run=plan.run)
                return
            pacing = await accounts.pacing(con, plan.tenant_id, plan.started.provider_id)
            if pacing is None:
                await self._fail(plan, "the broadcast's provider no longer exists")
                return
            for channel in plan.started.channels[1:]:
                if await accounts.pacing(con, plan.tenant_id, plan.started.provider_of(channel)) is None:
                    await self._fail(plan, f"the broadcast's provider for {channel} no longer exists")
                    return
            # A pool sends while any of its providers is left (a deleted one is skipped like a failing one).
            await con.execute(
                """INSERT INTO runs (broadcast_id, run, tenant_id, channel, provider_id, multichannel, provider_ids)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT DO NOTHING""",
                plan.broadcast_id, plan.run, plan.tenant_id, plan.started.channel, plan.started.provider_id,
                plan.multichannel, list(plan.started.provider_ids),
            )
        batch_size = pacing[0]
        try:
            planned = await self._plan_chunks(plan, batch_size, between_chunks)
        except audience.MissingSegment as exc:
            await self._fail(plan, f"segment {exc.segment_id} of the audience no longer exists")
            return
        if planned:
            await self._record_snapshot(plan)

    async def _plan_chunks(self, plan: Plan, batch_size: int, between_chunks: Callable[[], Awaitable[None]]) -> bool:
        """Chunk after chunk until the snapshot is complete (True), or the run was paused, cancelled
        or stopped (False: a resume plans on from the last chunk)."""
        while True:
            async with self.pool.acquire() as con, con.transaction():
                # One planner per run at a time (a resume may plan a run a paused planner left).
                await snapshot.lock_run(con, plan.broadcast_id, plan.run)
                if not await _may_go_on(con, plan):
                    return False
                progress = await con.fetchrow(
                    "SELECT planned_through, batches, planned FROM runs WHERE broadcast_id = $1 AND run = $2",
                    plan.broadcast_id, plan.run,
                )
                chunk = _snapshot_chunk_channels if plan.multichannel else _snapshot_chunk
                more = not progress["planned"] and await chunk(
                    con, plan, progress["planned_through"], batch_size, progress["batches"]
                )
            await between_chunks()
            if not more:
                return True

    async def resume(self, plan: Plan, resumes: int, between_chunks: Callable[[], Awaitable[None]]) -> None:
        """After a pause: publish again the batches workers held unsent while the run was paused
        (at most a window of them), under new job ids, then plan on if planning was cut short.

        Only `held` ones: a `queued` or `sending` batch published before may be in a worker's
        hands, and publishing it again made a second attempt that failed the first one's in-flight
        recipients as "outcome unknown"."""
        async with self.pool.acquire() as con:
            if not await _may_go_on(con, plan):
                return
            held = await con.fetch(
                """SELECT seq, channel, provider_id FROM batches WHERE broadcast_id = $1 AND run = $2
                     AND status = 'held' ORDER BY seq""",
                plan.broadcast_id, plan.run,
            )
        for start in range(0, len(held), 50):
            rows = held[start : start + 50]
            group = [r["seq"] for r in rows]
            await publish_jobs(self.js, self.names,
                               [plan.job(r["seq"], resumes, r["channel"], r["provider_id"]) for r in rows])
            # Published first, then counted in flight again: a crash in between publishes them again
            # under the same ids (dropped as copies); a worker sends a held batch of a running run.
            async with self.pool.acquire() as con:
                await con.execute(
                    """UPDATE batches SET status = 'queued'
                       WHERE broadcast_id = $1 AND run = $2 AND seq = ANY($3::int[]) AND status = 'held'""",
                    plan.broadcast_id, plan.run, group,
                )
            await between_chunks()
        await self.plan(plan, between_chunks)

    async def _record_snapshot(self, plan: Plan) -> None:
        async with self.pool.acquire() as con:
            totals = await con.fetchrow(
                "SELECT batches, recipients, skipped FROM runs WHERE broadcast_id = $1 AND run = $2",
                plan.broadcast_id, plan.run,
            )
            # A retry's recipients by their status in the run retried, for the counters (which take
            # them out of that run's figures). Counted once planning is done: that run has ended,
            # so its ledger rows no longer change, and a resumed planning counts the same.
            split = await snapshot.retried_split(con, plan.broadcast_id, plan.run, plan.started.retry_of) if (
                plan.retry) else {}
        command = b.RecordSnapshot(
            run=plan.run, recipients=totals["recipients"], batches=totals["batches"], at=datetime.now(timezone.utc),
            retried_failed=split.get("failed", 0), retried_unknown=split.get("unknown", 0), skipped=totals["skipped"],
        )
        await commands.handle(self.pool, DECIDER, b.stream_name(plan.broadcast_id), command, _metadata(plan), INLINE)
        log.info("audience snapshotted", broadcast_id=str(plan.broadcast_id), run=plan.run, recipients=totals["recipients"])

    async def _fail(self, plan: Plan, reason: str) -> None:
        command = b.FailRun(run=plan.run, reason=reason, at=datetime.now(timezone.utc))
        await commands.handle(self.pool, DECIDER, b.stream_name(plan.broadcast_id), command, _metadata(plan), INLINE)


def _metadata(plan: Plan) -> dict[str, object]:
    return {"tenant_id": str(plan.tenant_id), "actor": "sender:planner"}


async def publish_jobs(js: JetStreamContext, names: Names, jobs: list[Job]) -> None:
    """Publish and wait for JetStream's acks (the Nats-Msg-Id drops a copy of a job published again)."""
    futures = [
        await js.publish_async(names.job_subject(job.channel), encode_job(job), headers={"Nats-Msg-Id": job.msg_id})
        for job in jobs
    ]
    await await_acks(futures)


async def consume_starts(
    js: JetStreamContext, names: Names, planner: Planner, stop: asyncio.Event, concurrency: int = 4,
    keep_alive_s: float = 1.5,
) -> None:
    """Take broadcast events from the shared durable consumer, `concurrency` at a time per sender
    (so one large snapshot never holds up another tenant's run): a BroadcastStarted is planned, a
    BroadcastResumed republishes the held batches; others are acked. Work in progress is kept
    alive every `keep_alive_s`; a sender that stops hands it back between two snapshot chunks."""

    async def handle(msg: Msg) -> None:
        await _handle_event(msg, planner, stop, keep_alive_s)

    await pull_each(js, PLANNER_CONSUMER, names.events_stream, handle, stop, concurrency)


class _Stopping(Exception):
    """The sender is stopping: planning was left between two chunks (each committed)."""


_decode_envelope = msgspec.json.Decoder(EventEnvelope).decode


async def _handle_event(msg: Msg, planner: Planner, stop: asyncio.Event, keep_alive_s: float) -> None:
    try:
        envelope = _decode_envelope(msg.data)
        broadcast_id = b.id_from_stream(envelope.stream)
        event = msgspec.convert({**envelope.data, "type": envelope.type}, b.Event, strict=False) if (
            envelope.type in ("BroadcastStarted", "BroadcastResumed")) else None
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, IndexError):
        log.error("undecodable broadcast event terminated", subject=msg.subject)
        await msg.term()
        return

    async def go_on() -> None:  # between two chunks: each is committed, so planning resumes there
        if stop.is_set():
            raise _Stopping()

    try:
        async with KeepAlive(msg, keep_alive_s):
            if isinstance(event, b.BroadcastStarted):
                await planner.plan(Plan(event.tenant_id, broadcast_id, event), go_on)
            elif isinstance(event, b.BroadcastResumed):
                started = await _started_event(planner.pool, broadcast_id, event.run)
                if started is not None:
                    await planner.resume(Plan(started.tenant_id, broadcast_id, started), event.resumes, go_on)
    except _Stopping:
        log.info("planning handed back: the sender is stopping", broadcast_id=str(broadcast_id))
        await msg.nak()  # at once: another sender plans on from the last chunk
        return
    except Exception as exc:  # Postgres or NATS trouble: another try soon, resuming where it stopped
        log.warning("planning failed, will be retried", broadcast_id=str(broadcast_id), error=repr(exc))
        await msg.nak(delay=2.0)
        return
    await msg.ack()


async def _started_event(pool: asyncpg.Pool, broadcast_id: uuid.UUID, run: int) -> b.BroadcastStarted | None:
    from shared.platform import codec, eventstore

    async with pool.acquire() as con:
        events = await eventstore.read_stream(con, b.stream_name(broadcast_id))
    for recorded in events:
        if recorded.type == "BroadcastStarted" and recorded.data.get("run") == run:
            return codec.from_recorded(recorded, b.Event)
    return None
