"""The running stack for end-to-end tests: the API in-process, senders in-process or as processes."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
import uvicorn

from api_service.app import create_app
from sender_service.main import run_sender
from shared.platform import db
from shared.platform.settings import Settings
from shared.tenants import store as tenants


class Api:
    """A thin client that raises on unexpected statuses, so tests read as the steps a user takes."""

    def __init__(self, client: httpx.AsyncClient, token: str) -> None:
        self.client, self.headers = client, {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, expect: int | tuple[int, ...] = (200, 201, 202, 204), **kw: Any) -> Any:
        r = await self.client.request(method, path, headers=self.headers, **kw)
        expected = (expect,) if isinstance(expect, int) else expect
        assert r.status_code in expected, f"{method} {path} -> {r.status_code}: {r.text}"
        return r.json() if r.content else None

    async def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return await self.call("POST", path, json=body, **kw)

    async def get(self, path: str, **kw: Any) -> Any:
        return await self.call("GET", path, **kw)

    async def patch(self, path: str, body: Any = None, **kw: Any) -> Any:
        return await self.call("PATCH", path, json=body, **kw)

    async def wait_for_status(self, broadcast_id: str, statuses: set[str], timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            b = await self.get(f"/v1/broadcasts/{broadcast_id}")
            if b["status"] in statuses:
                return b
            assert time.monotonic() < deadline, f"broadcast still {b['status']} after {timeout}s: {b}"
            await asyncio.sleep(0.05)

    async def all_messages(self, broadcast_id: str) -> list[dict]:
        items: list[dict] = []
        while True:
            page = await self.get(f"/v1/broadcasts/{broadcast_id}/messages", params={"limit": 500, "offset": len(items)})
            items += page["items"]
            if len(items) >= page["total"]:
                return items


@asynccontextmanager
async def api_for(settings: Settings) -> AsyncIterator[Api]:
    con = await db.connect(settings.database_url)
    await db.migrate(settings.database_url)
    tenant = await tenants.create_tenant(con, "e2e")
    token = (await tenants.create_token(con, tenant.id, "write")).token
    await con.close()
    async with served(create_app(settings)) as base_url, httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        yield Api(client, token)


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """Serve the app over loopback HTTP in this event loop, as `crier api` would, and yield its URL.

    A real server rather than an in-process test transport: the transport runs each request to
    completion while the caller's loop waits, which stalls in-process senders and makes a
    streaming response (SSE) impossible to read while it streams."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # start-up failed: raise its error
            raise RuntimeError("API server stopped during start-up")
        await asyncio.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@asynccontextmanager
async def sender_in_process(settings: Settings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_sender(settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def sender_process(settings: Settings, **extra_env: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        CRIER_DATABASE_URL=settings.database_url,
        CRIER_NATS_URL=settings.nats_url,
        CRIER_NATS_PREFIX=settings.nats_prefix,
        CRIER_LOG_LEVEL="warning",
        CRIER_ALLOW_PRIVATE_NETWORKS=str(settings.allow_private_networks).lower(),
        **extra_env,
    )
    return subprocess.Popen([sys.executable, "-m", "shared.tooling.cli", "sender"], env=env)
