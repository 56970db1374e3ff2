"""Progress streams (SSE) forward what the progress feed publishes on NATS: a change reaches every
open stream from the feed's one read of Postgres, and no stream polls Postgres for it; Postgres is
read again now and then in case a message was lost; and no tenant hears another's broadcasts.

The API under test runs no background tasks: the tests step the projector and run the feed
themselves, so that Postgres changes and NATS messages happen exactly when the test says."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
import httpx
import msgspec
import nats

from api_service.app import create_app
from shared.broadcasts.counters import CountersView
from shared.broadcasts.progress import ProgressFeed
from shared.platform import db, projections
from shared.platform.bus import Names
from shared.platform.settings import Settings
from tests.api_helpers import (  # noqa: F401  (tenant_tokens is a fixture)
    BROADCASTS,
    TenantTokens,
    assert_problem,
    bearer,
    tenant_tokens,
)
from tests.stack import Api, served

STREAMS = 20  # open streams on one broadcast (a polling stream read Postgres four times a second)


class Follower:
    """One client of a progress stream, reading it in a task of its own: what it got so far, as
    (event, data) pairs, ("comment", None) for a heartbeat, and whether the server ended it."""

    def __init__(self, response: httpx.Response) -> None:
        self.got: list[tuple[str, dict | None]] = []
        self.ended = False
        self._task = asyncio.create_task(self._read(response))

    async def _read(self, response: httpx.Response) -> None:
        event = ""
        async for line in response.aiter_lines():
            if line.startswith(":"):
                self.got.append(("comment", None))
            elif line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                self.got.append((event, msgspec.json.decode(line.split(":", 1)[1].strip())))
        self.ended = True

    @property
    def statuses(self) -> list[str]:
        return [data["status"] for _, data in self.got if data is not None]


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until `predicate` holds; returns how long that took (an AssertionError after `timeout`)."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout, f"gave up waiting: {what}"
        await asyncio.sleep(0.01)
    return time.monotonic() - began


async def broadcast_to_send(api: Api) -> str:
    """A draft broadcast that can be sent: two contacts in a list, and a null provider."""
    ids = (await api.post("/v1/contacts", [{"external_id": f"p{i}", "email": f"p{i}@example.com"}
                                           for i in range(2)]))["ids"]
    lst = await api.post("/v1/lists", {"name": "both"})
    await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
    provider = await api.post("/v1/providers", {"name": "null", "channel": "email", "kind": "null",
                                                "from_email": "news@example.com"})
    created = await api.post(BROADCASTS, {"name": "News", "list_id": lst["id"], "provider_id": provider["id"],
                                          "content": {"subject": "Hi", "text": "Hello"}})
    return created["id"]


class Projector:
    """The projector and its progress feed, stepped by the test."""

    def __init__(self, pool: asyncpg.Pool, nc: nats.NATS, names: Names) -> None:
        self.pool, self.feed = pool, ProgressFeed(pool, nc, names)

    async def step(self) -> None:
        await projections.catch_up(self.pool, CountersView(), committed=self.feed.committed)


@asynccontextmanager
async def stack(settings: Settings, t: TenantTokens, **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Projector, nats.NATS]]:
    """The API (no background tasks, no request limits), a stepped projector with its feed
    publishing, and a NATS connection of the test's own."""
    under_test = msgspec.structs.replace(settings, run_background=False, rate_limits=False, **overrides)
    async with AsyncExitStack() as exit_stack:
        base_url = await exit_stack.enter_async_context(served(create_app(under_test)))
        client = await exit_stack.enter_async_context(httpx.AsyncClient(base_url=base_url, timeout=30))
        pool = await db.create_pool(settings.database_url, min_size=1, max_size=4)
        exit_stack.push_async_callback(pool.close)
        nc = await nats.connect(settings.nats_url)
        exit_stack.push_async_callback(nc.close)
        projector = Projector(pool, nc, Names(settings.nats_prefix))
        feed = asyncio.create_task(projector.feed.run())
        exit_stack.callback(feed.cancel)
        yield client, projector, nc


async def open_streams(client: httpx.AsyncClient, exit_stack: AsyncExitStack, broadcast_id: str, token: Any,
                       count: int) -> list[Follower]:
    responses = [await exit_stack.enter_async_context(
        client.stream("GET", f"{BROADCASTS}/{broadcast_id}/progress", headers=bearer(token))) for _ in range(count)]
    assert [r.status_code for r in responses] == [200] * count
    return [Follower(r) for r in responses]


async def test_open_streams_hear_a_change_from_nats_and_none_polls_postgres_for_it(settings, tenant_tokens):
    t = tenant_tokens
    # Streams that would not read Postgres again within the test on their own
    async with stack(settings, t, progress_reread_s=60.0) as (client, projector, nc), AsyncExitStack() as streams:
        api = Api(client, t.a_write.token)
        broadcast_id = await broadcast_to_send(api)
        heard_by_b: list[str] = []  # anything published under tenant B's subjects

        async def on_b(msg: Any) -> None:
            heard_by_b.append(msg.subject)

        await nc.subscribe(Names(settings.nats_prefix).progress_subject(str(t.b_id), "*"), cb=on_b)
        # Given many clients following a draft
        followers = await open_streams(client, streams, broadcast_id, t.a_read, STREAMS)
        await until(lambda: all(f.statuses == ["draft"] for f in followers), 10, "every stream's first snapshot")

        # When it is sent: the change is in Postgres, not yet published (the projector has not run)
        await api.post(f"{BROADCASTS}/{broadcast_id}/send", expect=202)
        await asyncio.sleep(1.5)
        # Then no stream has it: none polls Postgres (polling streams each read it six times by now)
        assert all(f.statuses == ["draft"] for f in followers)

        # When the projector folds it, and the feed reads it once and publishes it
        await projector.step()
        # Then every stream has it at once
        took = await until(lambda: all(f.statuses == ["draft", "queued"] for f in followers), 5,
                           "the published update on every stream")
        assert took < 1.0

        # And when the run ends, every stream ends with it
        await api.post(f"{BROADCASTS}/{broadcast_id}/cancel")
        await projector.step()
        await until(lambda: all(f.ended for f in followers), 5, "every stream ended")
        assert all([e for e, _ in f.got] == ["progress", "progress", "finished"] for f in followers)
        assert all(f.statuses == ["draft", "queued", "cancelled"] for f in followers)
        assert heard_by_b == []


async def test_a_tenant_cannot_follow_another_tenants_broadcast(settings, tenant_tokens):
    t = tenant_tokens
    async with stack(settings, t) as (client, _, _):
        broadcast_id = await broadcast_to_send(Api(client, t.a_write.token))
        for token, path in ((t.b_read, broadcast_id), (t.b_write, broadcast_id), (t.a_read, str(uuid.uuid4()))):
            response = await client.get(f"{BROADCASTS}/{path}/progress", headers=bearer(token))
            assert_problem(response, 404)
        async with client.stream("GET", f"{BROADCASTS}/{broadcast_id}/progress", headers=bearer(t.a_read)) as own:
            assert own.status_code == 200


async def test_a_lost_update_reaches_the_stream_by_its_reread_and_an_idle_stream_gets_heartbeats(
    settings, tenant_tokens,
):
    t = tenant_tokens
    async with stack(settings, t, progress_reread_s=0.3) as (client, _, _), AsyncExitStack() as streams:
        api = Api(client, t.a_write.token)
        broadcast_id = await broadcast_to_send(api)
        [follower] = await open_streams(client, streams, broadcast_id, t.a_read, 1)
        # Given a stream on a draft, idle a while
        await until(lambda: follower.got.count(("comment", None)) >= 2, 5, "heartbeats on an idle stream")

        # When the broadcast is sent and cancelled, and nothing is published (the projector never runs)
        await api.post(f"{BROADCASTS}/{broadcast_id}/send", expect=202)
        await until(lambda: "queued" in follower.statuses, 5, "the re-read finding the run")
        await api.post(f"{BROADCASTS}/{broadcast_id}/cancel")

        # Then the stream still follows the run to its end from its re-reads of Postgres
        await until(lambda: follower.ended, 5, "the stream ended")
        assert follower.statuses == ["draft", "queued", "cancelled"]
        assert [e for e, _ in follower.got if e != "comment"] == ["progress", "progress", "finished"]
