"""Live progress of broadcasts: the status and counters, pushed as they change.

Every change of a broadcast's status or counters is an event the projector folds (status changes
are broadcast events, counters come from batch outcomes). So the projector's leader runs the
progress feed: after each batch of events it folds has committed, it marks the broadcasts they
touched, and the feed reads those from Postgres and publishes them on
`<prefix>crier.progress.<tenant>.broadcast.<id>` (core NATS, not stored: a live feed, the durable
record is the event stream), at most every INTERVAL_S, and not at all while nothing changes.

The SSE endpoint `GET /v1/broadcasts/{id}/progress` subscribes to that subject, on the API's one
NATS connection, sends a snapshot read from Postgres and then forwards what is published: open
streams cost Postgres nothing per update, however many there are. Core NATS is at most once (a
message published while the API's connection is down is gone, as are the updates of a projector
that died between its commit and its publish), so each stream also reads Postgres again every
`progress_reread_s` (5 s): a lost update is late, never missing, and a stream never hangs on a
`finished` that was lost.

A message and a read may cross: a message published before a stream's read can arrive after it.
Each snapshot therefore carries a stamp (in the `Crier-Progress-Stamp` header, outside the
payload subscribers read) and a stream never goes back to an older state.

Opens, clicks, receipts and unsubscribes change the counters without an event: nothing publishes
them, and a stream shows them at its next re-read (or with the next published snapshot, while a
run sends). The stamp counts them too, so such a re-read is news and goes out.
"""
from __future__ import annotations

import asyncio
import random
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.broadcasts import decider as b
from shared.broadcasts.counters import Counters, CountersView, counters_of, shown
from shared.broadcasts.status import ACTIVE, ENDED
from shared.platform import codec
from shared.platform.bus import Names
from shared.platform.eventstore import RecordedEvent
from shared.platform.logging import get_logger
from shared.sending import batch as bt

log = get_logger(__name__)
INTERVAL_S = 0.25  # the feed publishes a broadcast at most this often
STAMP_HEADER = "Crier-Progress-Stamp"
_REMEMBERED = 10_000  # broadcasts whose last published snapshot the feed remembers


class Stamp(msgspec.Struct, frozen=True, array_like=True):
    """Which state a snapshot shows: the broadcast's stream version (status and run, from the inline
    view), how far the counters are folded (the counters projection's checkpoint) and the sum of its
    engagement figures (opens, clicks, receipts, unsubscribes: written outside the event log, and
    only ever added to). All only grow and every change of a snapshot moves one, so of two reads
    the later one is never behind in any: a stamp ahead in any part is a later state. (`engaged`
    last and 0 when left out: a stamp from a process without it still reads.)"""

    version: int
    folded_transaction: int
    folded_position: int
    engaged: int = 0

    def after(self, other: Stamp | None) -> bool:
        return other is None or self.version > other.version or (
            (self.folded_transaction, self.folded_position) > (other.folded_transaction, other.folded_position)
        ) or self.engaged > other.engaged


class Progress(msgspec.Struct, frozen=True):
    """One broadcast's snapshot as clients see it, and its stamp."""

    snapshot: dict[str, Any]
    stamp: Stamp


class Found(msgspec.Struct, frozen=True):
    tenant_id: uuid.UUID
    progress: Progress


async def read(
    con: asyncpg.Connection, broadcast_ids: list[uuid.UUID], tenant_id: uuid.UUID | None = None
) -> dict[uuid.UUID, Found]:
    """The progress of these broadcasts (of `tenant_id` only, if given; deleted ones are left out).

    One REPEATABLE READ transaction: the row, the checkpoint and the counters come from one
    snapshot of the database, so the stamp says exactly which state the snapshot shows."""
    async with con.transaction(isolation="repeatable_read", readonly=True):
        rows = await con.fetch(
            """SELECT b.id, b.tenant_id, b.status, b.run, b.version,
                      coalesce(c.transaction_id, '0'::xid8) AS folded_transaction,
                      coalesce(c.global_position, 0) AS folded_position
               FROM broadcasts b LEFT JOIN checkpoints c ON c.name = $2
               WHERE b.id = ANY($1::uuid[]) AND NOT b.deleted AND ($3::uuid IS NULL OR b.tenant_id = $3)""",
            broadcast_ids, CountersView.name, tenant_id,
        )
        counters = await counters_of(con, [r["id"] for r in rows])
    return {
        r["id"]: Found(r["tenant_id"], Progress(
            {"broadcast_id": str(r["id"]), "status": r["status"], "run": r["run"],
             "counters": shown(counters.get(r["id"]), r["status"])},
            Stamp(r["version"], r["folded_transaction"], r["folded_position"],
                  (counters.get(r["id"]) or Counters()).engaged()),
        ))
        for r in rows
    }


async def snapshot(con: asyncpg.Connection, tenant_id: uuid.UUID, broadcast_id: uuid.UUID) -> dict[str, Any] | None:
    found = (await read(con, [broadcast_id], tenant_id)).get(broadcast_id)
    return found.progress.snapshot if found else None


# -- publishing ------------------------------------------------------------------------------------


async def publish(nc: NATS, names: Names, tenant_id: uuid.UUID, progress: Progress) -> None:
    await nc.publish(
        names.progress_subject(str(tenant_id), progress.snapshot["broadcast_id"]),
        msgspec.json.encode(progress.snapshot),
        headers={STAMP_HEADER: msgspec.json.encode(progress.stamp).decode()},
    )


def touched(events: list[RecordedEvent]) -> set[uuid.UUID]:
    """The broadcasts whose status or counters these events may have changed."""
    found: set[uuid.UUID] = set()
    for event in events:
        if event.category == b.CATEGORY:
            found.add(b.id_from_stream(event.stream_name))
        elif event.category == bt.CATEGORY:
            found.add(codec.from_recorded(event, bt.Event).broadcast_id)
    return found


class ProgressFeed:
    """Publishes the broadcasts the projector marks, from a task of its own (`run`), so the
    projector never waits on it. Marks gather while a round publishes: a broadcast goes out at
    most every INTERVAL_S, with its latest state.

    Only runs are announced (docs/events.md): a broadcast goes out when its snapshot differs from
    the one last published and it is in a run (ACTIVE), a run of it ended (ENDED), or it was
    published before (a run stopped back to draft, a recurring one rescheduled). Editing a draft
    publishes nothing."""

    def __init__(self, pool: asyncpg.Pool, nc: NATS, names: Names, interval_s: float = INTERVAL_S) -> None:
        self.pool, self.nc, self.names, self.interval_s = pool, nc, names, interval_s
        self._marked: set[uuid.UUID] = set()
        self._wake = asyncio.Event()
        self._last: OrderedDict[uuid.UUID, dict[str, Any]] = OrderedDict()

    def committed(self, events: list[RecordedEvent]) -> None:
        """The projector's after-commit hook: note what changed, publish nothing yet."""
        if marked := touched(events):
            self._marked |= marked
            self._wake.set()

    async def run(self) -> None:
        """Publish what is marked, round after round, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            marked, self._marked = self._marked, set()
            try:
                await self.publish_changed(marked)
            except (asyncpg.PostgresError, OSError, nats.errors.Error) as exc:
                log.warning("progress publishing failed, will retry", error=str(exc))
                self._marked |= marked  # the next round tries them again
                self._wake.set()
            await asyncio.sleep(self.interval_s)

    async def publish_changed(self, broadcast_ids: set[uuid.UUID]) -> None:
        async with self.pool.acquire() as con:
            found = await read(con, list(broadcast_ids))
        for broadcast_id, f in found.items():
            snap = f.progress.snapshot
            if self._last.get(broadcast_id) == snap:
                continue
            if broadcast_id not in self._last and snap["status"] not in ACTIVE | ENDED:
                continue
            await publish(self.nc, self.names, f.tenant_id, f.progress)
            self._remember(broadcast_id, snap)

    def _remember(self, broadcast_id: uuid.UUID, snap: dict[str, Any]) -> None:
        # Bounded, oldest first out: a forgotten broadcast's next change goes out even if it is the
        # same state as the last one (say, the run's finishing event folded after its last batch).
        self._last[broadcast_id] = snap
        self._last.move_to_end(broadcast_id)
        if len(self._last) > _REMEMBERED:
            self._last.popitem(last=False)


# -- following one broadcast (the SSE endpoint) ----------------------------------------------------


class Update(msgspec.Struct, frozen=True):
    """What a stream sends: a snapshot (`final`: the last one), or None, a heartbeat, when a whole
    re-read interval brought nothing new (it keeps proxies from closing an idle stream)."""

    snapshot: dict[str, Any] | None
    final: bool = False


class _Newest:
    """The newest state heard on the subject, in one slot: a client slower than the updates skips
    states rather than falling behind, and a stream holds one snapshot, not a queue."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._ready = asyncio.Event()

    async def put(self, msg: Msg) -> None:  # the subscription's callback
        try:
            progress = Progress(msgspec.json.decode(msg.data),
                                msgspec.json.decode((msg.headers or {})[STAMP_HEADER], type=Stamp))
        except (KeyError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignored a progress message", subject=msg.subject, error=repr(exc))
            return
        if progress.stamp.after(self._progress.stamp if self._progress else None):
            self._progress = progress
            self._ready.set()

    async def take(self, timeout: float) -> Progress | None:
        """The newest state heard, waiting at most `timeout` for one; None if none came."""
        try:
            async with asyncio.timeout(max(timeout, 0)):  # not wait_for: see Wakeup.wait
                await self._ready.wait()
        except TimeoutError:
            return None
        self._ready.clear()
        progress, self._progress = self._progress, None
        return progress


class _Sent:
    """What one stream has sent: the newest stamp, the last snapshot, whether it saw a run."""

    def __init__(self) -> None:
        self.stamp: Stamp | None = None
        self.snapshot: dict[str, Any] | None = None
        self.saw_running = False

    def update(self, progress: Progress) -> Update | None:
        """The update to send for `progress`, or None: older than what was sent, or the same."""
        if not progress.stamp.after(self.stamp):
            return None
        self.stamp = progress.stamp
        if progress.snapshot == self.snapshot:
            return None
        self.snapshot = progress.snapshot
        status = progress.snapshot["status"]
        self.saw_running = self.saw_running or status in ACTIVE
        # Ends once a run it saw under way ends, or at once on a broadcast already finished; on a
        # draft or scheduled one it waits for the run to start.
        return Update(progress.snapshot, final=status in ENDED or (self.saw_running and status not in ACTIVE))


class _Gone(Exception):
    """The broadcast followed was deleted."""


async def _reread(pool: asyncpg.Pool, tenant_id: uuid.UUID, broadcast_id: uuid.UUID) -> Progress | None:
    """The broadcast's progress in Postgres, or None when Postgres cannot be read just now: the
    stream goes on with what NATS brings and tries again at its next re-read. _Gone once deleted
    (which publishes nothing: a deleted broadcast had no run going)."""
    try:
        async with pool.acquire() as con:
            found = (await read(con, [broadcast_id], tenant_id)).get(broadcast_id)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        log.warning("a progress stream could not read Postgres", broadcast_id=str(broadcast_id), error=str(exc))
        return None
    if found is None:
        raise _Gone
    return found.progress


async def _listen(nc: NATS, subject: str, heard: _Newest) -> Subscription:
    """Subscribe `heard` to `subject`, and make sure the server has our interest before the first
    read, so that whatever changes after that read is heard. NATS away (reconnecting): the stream
    starts anyway, its re-reads keep it going, and nats-py subscribes again once it is back."""
    sub = await nc.subscribe(subject, cb=heard.put)
    try:
        await nc.flush(timeout=2)
    except nats.errors.Error as exc:
        log.warning("a progress stream starts without NATS", subject=subject, error=repr(exc))
    return sub


async def follow(
    pool: asyncpg.Pool, nc: NATS, names: Names, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, reread_s: float,
) -> AsyncIterator[Update]:
    """The updates of one of `tenant_id`'s broadcasts until the last one (or its deletion).

    The subject names the tenant, so a stream only ever hears its own tenant's broadcast."""
    heard = _Newest()
    sub = await _listen(nc, names.progress_subject(str(tenant_id), str(broadcast_id)), heard)
    try:
        sent = _Sent()
        loop = asyncio.get_running_loop()
        while True:
            try:
                progress = await _reread(pool, tenant_id, broadcast_id)
            except _Gone:
                return
            news = False
            # Forward what is published until the next re-read, jittered so that streams opened
            # together (clients reconnecting after a restart) do not all read at once.
            deadline = loop.time() + reread_s * random.uniform(0.8, 1.2)
            while True:
                if progress is not None and (update := sent.update(progress)) is not None:
                    news = True
                    yield update
                    if update.final:
                        return
                if (progress := await heard.take(deadline - loop.time())) is None:
                    break
            if not news:
                yield Update(None)
    finally:
        try:
            await sub.unsubscribe()
        except nats.errors.Error:  # the connection is closing: its subscriptions go with it
            pass
