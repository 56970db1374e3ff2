"""The planner: turns BroadcastStarted into batch jobs.

It snapshots the list's members (with everything needed to render) in contact-id order, writes
each batch to Postgres before publishing it, and records how far it got in `runs`, in the same
transaction: `planned_through` (the last contact id snapshotted) and `published` (how many batches
JetStream has acknowledged, recorded with the next chunk, so publishing costs no commit of its own).
A planner that crashes resumes from there: batches written but not known to be published are
rebuilt from their rows and republished (JetStream drops copies by Nats-Msg-Id, workers skip
finished batches), none is rebuilt differently and none is skipped.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

import asyncpg
import msgspec
from nats.js import JetStreamContext

from shared.broadcasts import decider as b
from shared.broadcasts.handlers import DECIDER, INLINE
from shared.broadcasts.status import RUNNING
from shared.channels import accounts
from shared.channels.registry import address_sql
from shared.platform import commands
from shared.platform.bus import Names, await_acks
from shared.platform.logging import get_logger
from shared.sending import snapshot
from shared.sending.jobs import (
    PlannedJob,
    encode_job,
    reachable,
    recipient_json,
    recipients_json,
)

log = get_logger(__name__)
READ_CHUNK = 10_000  # members read per query; split into batch_size jobs


class Plan:
    """What the planner needs to know about a run, from its BroadcastStarted event."""

    def __init__(self, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, started: b.BroadcastStarted) -> None:
        self.tenant_id, self.broadcast_id, self.started = tenant_id, broadcast_id, started

    @property
    def run(self) -> int:
        return self.started.run

    @property
    def reached_runs(self) -> list[int]:
        """Runs whose reached recipients a top-up leaves out (none for a recurring occurrence)."""
        return snapshot.reached_runs(self.started.reset_run, self.run - 1) if self.started.top_up else []


async def _may_go_on(con: asyncpg.Connection, plan: Plan) -> bool:
    """The run is still the broadcast's current one and not paused, cancelled or stopped.

    Read from the broadcasts view, which is written in the same transaction as the events."""
    row = await con.fetchrow("SELECT status, run, deleted FROM broadcasts WHERE id = $1", plan.broadcast_id)
    return row is not None and row["run"] == plan.run and row["status"] in RUNNING and not row["deleted"]



# For the chunk's transaction only (SET LOCAL): see _snapshot_chunk.
_ORDERED_LOOKUPS = "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off"
# A job's payload stays under this many bytes of recipients (a batch is cut early if need be):
# nats-server refuses messages over its max_payload, 1 MiB by default.
JOB_BYTES = 512 * 1024


def _job(plan: Plan, seq: int, recipients_json: str, resumes: int = 0) -> PlannedJob:
    return PlannedJob(
        tenant_id=plan.tenant_id, broadcast_id=plan.broadcast_id, run=plan.run, seq=seq, channel=plan.started.channel,
        provider_id=plan.started.provider_id, recipients=msgspec.Raw(recipients_json.encode()), resumes=resumes,
    )


def _chunk_sql(channel: str, top_up: bool, cut_by_size: bool) -> str:
    """One statement for a chunk of the snapshot: the next members ($1 list, after contact id $2,
    at most $3), their contacts with an address on `channel`, cut into batches of $6 recipients that are written
    to `batches` ($4 broadcast, $5 run, seq from $7) and returned with the jobs' recipients JSON.
    A top-up leaves out members reached in runs $8. Cut by size too, a batch also ends before its
    recipients' JSON reaches $9 (or $8) bytes. The last row says where the chunk ended even when
    none of its members has an address."""
    not_reached = f"AND {snapshot.not_reached_clause('lm.contact_id', 4, 8)}" if top_up else ""
    if cut_by_size:
        size_limit = 9 if top_up else 8
        numbered = f"""SELECT *, dense_rank() OVER (ORDER BY by_count, by_size) - 1 AS k
                        FROM (SELECT *, sum(octet_length(j::text)) OVER (PARTITION BY by_count ORDER BY id)
                                        / ${size_limit} AS by_size
                              FROM recipients) sized"""
    else:
        numbered = "SELECT *, by_count AS k FROM recipients"
    # The aggregates need no ORDER BY: a batch's arrays and JSON only have to agree with each other.
    return f"""
        WITH members AS (
            SELECT lm.contact_id FROM list_members lm
            WHERE lm.list_id = $1 AND lm.contact_id > $2 {not_reached}
            ORDER BY lm.contact_id LIMIT $3
        ), recipients AS (
            SELECT id, address, j, (row_number() OVER (ORDER BY id) - 1) / $6 AS by_count
            FROM (SELECT c.id, {address_sql(channel)} AS address, {recipient_json(channel)} AS j FROM members m
                  CROSS JOIN LATERAL (SELECT * FROM contacts c WHERE c.id = m.contact_id AND {reachable(channel)}
                                      OFFSET 0) c) r
        ), numbered AS ({numbered}
        ), batched AS (
            SELECT k, count(*) AS n, array_agg(id) AS ids, array_agg(address) AS addresses, json_agg(j)::text AS recipients
            FROM numbered GROUP BY k
        ), written AS (
            INSERT INTO batches (broadcast_id, run, seq, contact_ids, addresses)
            SELECT $4, $5, $7 + k, ids, addresses FROM batched
        )
        SELECT (SELECT max(contact_id) FROM members) AS last_member, b.k, b.n, b.recipients,
               octet_length(b.recipients) AS bytes
        FROM (SELECT) one LEFT JOIN batched b ON true ORDER BY b.k"""


class _TooBig(Exception):
    """A batch's recipients came out over JOB_BYTES."""


async def _snapshot_chunk(
    con: asyncpg.Connection, plan: Plan, after: int, batch_size: int, seq: int, published: int
) -> tuple[list[PlannedJob], int | None]:
    """Read the next members after contact id `after` and write them as batches, in one transaction,
    with the count of batches published so far. Returns the jobs and the last member id read (None
    when no member is left)."""
    # The plan must walk the list's members in contact-id order and look each contact up by its key.
    # Right after a bulk import the statistics are stale or missing, and Postgres planned a bitmap
    # scan of every remaining member plus a sort per chunk (31 ms a chunk, quadratic over the
    # snapshot: 3.1 s of a 1M send) or a hash join over all contacts (1 s a chunk), both measured.
    await con.execute(_ORDERED_LOOKUPS)
    runs = plan.reached_runs
    args = [plan.started.list_id, after, READ_CHUNK, plan.broadcast_id, plan.run, batch_size, seq, *([runs] if runs else [])]
    try:
        async with con.transaction():  # a savepoint, rolled back when a batch comes out too big
            rows = await con.fetch(_chunk_sql(plan.started.channel, bool(runs), cut_by_size=False), *args)
            if any(r["bytes"] is not None and r["bytes"] > JOB_BYTES for r in rows):
                raise _TooBig()
    except _TooBig:  # rare (large attributes): cut the batches by size too
        rows = await con.fetch(_chunk_sql(plan.started.channel, bool(runs), cut_by_size=True), *args, JOB_BYTES)
    last_member = rows[0]["last_member"]
    if last_member is None:
        await con.execute(
            "UPDATE runs SET planned = true, published = $3 WHERE broadcast_id = $1 AND run = $2",
            plan.broadcast_id, plan.run, published,
        )
        return [], None
    batches = [r for r in rows if r["k"] is not None]  # none when no member of the chunk has an address
    jobs = [_job(plan, seq + r["k"], r["recipients"]) for r in batches]
    await con.execute(
        """UPDATE runs SET planned_through = $3, batches = batches + $4, recipients = recipients + $5, published = $6
           WHERE broadcast_id = $1 AND run = $2""",
        plan.broadcast_id,
        plan.run,
        last_member,
        len(jobs),
        sum(r["n"] for r in batches),
        published,
    )
    return jobs, last_member


class Planner:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, names: Names) -> None:
        self.pool, self.js, self.names = pool, js, names

    async def plan(self, plan: Plan, heartbeat: Callable[[], Awaitable[None]], resumes: int = 0) -> None:
        """Snapshot the audience into batches and publish them; resumable after a crash or a pause."""
        async with self.pool.acquire() as con:
            if not await _may_go_on(con, plan):
                log.info("run not going on, nothing to plan", broadcast_id=str(plan.broadcast_id), run=plan.run)
                return
            pacing = await accounts.pacing(con, plan.tenant_id, plan.started.provider_id)
            if pacing is None:
                await self._fail(plan, "the broadcast's provider no longer exists")
                return
            await con.execute(
                "INSERT INTO runs (broadcast_id, run, tenant_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                plan.broadcast_id,
                plan.run,
                plan.tenant_id,
            )
            progress = await con.fetchrow(
                """SELECT planned_through, batches, published, planned FROM runs
                   WHERE broadcast_id = $1 AND run = $2""",
                plan.broadcast_id,
                plan.run,
            )
        batch_size, delay_ms = pacing
        after, seq, planned = progress["planned_through"], progress["batches"], progress["planned"]
        published = progress["published"]
        # Unpaced, batches are published as they are written (the bulk path); paced, the whole
        # audience is snapshotted first (so the broadcast is `sending` and pausable at once), then
        # the batches go out one every batch_delay_ms.
        inline = delay_ms == 0
        if inline:  # batches a crashed planner wrote but may not have published go out first, in order
            published = await self._publish_from(plan, published, _Pacer(0), heartbeat, resumes)
        while not planned:
            async with self.pool.acquire() as con, con.transaction():
                if not await _may_go_on(con, plan):
                    return  # cancelled or stopped (a run is pausable once snapshotted)
                jobs, last_member = await _snapshot_chunk(con, plan, after, batch_size, seq, published)
            if last_member is None:
                break
            after, seq = last_member, seq + len(jobs)
            if jobs and inline:
                await self._publish(jobs, _Pacer(0), heartbeat)
                published = seq
        await self._record_snapshot(plan)
        await self._publish_from(plan, published, _Pacer(delay_ms / 1000), heartbeat, resumes)

    async def resume(self, plan: Plan, resumes: int, heartbeat: Callable[[], Awaitable[None]]) -> None:
        """After a pause: publish again every batch not sent yet (workers acked them unsent while the
        broadcast was paused), under new job ids, then plan on if planning was cut short."""
        async with self.pool.acquire() as con:
            if not await _may_go_on(con, plan):
                return
            delay_ms = (await accounts.pacing(con, plan.tenant_id, plan.started.provider_id) or (0, 0))[1]
        # Every held batch, wherever it is: only a batch that was published can be held.
        await self._publish_range(plan, 0, None, _Pacer(delay_ms / 1000), heartbeat, resumes, status="held")
        await self.plan(plan, heartbeat, resumes)

    async def _publish_from(
        self, plan: Plan, published: int, pacer: "_Pacer", heartbeat: Callable[[], Awaitable[None]], resumes: int
    ) -> int:
        """Publish the written batches from `published` on; returns the new count of published batches."""
        return await self._publish_range(plan, published, None, pacer, heartbeat, resumes, record=True)

    async def _publish_range(
        self, plan: Plan, first: int, end: int | None, pacer: "_Pacer", heartbeat: Callable[[], Awaitable[None]],
        resumes: int, record: bool = False, status: str = "queued",
    ) -> int:
        """Publish the unsent batches with seq in [first, end), 50 at a time, stopping when the run
        is paused, cancelled or stopped. With `record`, runs.published follows.

        `queued` ones when publishing what was written (after a planner crash too), only `held`
        ones on a resume: a `queued` or `sending` batch published before may be in a worker's
        hands, and publishing it again made a second attempt that failed the first one's in-flight
        recipients as "outcome unknown"."""
        async with self.pool.acquire() as con:
            rows = await con.fetch(
                """SELECT seq, contact_ids FROM batches
                   WHERE broadcast_id = $1 AND run = $2 AND seq >= $3 AND ($4::int IS NULL OR seq < $4)
                     AND status = $5 ORDER BY seq""",
                plan.broadcast_id, plan.run, first, end, status,
            )
        published = first
        for start in range(0, len(rows), 50):
            async with self.pool.acquire() as con:
                if not await _may_go_on(con, plan):
                    break
            group = rows[start : start + 50]
            if status == "held":  # queued again before its job goes out, so a worker treats it as new
                async with self.pool.acquire() as con:
                    await con.execute(
                        """UPDATE batches SET status = 'queued'
                           WHERE broadcast_id = $1 AND run = $2 AND seq = ANY($3::int[]) AND status = 'held'""",
                        plan.broadcast_id, plan.run, [r["seq"] for r in group],
                    )
            jobs = [await self._rebuild_job(plan, r["seq"], r["contact_ids"], resumes) for r in group]
            await self._publish(jobs, pacer, heartbeat)
            published = jobs[-1].seq + 1
            if record:
                async with self.pool.acquire() as con:
                    await con.execute(
                        "UPDATE runs SET published = greatest(published, $3) WHERE broadcast_id = $1 AND run = $2",
                        plan.broadcast_id, plan.run, published,
                    )
        return published

    async def _rebuild_job(self, plan: Plan, seq: int, contact_ids: list[int], resumes: int = 0) -> PlannedJob:
        """A job again from its batch row (after a crash between writing and publishing it, or a pause)."""
        async with self.pool.acquire() as con:
            recipients = await con.fetchval(
                f"""SELECT coalesce({recipients_json(plan.started.channel)}, '[]')::text
                    FROM contacts c WHERE c.id = ANY($1::bigint[]) AND {reachable(plan.started.channel)}""",
                contact_ids,
            )
        return _job(plan, seq, recipients, resumes)

    async def _publish(self, jobs: list[PlannedJob], pacer: "_Pacer", heartbeat: Callable[[], Awaitable[None]]) -> None:
        futures = []
        for job in jobs:
            await pacer.wait(heartbeat)
            futures.append(
                await self.js.publish_async(
                    self.names.job_subject(job.channel), encode_job(job), headers={"Nats-Msg-Id": job.msg_id}
                )
            )
        await await_acks(futures)
        await heartbeat()

    async def _record_snapshot(self, plan: Plan) -> None:
        async with self.pool.acquire() as con:
            totals = await con.fetchrow(
                "SELECT batches, recipients FROM runs WHERE broadcast_id = $1 AND run = $2", plan.broadcast_id, plan.run
            )
        command = b.RecordSnapshot(
            run=plan.run, recipients=totals["recipients"], batches=totals["batches"], at=datetime.now(timezone.utc)
        )
        await commands.handle(self.pool, DECIDER, b.stream_name(plan.broadcast_id), command, _metadata(plan), INLINE)
        log.info("audience snapshotted", broadcast_id=str(plan.broadcast_id), run=plan.run, recipients=totals["recipients"])

    async def _fail(self, plan: Plan, reason: str) -> None:
        command = b.FailRun(run=plan.run, reason=reason, at=datetime.now(timezone.utc))
        await commands.handle(self.pool, DECIDER, b.stream_name(plan.broadcast_id), command, _metadata(plan), INLINE)


def _metadata(plan: Plan) -> dict[str, object]:
    return {"tenant_id": str(plan.tenant_id), "actor": "sender:planner"}


class _Pacer:
    """One batch every `delay_s` (batch_delay_ms), the first at once."""

    def __init__(self, delay_s: float) -> None:
        self.delay, self.next = delay_s, 0.0

    async def wait(self, heartbeat: Callable[[], Awaitable[None]]) -> None:
        """Sleep until the next batch is due, telling JetStream we are alive at least every 10 s."""
        if self.delay <= 0:
            return
        while (wait := self.next - time.monotonic()) > 0:
            await asyncio.sleep(min(wait, 10.0))
            await heartbeat()
        self.next = time.monotonic() + self.delay


async def consume_starts(js: JetStreamContext, names: Names, planner: Planner, stop: asyncio.Event) -> None:
    """Take broadcast events from the shared durable consumer, one at a time per sender: a
    BroadcastStarted is planned, a BroadcastResumed republishes the unsent batches; others are acked."""
    import msgspec
    import nats.errors

    from shared.platform.bus import PLANNER_CONSUMER, EventEnvelope

    sub = await js.pull_subscribe_bind(durable=PLANNER_CONSUMER, stream=names.events_stream)
    decode = msgspec.json.Decoder(EventEnvelope).decode
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch=1, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            try:
                envelope = decode(msg.data)
                broadcast_id = b.id_from_stream(envelope.stream)
                event = msgspec.convert({**envelope.data, "type": envelope.type}, b.Event, strict=False) if (
                    envelope.type in ("BroadcastStarted", "BroadcastResumed")) else None
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError, IndexError):
                log.error("undecodable broadcast event terminated", subject=msg.subject)
                await msg.term()
                continue
            try:
                if isinstance(event, b.BroadcastStarted):
                    await planner.plan(Plan(event.tenant_id, broadcast_id, event), msg.in_progress)
                elif isinstance(event, b.BroadcastResumed):
                    started = await _started_event(planner.pool, broadcast_id, event.run)
                    if started is not None:
                        plan = Plan(started.tenant_id, broadcast_id, started)
                        await planner.resume(plan, event.resumes, msg.in_progress)
            except Exception as exc:  # Postgres or NATS trouble: another try soon, resuming where it stopped
                log.warning("planning failed, will be retried", broadcast_id=str(broadcast_id), error=repr(exc))
                await msg.nak(delay=2.0)
                continue
            await msg.ack()


async def _started_event(pool: asyncpg.Pool, broadcast_id: uuid.UUID, run: int) -> b.BroadcastStarted | None:
    from shared.platform import codec, eventstore

    async with pool.acquire() as con:
        events = await eventstore.read_stream(con, b.stream_name(broadcast_id))
    for recorded in events:
        if recorded.type == "BroadcastStarted" and recorded.data.get("run") == run:
            return codec.from_recorded(recorded, b.Event)
    return None
