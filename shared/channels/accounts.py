"""Provider accounts (a Postgres adapter): tenant-scoped rows whose `config` holds the secrets."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

DEFAULT_BATCH_SIZE = 50  # the defaults of seed 002: 50 per batch, 5 s apart, 3 retries
DEFAULT_BATCH_DELAY_MS = 5000
DEFAULT_MAX_RETRIES = 3
_UPDATABLE = frozenset({"name", "config", "batch_size", "batch_delay_ms", "max_retries"})


class ProviderRow(msgspec.Struct, frozen=True, kw_only=True):
    """One provider as stored, secrets included: never hand it to a client as is."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    channel: str
    kind: str
    config: dict[str, Any]
    batch_size: int
    batch_delay_ms: int
    max_retries: int
    created_at: datetime
    updated_at: datetime


_ROW = "id, tenant_id, name, channel, kind, config, batch_size, batch_delay_ms, max_retries, created_at, updated_at"


def _row(record: asyncpg.Record | None) -> ProviderRow | None:
    return ProviderRow(**dict(record)) if record is not None else None


async def create(
    con: asyncpg.Connection,
    *,
    tenant_id: uuid.UUID,
    name: str,
    kind: str,
    config: dict[str, Any],
    channel: str = "email",
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_delay_ms: int = DEFAULT_BATCH_DELAY_MS,
    max_retries: int = DEFAULT_MAX_RETRIES,
    provider_id: uuid.UUID | None = None,
    idempotency_key: str | None = None,
    at: datetime | None = None,
) -> ProviderRow:
    """Insert a provider; with an idempotency key already used by this tenant, return that row instead."""
    record = await con.fetchrow(
        f"""INSERT INTO providers (id, tenant_id, name, channel, kind, config, batch_size, batch_delay_ms,
                                   max_retries, idempotency_key, created_at, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, coalesce($11, now()), coalesce($11, now()))
            ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING {_ROW}""",
        provider_id or uuid.uuid4(), tenant_id, name, channel, kind, config, batch_size, batch_delay_ms,
        max_retries, idempotency_key, at,
    )
    if record is None:  # the key was used before: the first POST's row is the answer
        record = await con.fetchrow(
            f"SELECT {_ROW} FROM providers WHERE tenant_id = $1 AND idempotency_key = $2", tenant_id, idempotency_key
        )
    row = _row(record)
    assert row is not None
    return row


async def get(
    con: asyncpg.Connection, tenant_id: uuid.UUID, provider_id: uuid.UUID, *, for_update: bool = False
) -> ProviderRow | None:
    """One live provider of this tenant; another tenant's (or a deleted) provider is as absent as a missing one."""
    lock = " FOR UPDATE" if for_update else ""
    return _row(
        await con.fetchrow(
            f"SELECT {_ROW} FROM providers WHERE id = $1 AND tenant_id = $2 AND NOT deleted{lock}",
            provider_id, tenant_id,
        )
    )


async def page(
    con: asyncpg.Connection,
    tenant_id: uuid.UUID,
    limit: int,
    offset: int,
    *,
    channel: str | None = None,
    kind: str | None = None,
) -> tuple[list[ProviderRow], int]:
    where = "tenant_id = $1 AND NOT deleted AND ($2::text IS NULL OR channel = $2) AND ($3::text IS NULL OR kind = $3)"
    total = await con.fetchval(f"SELECT count(*) FROM providers WHERE {where}", tenant_id, channel, kind)
    records = await con.fetch(
        f"SELECT {_ROW} FROM providers WHERE {where} ORDER BY created_at DESC, id LIMIT $4 OFFSET $5",
        tenant_id, channel, kind, limit, offset,
    )
    return [ProviderRow(**dict(r)) for r in records], total


async def update(
    con: asyncpg.Connection,
    tenant_id: uuid.UUID,
    provider_id: uuid.UUID,
    changes: dict[str, Any],
    at: datetime | None = None,
) -> ProviderRow | None:
    """Set the given columns (name, config, batch_size, batch_delay_ms, max_retries); None if not found."""
    unknown = set(changes) - _UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    columns = sorted(changes)
    assignments = ", ".join(f"{c} = ${i + 4}" for i, c in enumerate(columns))
    sets = f"{assignments}, updated_at = coalesce($3, now())" if columns else "updated_at = coalesce($3, now())"
    return _row(
        await con.fetchrow(
            f"UPDATE providers SET {sets} WHERE id = $1 AND tenant_id = $2 AND NOT deleted RETURNING {_ROW}",
            provider_id, tenant_id, at, *(changes[c] for c in columns),
        )
    )


async def delete(
    con: asyncpg.Connection, tenant_id: uuid.UUID, provider_id: uuid.UUID, at: datetime | None = None
) -> bool:
    """Soft delete: the row stays for the history of broadcasts that used it. False if not found."""
    status = await con.execute(
        "UPDATE providers SET deleted = true, updated_at = coalesce($3, now()) "
        "WHERE id = $1 AND tenant_id = $2 AND NOT deleted",
        provider_id, tenant_id, at,
    )
    return status.endswith(" 1")


async def channel_of(con: asyncpg.Connection, tenant_id: uuid.UUID, provider_id: uuid.UUID) -> str | None:
    """The channel of the tenant's live provider, None if there is none."""
    return await con.fetchval(
        "SELECT channel FROM providers WHERE id = $1 AND tenant_id = $2 AND NOT deleted", provider_id, tenant_id
    )


async def pacing(con: asyncpg.Connection, tenant_id: uuid.UUID, provider_id: uuid.UUID) -> tuple[int, int] | None:
    """(batch_size, batch_delay_ms) of the tenant's live provider, None if there is none."""
    row = await con.fetchrow(
        "SELECT batch_size, batch_delay_ms FROM providers WHERE id = $1 AND tenant_id = $2 AND NOT deleted",
        provider_id, tenant_id,
    )
    return (row["batch_size"], row["batch_delay_ms"]) if row else None


async def batch_delays(con: asyncpg.Connection, providers: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    """batch_delay_ms of each of these providers (a deleted one still paces what is left of its runs)."""
    rows = await con.fetch("SELECT id, batch_delay_ms FROM providers WHERE id = ANY($1::uuid[])", providers)
    return {r["id"]: r["batch_delay_ms"] for r in rows}
