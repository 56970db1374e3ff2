"""Clicks and opens written in group commits: each request's event joins the current batch and waits
for that batch's commit, so a redirect is answered only once its click is durable, and a burst of
clicks costs Postgres one transaction per batch rather than one per click.

The batch: a flush takes up to MAX_BATCH events, as soon as that many wait or LINGER_S after the
oldest came, and at most FLUSHES are being written at once per process (under load they all are,
and the next batch takes everything that gathered meanwhile). A flush is one transaction of two
set-based statements (`_RESOLVE`, `_RECORD`) whatever its size, on a connection of the pool.

What is recorded, per event, from the tracking key's row (the code names the key, the key names the
tenant's broadcast, run and channel: a code can touch nothing else):
- only if its signing key is still live (checked in the batch, so a retired key stops counting at
  once, with no query of its own), and
- only if the ledger has the message (`messages` row of the key's broadcast, run, channel and the
  code's contact, whatever its status: a click can come before the sender marked it sent). A code
  whose message was never sent (a test send, a preview) redirects but counts nothing: counters
  count what the broadcast sent, and a row made out of nothing would count a message it never had.
Then: `message_engagement` (opens, proxy_opens, clicks += n; opened_at, proxy_opened_at, clicked_at
set once, the first time), `link_clicks` (clicks += n, first_at kept), and `engagement_counters`
(`opens`/`proxy_opens`/`clicks` += every event, `opened`/`proxy_opened`/`clicked` += the messages
seen for the first time). "First time" is read from the engagement row as it was, under its row
lock (SELECT ... FOR UPDATE, in the primary key's order), so two batches of two API processes
touching one message count it once, and never deadlock on each other (every batch locks rows
in the same order: engagement rows, then counters, then link rows).

Bounded: at most MAX_HELD events wait or are being written per process. Past that, a request
waits for room; a request whose event is not committed within TIMEOUT_S (Postgres down, slow or
locked) gets RecorderUnavailable, a 503: never a redirect for a click that was not written. An
event given up before its batch left is dropped; one given up while its batch was being written
may still be committed (the client then cannot know, like any request cut at its commit: a retry
counts once more in the totals, never in the first-time figures).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
import msgspec

from shared.platform.logging import get_logger
from shared.tracking.cache import TrackingKey

log = get_logger(__name__)

MAX_BATCH = 1000  # events per transaction
LINGER_S = 0.002  # how long the first event of a batch waits for company
FLUSHES = 2  # batches being written at once: the next one goes while the last one commits
MAX_HELD = 20_000  # events waiting or being written, per process
TIMEOUT_S = 5.0  # from a request's arrival to its event's commit, at most
_ATTEMPTS = 3  # a batch that hit a deadlock or a serialization failure is tried again

RECORDED = "recorded"
NOT_SENT = "not_sent"  # the ledger has no such message: nothing counted
RETIRED = "retired"  # the code's signing key was retired: nothing counted, the code is dead


class Engagement(msgspec.Struct, frozen=True, kw_only=True):
    """One click (link >= 1) or open (link 0) of one message, from a verified code."""

    key: TrackingKey
    contact_id: int
    kid: int  # the signing key of the code
    link: int = 0
    proxy: bool = False  # an open by a mail privacy proxy (shared/tracking/proxies.py)


class RecorderUnavailable(Exception):
    """The event was not committed in time (Postgres unreachable, slow or the process overloaded)."""


# Per event: is its signing key live, has the ledger its message; for those that pass, make sure
# their engagement rows exist (so that the next statement can lock them all). ON CONFLICT DO
# NOTHING waits for a concurrent batch inserting the same row, then sees it in the next statement.
_RESOLVE = """
WITH e AS (
    SELECT * FROM unnest($1::uuid[], $2::integer[], $3::text[], $4::bigint[], $5::integer[])
        WITH ORDINALITY AS e(broadcast_id, run, channel, contact_id, kid, ord)
), checked AS (
    SELECT e.*, EXISTS (SELECT FROM signing_keys k WHERE k.kid = e.kid AND k.retired_at IS NULL) AS live,
           EXISTS (SELECT FROM messages m WHERE m.broadcast_id = e.broadcast_id AND m.run = e.run
                                           AND m.contact_id = e.contact_id AND m.channel = e.channel) AS sent
    FROM e
), made AS (
    INSERT INTO message_engagement (broadcast_id, run, contact_id, channel)
    SELECT DISTINCT broadcast_id, run, contact_id, channel FROM checked WHERE live AND sent
    ORDER BY broadcast_id, run, contact_id, channel
    ON CONFLICT DO NOTHING
)
SELECT live, sent FROM checked ORDER BY ord
"""

# The events that passed, counted. `locked` takes each engagement row's lock and reads it as the
# last committed batch left it (FOR UPDATE reads the newest version); the UPDATE then adds to that
# version, and RETURNING says which messages this batch saw first.
_RECORD = """
WITH e AS (
    SELECT * FROM unnest($1::uuid[], $2::integer[], $3::text[], $4::bigint[], $5::bigint[], $6::integer[],
                         $7::boolean[]) AS e(broadcast_id, run, channel, contact_id, key, link, proxy)
), per_message AS (
    SELECT broadcast_id, run, contact_id, channel,
           count(*) FILTER (WHERE link = 0 AND NOT proxy)::integer AS opens,
           count(*) FILTER (WHERE link = 0 AND proxy)::integer AS proxy_opens,
           count(*) FILTER (WHERE link > 0)::integer AS clicks
    FROM e GROUP BY broadcast_id, run, contact_id, channel
), locked AS (
    SELECT me.broadcast_id, me.run, me.contact_id, me.channel, me.opened_at, me.proxy_opened_at, me.clicked_at
    FROM message_engagement me JOIN per_message p USING (broadcast_id, run, contact_id, channel)
    ORDER BY me.broadcast_id, me.run, me.contact_id, me.channel
    FOR UPDATE OF me
), counted AS (
    UPDATE message_engagement me SET
        opens = me.opens + p.opens, proxy_opens = me.proxy_opens + p.proxy_opens, clicks = me.clicks + p.clicks,
        opened_at = CASE WHEN p.opens > 0 THEN coalesce(me.opened_at, now()) ELSE me.opened_at END,
        proxy_opened_at = CASE WHEN p.proxy_opens > 0 THEN coalesce(me.proxy_opened_at, now())
                               ELSE me.proxy_opened_at END,
        clicked_at = CASE WHEN p.clicks > 0 THEN coalesce(me.clicked_at, now()) ELSE me.clicked_at END
    FROM per_message p JOIN locked was USING (broadcast_id, run, contact_id, channel)
    WHERE me.broadcast_id = p.broadcast_id AND me.run = p.run AND me.contact_id = p.contact_id
      AND me.channel = p.channel
    RETURNING me.broadcast_id, me.run, me.channel, p.opens, p.proxy_opens, p.clicks,
              p.opens > 0 AND was.opened_at IS NULL AS first_open,
              p.proxy_opens > 0 AND was.proxy_opened_at IS NULL AS first_proxy_open,
              p.clicks > 0 AND was.clicked_at IS NULL AS first_click
), links AS (
    INSERT INTO link_clicks AS lc (key, link, contact_id, clicks, first_at, last_at)
    SELECT key, link, contact_id, count(*), now(), now() FROM e WHERE link > 0
    GROUP BY key, link, contact_id ORDER BY key, link, contact_id
    ON CONFLICT (key, link, contact_id) DO UPDATE SET clicks = lc.clicks + excluded.clicks, last_at = excluded.last_at
)
INSERT INTO engagement_counters AS ec (broadcast_id, run, channel, opened, opens, proxy_opened, proxy_opens,
                                       clicked, clicks)
SELECT broadcast_id, run, channel, count(*) FILTER (WHERE first_open), sum(opens),
       count(*) FILTER (WHERE first_proxy_open), sum(proxy_opens), count(*) FILTER (WHERE first_click), sum(clicks)
FROM counted GROUP BY broadcast_id, run, channel ORDER BY broadcast_id, run, channel
ON CONFLICT (broadcast_id, run, channel) DO UPDATE SET
    opened = ec.opened + excluded.opened, opens = ec.opens + excluded.opens,
    proxy_opened = ec.proxy_opened + excluded.proxy_opened, proxy_opens = ec.proxy_opens + excluded.proxy_opens,
    clicked = ec.clicked + excluded.clicked, clicks = ec.clicks + excluded.clicks
"""


async def write_batch(con: asyncpg.Connection, events: list[Engagement]) -> list[str]:
    """Record `events` in one transaction; each one's outcome (RECORDED, NOT_SENT, RETIRED), in order."""
    async with con.transaction():
        checked = await con.fetch(
            _RESOLVE, [e.key.broadcast_id for e in events], [e.key.run for e in events],
            [e.key.channel for e in events], [e.contact_id for e in events], [e.kid for e in events],
        )
        outcomes = [RECORDED if r["live"] and r["sent"] else RETIRED if not r["live"] else NOT_SENT for r in checked]
        taken = [e for e, outcome in zip(events, outcomes) if outcome == RECORDED]
        if taken:
            await con.execute(
                _RECORD, [e.key.broadcast_id for e in taken], [e.key.run for e in taken],
                [e.key.channel for e in taken], [e.contact_id for e in taken], [e.key.key for e in taken],
                [e.link for e in taken], [e.proxy for e in taken],
            )
    return outcomes


@dataclass(eq=False)
class _Waiting:
    event: Engagement
    answer: asyncio.Future[str]
    since: float


@dataclass
class _Stats:
    """What a recorder did (for tests and the bench)."""

    batches: int = 0
    events: int = 0
    largest: int = 0
    failed_batches: int = 0


class Recorder:
    """One process's group commit of clicks and opens (see the module). Built once per app: the
    flushing task runs only while events wait, so there is nothing to start or stop."""

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = MAX_BATCH, linger_s: float = LINGER_S,
                 max_held: int = MAX_HELD, timeout_s: float = TIMEOUT_S, flushes: int = FLUSHES) -> None:
        if max_batch < 1 or max_held < max_batch or flushes < 1:
            raise ValueError("max_batch and flushes must be at least 1, and max_held at least max_batch")
        self.pool, self.max_batch, self.linger_s = pool, max_batch, linger_s
        self.max_held, self.timeout_s = max_held, timeout_s
        self._slots = asyncio.Semaphore(flushes)
        self._flushing: set[asyncio.Task[None]] = set()  # referenced, so that none is collected mid-flush
        self.stats = _Stats()
        self._waiting: list[_Waiting] = []
        self._held = 0  # waiting + being written
        self._full = asyncio.Event()  # a batch's worth waits
        self._room = asyncio.Event()  # an event left: a request held back may go in
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, event: Engagement) -> str:
        """Add `event` to the current batch and wait for its commit; its outcome (RECORDED, NOT_SENT,
        RETIRED). RecorderUnavailable when it was not committed within `timeout_s`."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                while self._held >= self.max_held:
                    self._room.clear()
                    await self._room.wait()
                waiting = _Waiting(event, loop.create_future(), loop.time())
                self._waiting.append(waiting)
                self._held += 1
                self._wake()
                # Cancelled (the timeout, or the client went away) before its batch left: the
                # answer is cancelled too, and the flusher drops the event.
                return await waiting.answer
        except TimeoutError:
            raise RecorderUnavailable(f"not committed within {self.timeout_s} s") from None

    def _wake(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_while_waiting())
        if len(self._waiting) >= self.max_batch:
            self._full.set()

    async def _flush_while_waiting(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            linger = self._waiting[0].since + self.linger_s - loop.time()
            if linger > 0 and len(self._waiting) < self.max_batch:
                self._full.clear()
                try:
                    async with asyncio.timeout(linger):
                        await self._full.wait()
                except TimeoutError:
                    pass
            await self._slots.acquire()  # what gathers meanwhile goes in this batch
            batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
            self._flushing.add(asyncio.create_task(self._flush_and_free(batch)))

    async def _flush_and_free(self, batch: list[_Waiting]) -> None:
        try:
            await self._flush([w for w in batch if not w.answer.done()])
        finally:
            self._slots.release()
            self._held -= len(batch)
            self._room.set()
            self._flushing.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _flush(self, batch: list[_Waiting]) -> None:
        if not batch:
            return
        events = [w.event for w in batch]
        try:
            async with asyncio.timeout(self.timeout_s):
                outcomes = await self._write(events)
        except Exception as exc:  # Postgres down or slow, a statement refused: every waiter gets a 503
            self.stats.failed_batches += 1
            log.warning("engagement batch not written", events=len(events), error=repr(exc))
            for w in batch:
                if not w.answer.done():
                    w.answer.set_exception(RecorderUnavailable(repr(exc)))
            return
        self.stats.batches += 1
        self.stats.events += len(events)
        self.stats.largest = max(self.stats.largest, len(events))
        for w, outcome in zip(batch, outcomes):
            if not w.answer.done():
                w.answer.set_result(outcome)

    async def _write(self, events: list[Engagement]) -> list[str]:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with self.pool.acquire() as con:
                    return await write_batch(con, events)
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if attempt == _ATTEMPTS:
                    raise
        raise AssertionError("unreachable")
