"""Fair shares of the job queue: which runs hand how many more batches to JetStream now.

JetStream's work queue is first come, first served: a job waits behind every job published
before it. So the queue is kept short, a fraction of a second of work (the dispatcher measures
how fast workers take jobs and gives a `budget` of new jobs), and each top-up goes, one job at a
time, to the tenant with the fewest jobs in flight, and within it to its run with the fewest. A
ten-recipient broadcast is then next in line, never behind a million. Caps per run and per tenant
bound what one of them may have in flight at all; a paced run gets one batch when it is due.

Pure: the dispatcher reads the runs, the queue and the time; this decides.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import msgspec

RunKey = tuple[uuid.UUID, int]  # (broadcast id, run)


class RunWindow(msgspec.Struct, frozen=True, kw_only=True):
    """One run with batches not yet handed out, as the dispatcher found it."""

    key: RunKey
    tenant_id: uuid.UUID
    in_flight: int  # published, not finished
    unpublished: int  # written by the planner, not handed out yet
    paused: bool = False
    delay_ms: int = 0  # the provider's batch_delay_ms: 0 is unpaced
    next_due_at: datetime | None = None  # a paced run's next batch, no earlier


class Shares(msgspec.Struct, frozen=True, kw_only=True):
    batches: dict[RunKey, int]  # runs that may publish now, and how many batches
    next_due_at: datetime | None  # the earliest paced batch due later (the dispatcher wakes then)


def shares(runs: list[RunWindow], now: datetime, budget: int, run_window: int, tenant_window: int) -> Shares:
    """Hand out up to `budget` new jobs, one at a time, each to the run whose tenant has the fewest
    jobs in flight (then the run with the fewest, then the oldest key), within the caps."""
    wanted: dict[RunKey, int] = {}
    later: list[datetime] = []
    for r in runs:
        if r.paused or r.unpublished <= 0:
            continue
        room = min(r.unpublished, max(run_window - r.in_flight, 0))
        if r.delay_ms > 0 and room:
            if r.next_due_at is not None and r.next_due_at > now:
                later.append(r.next_due_at)
                continue
            room = 1
        if room:
            wanted[r.key] = room

    tenant_of = {r.key: r.tenant_id for r in runs}
    tenant_load: dict[uuid.UUID, int] = {}
    for r in runs:
        tenant_load[r.tenant_id] = tenant_load.get(r.tenant_id, 0) + r.in_flight
    run_load = {r.key: r.in_flight for r in runs if r.key in wanted}
    granted: dict[RunKey, int] = {}
    while budget > 0 and run_load:
        key = min(run_load, key=lambda k: (tenant_load[tenant_of[k]], run_load[k], k))
        tenant = tenant_of[key]
        if tenant_load[tenant] >= tenant_window:  # the least loaded tenant is full: so is every other
            break
        granted[key] = granted.get(key, 0) + 1
        run_load[key] += 1
        tenant_load[tenant] += 1
        budget -= 1
        if granted[key] == wanted[key]:
            del run_load[key]
    return Shares(batches=granted, next_due_at=min(later, default=None))


def next_due(now: datetime, delay_ms: int) -> datetime | None:
    """When a paced run may publish again after publishing now (None: unpaced)."""
    return now + timedelta(milliseconds=delay_ms) if delay_ms > 0 else None


def queue_budget(jobs_per_s: float, waiting: int, idle_workers: int, backlog_s: float,
                 least: int = 2, most: int = 64) -> int:
    """New jobs the queue may take now: enough to keep `backlog_s` of work (at the rate workers
    take jobs) waiting, `least` to `most` jobs, plus one for every worker asking for a job;
    minus those already waiting."""
    target = min(max(round(jobs_per_s * backlog_s), least), most) + idle_workers
    return max(target - waiting, 0)
