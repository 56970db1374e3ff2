"""A relay process for the crash tests: run with `python -m tests.relay_victim ...` and SIGKILL it.

Modes:
  relay   run shared.platform.relay.run_relay directly (no leader lock).
  leader  compete for the "relay" leader lock with shared.platform.leader.run_as_leader; while leader, run
          the relay and insert this process's pid into --beat-table every --beat-interval seconds.

--batch overrides shared.platform.relay.BATCH (smaller batches make a mid-stream kill land between a
batch's acks and its checkpoint). --hang-after N lets exactly N JetStream publishes through and
then blocks the next one forever, so the test can kill the process at a known point: events
published, their batch's checkpoint not saved, later events committed but never published.
"""
from __future__ import annotations

import argparse
import asyncio
import os

from shared.platform import bus, db, relay
from shared.platform.leader import run_as_leader
from shared.platform.logging import configure_logging
from shared.platform.settings import Settings


def _throttle_publishes(js, hang_after: int | None, delay: float) -> None:
    original = js.publish_async
    sent = 0

    async def publish_async(*args, **kwargs):
        nonlocal sent
        if hang_after is not None and sent >= hang_after:
            print(f"victim: hanging after {sent} publishes", flush=True)
            await asyncio.Event().wait()  # until SIGKILL
        if delay:
            await asyncio.sleep(delay)
        sent += 1
        return await original(*args, **kwargs)

    js.publish_async = publish_async


async def main(args: argparse.Namespace) -> None:
    configure_logging("console", "info")
    if args.batch:
        relay.BATCH = args.batch
    settings = Settings(database_url=args.db, nats_url=args.nats, nats_prefix=args.prefix)
    pool = await db.create_pool(args.db, min_size=1, max_size=4)
    nc = await bus.connect(args.nats, f"relay-victim-{os.getpid()}")
    js = nc.jetstream()
    names = await bus.ensure_streams(js, settings)
    _throttle_publishes(js, args.hang_after, args.publish_delay)
    print(f"victim: ready pid={os.getpid()}", flush=True)

    if args.mode == "relay":
        listen_con = await db.connect(args.db)
        await relay.run_relay(pool, listen_con, js, names, args.poll)
        return

    async def beat() -> None:
        while True:
            await pool.execute(f"INSERT INTO {args.beat_table} (pid) VALUES ($1)", os.getpid())
            await asyncio.sleep(args.beat_interval)

    async def task(con) -> None:
        beating = asyncio.create_task(beat())
        try:
            await relay.run_relay(pool, con, js, names, args.poll)
        finally:
            beating.cancel()

    def on_leader() -> None:
        print(f"victim: leader pid={os.getpid()}", flush=True)

    await run_as_leader(args.db, "relay", task, retry_interval=args.retry_interval, on_leader=on_leader)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--mode", choices=("relay", "leader"), default="relay")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--hang-after", type=int, default=None)
    parser.add_argument("--publish-delay", type=float, default=0.0)
    parser.add_argument("--poll", type=float, default=0.2)
    parser.add_argument("--retry-interval", type=float, default=0.2)
    parser.add_argument("--beat-table", default="leader_beats")
    parser.add_argument("--beat-interval", type=float, default=0.1)
    asyncio.run(main(parser.parse_args()))
