"""Media (a Postgres adapter): the photos and videos a tenant uploaded, its quota, and the files
served by their public token.

Every function but the public ones (`open_file`, `read_piece`, by token) takes the tenant: another
tenant's item is as absent as a missing one. The bytes live in `media.bytes` (bytea, STORAGE
EXTERNAL: 022_media.sql) so that any API replica serves any file; a file is read back a piece at a
time with substring(), which on an uncompressed out-of-line value reads only the TOAST chunks it
needs, so serving never holds more than a piece in memory nor a connection for a slow client.
"""
from __future__ import annotations

import secrets
import uuid
from datetime import datetime

import asyncpg
import msgspec

from shared.content.media_types import MediaType

MAX_FILE_BYTES = 20 * 1024 * 1024  # one upload: Telegram's bots fetch photos of up to 5 MB, videos up to 20 MB by URL
MAX_TENANT_BYTES = 1024**3  # all of a tenant's media together
MAX_TENANT_ITEMS = 10_000
PIECE_BYTES = 1024 * 1024  # read from Postgres per query when serving a file
TOKEN_BYTES = 32  # random bytes of a public token: 43 base64url characters
TOKEN_CHARS = 43
MAX_FILENAME_CHARS = 255


class Media(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    kind: str
    content_type: str
    size: int
    sha256: str
    token: str
    filename: str | None
    created_at: datetime


class MediaFile(msgspec.Struct, frozen=True, kw_only=True):
    """A file to serve: what its headers say, and its first piece (all of a small file)."""

    content_type: str
    size: int
    sha256: str
    filename: str | None
    first: bytes


class QuotaExceeded(Exception):
    """The upload would take the tenant over MAX_TENANT_BYTES or MAX_TENANT_ITEMS."""

    def __init__(self, used_bytes: int, used_items: int, size: int) -> None:
        self.used_bytes, self.used_items, self.size = used_bytes, used_items, size
        super().__init__(f"{used_items} items, {used_bytes} bytes stored; {size} more do not fit")


class _Duplicate(Exception):
    """A concurrent upload of the same bytes committed first: roll this one back, answer that one."""


_MEDIA = "id, kind, content_type, size, sha256, token, filename, created_at"


def is_token(token: str) -> bool:
    """Whether `token` has the shape of a public token (anything else is not looked up)."""
    return len(token) == TOKEN_CHARS and all(c.isascii() and (c.isalnum() or c in "-_") for c in token)


async def find_by_sha256(con: asyncpg.Connection, tenant_id: uuid.UUID, sha256: str) -> Media | None:
    row = await con.fetchrow(f"SELECT {_MEDIA} FROM media WHERE tenant_id = $1 AND sha256 = $2", tenant_id, sha256)
    return Media(**dict(row)) if row else None


async def store(
    con: asyncpg.Connection, tenant_id: uuid.UUID, found: MediaType, data: bytes | bytearray, sha256: str,
    filename: str | None, *, max_bytes: int = MAX_TENANT_BYTES, max_items: int = MAX_TENANT_ITEMS,
) -> tuple[Media, bool]:
    """Store a file; returns it and whether it is new (False: the tenant had these bytes already,
    and keeps the first item, its name and URL). Raises QuotaExceeded, writing nothing."""
    for _ in range(3):  # a duplicate deleted between two reads is looked for again; thrice is plenty
        if (existing := await find_by_sha256(con, tenant_id, sha256)) is not None:
            return existing, False  # before the quota: the same bytes again cost nothing
        try:
            async with con.transaction():
                await _take_quota(con, tenant_id, len(data), max_bytes, max_items)
                row = await con.fetchrow(
                    f"""INSERT INTO media (id, tenant_id, token, kind, content_type, size, sha256, bytes, filename)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                        ON CONFLICT (tenant_id, sha256) DO NOTHING
                        RETURNING {_MEDIA}""",
                    uuid.uuid4(), tenant_id, secrets.token_urlsafe(TOKEN_BYTES), found.kind, found.content_type,
                    len(data), sha256, data, filename,
                )
                if row is None:
                    raise _Duplicate
        except _Duplicate:  # the quota it took is rolled back with it; the next round finds the first
            continue
        return Media(**dict(row)), True
    raise RuntimeError("media: the same bytes were uploaded and deleted concurrently three times")


async def _take_quota(con: asyncpg.Connection, tenant_id: uuid.UUID, size: int, max_bytes: int, max_items: int) -> None:
    # The row lock of the conditional UPDATE serialises a tenant's uploads for the rest of the
    # transaction: a concurrent one re-reads the committed usage before its own check.
    await con.execute("INSERT INTO media_usage (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant_id)
    taken = await con.fetchval(
        """UPDATE media_usage SET bytes = bytes + $2, items = items + 1
           WHERE tenant_id = $1 AND bytes + $2 <= $3 AND items + 1 <= $4 RETURNING true""",
        tenant_id, size, max_bytes, max_items,
    )
    if not taken:
        used = await con.fetchrow("SELECT bytes, items FROM media_usage WHERE tenant_id = $1", tenant_id)
        raise QuotaExceeded(used["bytes"], used["items"], size)


async def usage(con: asyncpg.Connection, tenant_id: uuid.UUID) -> tuple[int, int]:
    """(bytes, items) the tenant stores."""
    row = await con.fetchrow("SELECT bytes, items FROM media_usage WHERE tenant_id = $1", tenant_id)
    return (row["bytes"], row["items"]) if row else (0, 0)


async def get_media(con: asyncpg.Connection, tenant_id: uuid.UUID, media_id: uuid.UUID) -> Media | None:
    row = await con.fetchrow(f"SELECT {_MEDIA} FROM media WHERE id = $1 AND tenant_id = $2", media_id, tenant_id)
    return Media(**dict(row)) if row else None


async def page_media(con: asyncpg.Connection, tenant_id: uuid.UUID, limit: int, offset: int) -> tuple[list[Media], int]:
    """A page, newest first."""
    total = await con.fetchval("SELECT count(*) FROM media WHERE tenant_id = $1", tenant_id)
    rows = await con.fetch(
        f"SELECT {_MEDIA} FROM media WHERE tenant_id = $1 ORDER BY created_at DESC, id LIMIT $2 OFFSET $3",
        tenant_id, limit, offset,
    )
    return [Media(**dict(r)) for r in rows], total


async def delete_media(con: asyncpg.Connection, tenant_id: uuid.UUID, media_id: uuid.UUID) -> bool:
    """Delete an item and give its room back; its URL is a 404 from the commit on."""
    async with con.transaction():
        # The usage row first, as `store` takes it: an upload of these very bytes waiting on the
        # unique index for this delete cannot then hold the row this delete waits for.
        await con.execute("SELECT 1 FROM media_usage WHERE tenant_id = $1 FOR UPDATE", tenant_id)
        size = await con.fetchval(
            "DELETE FROM media WHERE id = $1 AND tenant_id = $2 RETURNING size", media_id, tenant_id
        )
        if size is None:
            return False
        await con.execute(
            "UPDATE media_usage SET bytes = bytes - $2, items = items - 1 WHERE tenant_id = $1", tenant_id, size
        )
    return True


async def open_file(con: asyncpg.Connection, token: str, *, with_bytes: bool = True) -> MediaFile | None:
    """The file a public token names, with its first piece (none when `with_bytes` is false: HEAD)."""
    row = await con.fetchrow(
        """SELECT content_type, size, sha256, filename,
                  CASE WHEN $3 THEN substring(bytes FROM 1 FOR $2) ELSE ''::bytea END AS first
           FROM media WHERE token = $1""",
        token, PIECE_BYTES, with_bytes,
    )
    return MediaFile(**dict(row)) if row else None


async def read_piece(con: asyncpg.Connection, token: str, offset: int, length: int) -> bytes | None:
    """`length` bytes from byte `offset` (0-based) of the file, or None if it is gone."""
    return await con.fetchval(
        "SELECT substring(bytes FROM $2 FOR $3) FROM media WHERE token = $1", token, offset + 1, length
    )
