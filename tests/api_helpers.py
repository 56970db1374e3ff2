"""Shared pieces of the REST API tests: the app under its real lifespan, tenants and their tokens."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api_service.app import create_app
from shared.platform import db
from shared.platform.settings import Settings
from shared.tenants import store as tenants
from shared.tenants.store import IssuedToken

BROADCASTS = "/v1/broadcasts"
PROBLEM_JSON = "application/problem+json"


class TenantTokens(msgspec.Struct, frozen=True, kw_only=True):
    """Two tenants, each with a write and a read token."""

    a_id: uuid.UUID
    b_id: uuid.UUID
    a_write: IssuedToken
    a_read: IssuedToken
    b_write: IssuedToken
    b_read: IssuedToken


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[AsyncTestClient]:
    """The app with its real lifespan: migrations, pool, NATS, background tasks."""
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


@pytest.fixture
async def tenant_tokens(settings: Settings) -> TenantTokens:
    con = await db.connect(settings.database_url)
    try:
        a = await tenants.create_tenant(con, "Tenant A")
        b = await tenants.create_tenant(con, "Tenant B")
        return TenantTokens(
            a_id=a.id,
            b_id=b.id,
            a_write=await tenants.create_token(con, a.id, "write"),
            a_read=await tenants.create_token(con, a.id, "read"),
            b_write=await tenants.create_token(con, b.id, "write"),
            b_read=await tenants.create_token(con, b.id, "read"),
        )
    finally:
        await con.close()


async def revoke(settings: Settings, issued: IssuedToken) -> bool:
    con = await db.connect(settings.database_url)
    try:
        return await tenants.revoke_token(con, token_id=issued.id)
    finally:
        await con.close()


def bearer(issued: IssuedToken | str) -> dict[str, str]:
    token = issued if isinstance(issued, str) else issued.token
    return {"Authorization": f"Bearer {token}"}


def new_broadcast(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Spring sale",
        "content": {"subject": "Hello {{ first_name }}", "html": "<p>Sale!</p>", "text": "Sale!"},
    }
    body.update(overrides)
    return body


async def create_broadcast(client: AsyncTestClient, token: IssuedToken, **overrides: Any) -> dict[str, Any]:
    response = await client.post(BROADCASTS, json=new_broadcast(**overrides), headers=bearer(token))
    assert response.status_code == 201, response.text
    return response.json()


async def list_total(client: AsyncTestClient, token: IssuedToken) -> int:
    response = await client.get(BROADCASTS, headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()["total"]


async def list_ids(client: AsyncTestClient, token: IssuedToken) -> list[str]:
    response = await client.get(BROADCASTS, params={"limit": 500}, headers=bearer(token))
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def assert_problem(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """An RFC 9457 problem: its media type, and status, title, type and code in the body."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    assert media_type == PROBLEM_JSON, f"content-type {media_type!r}: {response.text}"
    body = response.json()
    assert body.get("status") == status, body
    for key in ("title", "type", "code"):
        assert isinstance(body.get(key), str) and body[key], f"problem without {key!r}: {body}"
    if code is not None:
        assert body["code"] == code, body
    return body


def error_fields(problem: dict[str, Any]) -> list[str]:
    errors = problem.get("errors")
    assert isinstance(errors, list) and errors, f"422 without errors[]: {problem}"
    for error in errors:
        assert set(error) >= {"field", "reason"}, error
    return [e["field"] for e in errors]
