"""Tenants and API tokens (a Postgres adapter): a token is shown once, only its SHA-256 is kept."""
from __future__ import annotations

import hashlib
import secrets
import uuid
from typing import Literal

import asyncpg
import msgspec

Scope = Literal["read", "write"]
TOKEN_PREFIX = "crier_"


class Tenant(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: every request is scoped to this tenant."""

    tenant_id: uuid.UUID
    scope: Scope
    token_id: uuid.UUID

    @property
    def can_write(self) -> bool:
        return self.scope == "write"


class IssuedToken(msgspec.Struct, frozen=True):
    id: uuid.UUID
    tenant_id: uuid.UUID
    scope: Scope
    token: str  # the secret itself: printed once, never stored


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def create_tenant(con: asyncpg.Connection, name: str, tenant_id: uuid.UUID | None = None) -> Tenant:
    tenant = Tenant(tenant_id or uuid.uuid4(), name)
    await con.execute("INSERT INTO tenants (id, name) VALUES ($1, $2)", tenant.id, tenant.name)
    return tenant


async def get_tenant(con: asyncpg.Connection, tenant_id: uuid.UUID) -> Tenant | None:
    row = await con.fetchrow("SELECT id, name FROM tenants WHERE id = $1", tenant_id)
    return Tenant(row["id"], row["name"]) if row else None


async def create_token(con: asyncpg.Connection, tenant_id: uuid.UUID, scope: Scope) -> IssuedToken:
    if scope not in ("read", "write"):
        raise ValueError(f"scope must be read or write, not {scope!r}")
    if await get_tenant(con, tenant_id) is None:
        raise LookupError(f"no tenant {tenant_id}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    issued = IssuedToken(uuid.uuid4(), tenant_id, scope, token)
    await con.execute(
        "INSERT INTO api_tokens (id, tenant_id, scope, token_hash, prefix) VALUES ($1, $2, $3, $4, $5)",
        issued.id,
        tenant_id,
        scope,
        hash_token(token),
        token[: len(TOKEN_PREFIX) + 4],
    )
    return issued


async def revoke_token(con: asyncpg.Connection, token_id: uuid.UUID | None = None, token: str | None = None) -> bool:
    """Revoke by id or by the token itself; True if a live token was revoked."""
    if token is not None:
        status = await con.execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL", hash_token(token)
        )
    else:
        status = await con.execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", token_id
        )
    return status.endswith(" 1")


async def authenticate(con: asyncpg.Connection, token: str) -> Principal | None:
    row = await con.fetchrow(
        "SELECT id, tenant_id, scope FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
        hash_token(token),
    )
    return Principal(row["tenant_id"], row["scope"], row["id"]) if row else None
