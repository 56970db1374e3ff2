"""The breaker of a provider account (Postgres adapter): its provider errors in a row, counted
across every sender process, so a refused login or a revoked token pauses the broadcasts that use
it instead of failing every recipient one by one.

"In a row" means without a success in between and within WINDOW_S of the previous error: a
success is recorded only by a process that saw an error of that provider (a process with nothing
but successes never writes here), so errors spread over hours would otherwise add up.
"""
from __future__ import annotations

import uuid

import asyncpg

THRESHOLD = 5  # provider errors in a row that open the breaker (Notifuse's default, too)
WINDOW_S = 60


async def record_errors(con: asyncpg.Connection, provider_id: uuid.UUID, count: int, answer: str | None) -> int:
    """Count `count` more provider errors; returns the errors in a row now."""
    return await con.fetchval(
        f"""INSERT INTO provider_breakers (provider_id, errors, last_error) VALUES ($1, $2, $3)
            ON CONFLICT (provider_id) DO UPDATE
            SET errors = CASE WHEN provider_breakers.updated_at < now() - interval '{WINDOW_S} seconds'
                              THEN excluded.errors ELSE provider_breakers.errors + excluded.errors END,
                last_error = excluded.last_error, updated_at = now()
            RETURNING errors""",
        provider_id, count, (answer or "")[:500],
    )


async def record_success(con: asyncpg.Connection, provider_id: uuid.UUID) -> None:
    """Close the breaker: the provider took a message."""
    await con.execute(
        "UPDATE provider_breakers SET errors = 0, updated_at = now() WHERE provider_id = $1 AND errors > 0",
        provider_id)
