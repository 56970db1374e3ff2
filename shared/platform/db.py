"""Postgres adapter plumbing: connection pools and the numbered .sql migrations."""
from __future__ import annotations

from importlib import resources

import asyncpg
import msgspec

from shared.platform.logging import get_logger

log = get_logger(__name__)
_MIGRATION_LOCK = 0x43726965_72000001  # advisory lock key: one migrator at a time across replicas


def _json_text(value: object) -> str:
    return msgspec.json.encode(value).decode()


async def _init_connection(con: asyncpg.Connection) -> None:
    # msgspec rather than the json module: the relay and the projector decode every event's data.
    for typ in ("json", "jsonb"):
        await con.set_type_codec(typ, encoder=_json_text, decoder=msgspec.json.decode, schema="pg_catalog")


async def _reset(con: asyncpg.Connection) -> None:
    """Reset a connection going back to the pool: only an open transaction needs undoing.

    asyncpg's default reset runs `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on
    every release, a round trip per acquire (a sixth of a worker's statements). Pooled connections
    never hold session state here: LISTEN and advisory locks use dedicated connections."""
    if con.is_in_transaction():
        await con.execute("ROLLBACK")


# What a lost or refused Postgres connection raises, as opposed to an error in a statement: the
# server stopped or restarted (class 08, 57P0x), the socket went away, or the pool could not connect.
_CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.InterfaceError,  # "connection is closed", "connection was closed in the middle of operation"
    ConnectionError,
    OSError,
    TimeoutError,
)


def contains_pattern(search: str) -> str:
    """A LIKE pattern (ESCAPE '\\', Postgres's default) matching lower(x) that holds `search` in any
    case, its own % _ and \\ taken literally."""
    escaped = search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def is_connection_error(exc: BaseException) -> bool:
    """True if `exc` says Postgres could not be reached, not that a statement was wrong."""
    return isinstance(exc, _CONNECTION_ERRORS)


# How long opening a connection may take (asyncpg's default is 60 s). A pool opens one whenever it
# has none idle, so with Postgres unreachable (a dropped network rather than a refused port) this is
# how long a request waits before it is a 503; connecting takes milliseconds when all is well.
CONNECT_TIMEOUT_S = 5.0


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=_init_connection, reset=_reset,
                                     timeout=CONNECT_TIMEOUT_S)


async def connect(dsn: str) -> asyncpg.Connection:
    con = await asyncpg.connect(dsn)
    await _init_connection(con)
    return con


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("shared.platform") / "migrations"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]


async def migrate(dsn: str) -> list[str]:
    """Apply the migrations not applied yet, each in its own transaction; returns their names."""
    con = await asyncpg.connect(dsn)
    applied_now: list[str] = []
    try:
        await con.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await con.fetch("SELECT name FROM schema_migrations")}
        for name, sql in migration_files():
            if name in done:
                continue
            async with con.transaction():
                await con.execute(sql)
                await con.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            applied_now.append(name)
            log.info("migration applied", migration=name)
    finally:
        await con.close()  # closing the session releases the advisory lock
    return applied_now
