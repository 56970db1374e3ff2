"""Two tenants and their clients on one in-process app: the writer and reader of tenant one, and a
writer of tenant two (`stranger`), for tests of a feature's API and its tenant walls."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
from litestar.testing import AsyncTestClient

from api_service.app import create_app
from shared.platform import db
from shared.platform.settings import Settings
from shared.tenants import store as tenants
from tests.api_helpers import assert_problem


class Client:
    def __init__(self, http: AsyncTestClient, token: str) -> None:
        self.http, self.headers = http, {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, expect: int, **kw: Any) -> Any:
        r = await self.http.request(method, path, headers={**self.headers, **kw.pop("headers", {})}, **kw)
        assert r.status_code == expect, f"{method} {path} -> {r.status_code}: {r.text}"
        return r.json() if r.content else None

    async def problem(self, method: str, path: str, status: int, code: str | None = None, **kw: Any) -> dict[str, Any]:
        """The problem details of an answer that must be one (status, code, media type)."""
        r = await self.http.request(method, path, headers=self.headers, **kw)
        return assert_problem(r, status, code)

    async def fields(self, method: str, path: str, **kw: Any) -> list[str]:
        """The fields a 422 names."""
        return [e["field"] for e in (await self.call(method, path, 422, **kw))["errors"]]


class TenantEnv(msgspec.Struct):
    http: AsyncTestClient
    writer: Client
    reader: Client
    stranger: Client  # a writer of tenant two
    tenant_id: uuid.UUID
    stranger_tenant_id: uuid.UUID
    database_url: str

    async def sql(self, method: str, query: str, *args: Any) -> Any:
        """`con.<method>(query, *args)` on a connection of its own (fetch, fetchval, execute ...)."""
        con = await db.connect(self.database_url)
        try:
            return await getattr(con, method)(query, *args)
        finally:
            await con.close()

    async def count(self, query: str, *args: Any) -> int:
        return await self.sql("fetchval", query, *args)


E = TypeVar("E", bound=TenantEnv)


@asynccontextmanager
async def tenant_env(settings: Settings, env_type: type[E] = TenantEnv) -> AsyncIterator[E]:  # type: ignore[assignment]
    settings = msgspec.structs.replace(settings, run_background=False)
    con = await db.connect(settings.database_url)
    one = await tenants.create_tenant(con, "one")
    two = await tenants.create_tenant(con, "two")
    write = (await tenants.create_token(con, one.id, "write")).token
    read = (await tenants.create_token(con, one.id, "read")).token
    other = (await tenants.create_token(con, two.id, "write")).token
    await con.close()
    async with AsyncTestClient(app=create_app(settings)) as http:
        yield env_type(http, Client(http, write), Client(http, read), Client(http, other), one.id, two.id,
                       settings.database_url)
