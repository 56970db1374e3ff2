"""What a verified click or open code points at, cached per process: its tracking key's row (tenant,
broadcast, run, channel) and, for a click, the stored URL of its link.

Both are written once, before the first message carrying them goes out, and never change, so a
process may keep them as long as it likes: a bounded LRU each (a burst of clicks on one broadcast
costs one query, then none). Concurrent misses of one entry share one query, so the first seconds
of a burst do not send Postgres one query per request. Absent rows are not cached: only a genuine
code can ask (codes are signed), and it asks again at most once per request.
"""
from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import asyncpg
import msgspec

MAX_KEYS = 10_000  # tracking keys remembered: a run's content on one channel each
MAX_LINKS = 20_000  # link URLs remembered (a broadcast has tens of links)
T = TypeVar("T")


class TrackingKey(msgspec.Struct, frozen=True, kw_only=True):
    """A tracking key's row: the one broadcast (of one tenant) its codes may ever touch."""

    key: int
    tenant_id: uuid.UUID
    broadcast_id: uuid.UUID
    run: int
    channel: str


class Link(msgspec.Struct, frozen=True, kw_only=True):
    """A click's destination: the stored URL of link `link` of the key's messages."""

    key: TrackingKey
    url: str


_KEY = "SELECT key, tenant_id, broadcast_id, run, channel FROM tracking_keys WHERE key = $1"
_LINK = """SELECT k.key, k.tenant_id, k.broadcast_id, k.run, k.channel, l.url
           FROM tracking_keys k JOIN tracked_links l ON l.key = k.key AND l.link = $2 WHERE k.key = $1"""


class _Lru:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, slot: Hashable) -> Any:
        found = self.items.get(slot)
        if found is not None:
            self.items.move_to_end(slot)
        return found

    def put(self, slot: Hashable, value: Any) -> None:
        self.items[slot] = value
        self.items.move_to_end(slot)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class TrackingCache:
    """Tracking keys and link URLs by their numbers, read through from Postgres (see the module)."""

    def __init__(self, pool: asyncpg.Pool, *, max_keys: int = MAX_KEYS, max_links: int = MAX_LINKS) -> None:
        self.pool = pool
        self._keys, self._links = _Lru(max_keys), _Lru(max_links)
        self._loading: dict[Hashable, asyncio.Task[Any]] = {}
        self.queries = 0  # how many reads reached Postgres (for tests and the bench)

    async def key(self, key: int) -> TrackingKey | None:
        """The tracking key's row, or None if there is no such key."""
        found = self._keys.get(key)
        if found is None:
            found = await self._load(("key", key), lambda con: con.fetchrow(_KEY, key), self._remember_key)
        return found

    async def link(self, key: int, link: int) -> Link | None:
        """Link `link` of the key's messages (and the key's row), or None if there is no such link."""
        found = self._links.get((key, link))
        if found is None:
            found = await self._load(("link", key, link), lambda con: con.fetchrow(_LINK, key, link),
                                     lambda row: self._remember_link(link, row))
        return found

    def _remember_key(self, row: asyncpg.Record) -> TrackingKey:
        found = TrackingKey(key=row["key"], tenant_id=row["tenant_id"], broadcast_id=row["broadcast_id"],
                            run=row["run"], channel=row["channel"])
        self._keys.put(found.key, found)
        return found

    def _remember_link(self, link: int, row: asyncpg.Record) -> Link:
        found = Link(key=self._remember_key(row), url=row["url"])
        self._links.put((found.key.key, link), found)
        return found

    async def _load(self, slot: Hashable, fetch: Callable[[asyncpg.Connection], Awaitable[asyncpg.Record | None]],
                    remember: Callable[[asyncpg.Record], T]) -> T | None:
        task = self._loading.get(slot)
        if task is None:
            async def load() -> T | None:
                try:
                    self.queries += 1
                    async with self.pool.acquire() as con:
                        row = await fetch(con)
                    return remember(row) if row is not None else None
                finally:
                    del self._loading[slot]

            task = self._loading[slot] = asyncio.ensure_future(load())
            task.add_done_callback(_retrieved)  # its error is each waiter's; none left must not warn
        # Shielded: a waiter that gives up (its client went away) leaves the query to the others.
        return await asyncio.shield(task)


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
