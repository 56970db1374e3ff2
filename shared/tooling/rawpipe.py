"""The bare pipeline: the reference `crier bench` measures a send against, on the same servers.

N recipients in jobs of 500 go JetStream work queue → msgspec decode → a ~1 KB render with
str.format_map (5 variables) → a null provider → one transaction per job {COPY one ledger row per
recipient; UPDATE a counter} → ack, in P processes of T tasks each. Nothing else: no audience
snapshot, no events, no projections. What a send costs beyond it is what Crier's own work costs;
the machine's speed drifts by up to 2x within an hour, so only a ratio measured in the same run
means anything.
"""
from __future__ import annotations

import asyncio
import datetime
import multiprocessing as mp
import time
import uuid

import asyncpg
import msgspec
import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import NotFoundError

PER_JOB = 500
_STREAM, _SUBJECT, _DURABLE = "RAWPIPE_JOBS", "rawpipe.jobs", "rawpipe"
_BROADCAST = uuid.UUID("3f9c1a8e-6c1b-4a55-9f5e-2f0f4b8d9e11")
_BODY = ("<p>We are writing to let you know about the upcoming changes to your subscription and the new "
         "features that are now available to everyone on our platform. Over the last quarter we shipped "
         "faster dashboards, better exports, and a brand-new mobile experience. ") * 3
_TEMPLATE = ("<html><body><h1>Hello {first_name} {last_name},</h1>" + _BODY +
             "<p>Your current plan: <b>{plan}</b>.</p><p>This message was sent to {email}.</p>"
             "<p><a href=\"{unsubscribe_url}\">Unsubscribe</a></p></body></html>")


class _Recipient(msgspec.Struct):
    id: int
    email: str
    first_name: str
    last_name: str
    plan: str


class _Job(msgspec.Struct):
    broadcast_id: str
    recipients: list[_Recipient]


def _jobs(n: int) -> list[bytes]:
    """`n` recipients in jobs of PER_JOB (the last one may be smaller)."""
    return [
        msgspec.msgpack.encode(_Job(str(_BROADCAST), [
            _Recipient(i, f"user{i:08d}@example.com", f"First{i % 97}", f"Last{i % 89}", "pro")
            for i in range(start, min(start + PER_JOB, n))]))
        for start in range(0, n, PER_JOB)
    ]


async def _worker(dsn: str, nats_url: str, njobs: int, tasks: int, done, last_commit, go, ready) -> None:  # type: ignore[no-untyped-def]
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    pool = await asyncpg.create_pool(dsn, min_size=tasks, max_size=tasks)
    subs = [await js.pull_subscribe_bind(durable=_DURABLE, stream=_STREAM) for _ in range(tasks)]
    decode = msgspec.msgpack.Decoder(_Job).decode
    render = _TEMPLATE.format_map
    ready.release()
    while not go.is_set():
        await asyncio.sleep(0.001)

    async def task(sub) -> None:  # type: ignore[no-untyped-def]
        while done.value < njobs:
            try:
                msgs = await sub.fetch(batch=1, timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                job = decode(msg.data)
                broadcast_id = uuid.UUID(job.broadcast_id)
                now = datetime.datetime.now(datetime.timezone.utc)
                rows = []
                for r in job.recipients:
                    render({"first_name": r.first_name, "last_name": r.last_name, "plan": r.plan, "email": r.email,
                            "unsubscribe_url": f"https://example.com/u/{r.id}"}).encode()
                    rows.append((broadcast_id, r.id, 1, now))
                async with pool.acquire() as con, con.transaction():
                    await con.copy_records_to_table("rawpipe_ledger", records=rows)
                    await con.execute("UPDATE rawpipe_counters SET sent = sent + $2 WHERE broadcast_id = $1",
                                      broadcast_id, len(rows))
                await msg.ack()
                with done.get_lock():
                    done.value += 1
                with last_commit.get_lock():
                    last_commit.value = max(last_commit.value, time.time())

    await asyncio.gather(*(task(s) for s in subs))
    await pool.close()
    await nc.close()


def _worker_process(*args) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(_worker(*args))


async def run_once(dsn: str, nats_url: str, n: int, procs: int = 2, tasks: int = 4) -> float:
    """Move `n` recipients through the bare pipeline; returns the seconds from the first publish to
    the last commit, after checking every ledger row was written. Removes its tables and stream."""
    jobs = _jobs(n)
    con = await asyncpg.connect(dsn)
    await con.execute("DROP TABLE IF EXISTS rawpipe_ledger; DROP TABLE IF EXISTS rawpipe_counters")
    await con.execute("CREATE TABLE rawpipe_ledger (broadcast_id uuid NOT NULL, recipient_id bigint NOT NULL, "
                      "status smallint NOT NULL, ts timestamptz NOT NULL, PRIMARY KEY (broadcast_id, recipient_id))")
    await con.execute("CREATE TABLE rawpipe_counters (broadcast_id uuid PRIMARY KEY, sent bigint NOT NULL DEFAULT 0)")
    await con.execute("INSERT INTO rawpipe_counters VALUES ($1, 0)", _BROADCAST)
    await con.execute("CHECKPOINT")
    nc = await nats.connect(nats_url, pending_size=64 * 1024 * 1024)
    js = nc.jetstream(publish_async_max_pending=4000)
    try:
        await js.delete_stream(_STREAM)
    except NotFoundError:
        pass
    await js.add_stream(StreamConfig(name=_STREAM, subjects=[f"{_SUBJECT}.>"], storage=StorageType.FILE))
    await js.add_consumer(_STREAM, ConsumerConfig(durable_name=_DURABLE, ack_policy=AckPolicy.EXPLICIT,
                                                  max_ack_pending=1000, ack_wait=120))
    ctx = mp.get_context("fork")
    done, last_commit = ctx.Value("i", 0), ctx.Value("d", 0.0)
    go, ready = ctx.Event(), ctx.Semaphore(0)
    workers = [ctx.Process(target=_worker_process, args=(dsn, nats_url, len(jobs), tasks, done, last_commit, go, ready))
               for _ in range(procs)]
    for w in workers:
        w.start()
    try:
        for _ in workers:
            ready.acquire()
        t0 = time.time()
        go.set()
        futures = [await js.publish_async(f"{_SUBJECT}.send", job) for job in jobs]  # publishing is timed too
        await asyncio.gather(*futures)
        while done.value < len(jobs):
            await asyncio.sleep(0.01)
        elapsed = last_commit.value - t0
    finally:
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.kill()
    written = await con.fetchval("SELECT count(*) FROM rawpipe_ledger")
    counted = await con.fetchval("SELECT sent FROM rawpipe_counters")
    assert written == counted == n, (written, counted, n)
    await js.delete_stream(_STREAM)
    await con.execute("DROP TABLE rawpipe_ledger; DROP TABLE rawpipe_counters")
    await con.close()
    await nc.close()
    return elapsed
