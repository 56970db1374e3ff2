"""Contact imports (a Postgres adapter): a file streamed in, merged chunk by chunk, and its record.

The body is read as it arrives and parsed in a worker thread (so the event loop keeps serving other
requests) while the chunk before is merged: parsing and Postgres work on both cores. Each chunk is
one transaction that also moves the import's progress, so another request sees it advance, and an
import cut off (the client gone, the process dead) keeps the chunks before. A running import's
`updated_at` moves at least every HEARTBEAT_S; one that stood still for STALE_AFTER_S died with its
process, and whoever reads it marks it failed.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import asyncpg
import msgspec

from shared.audience.import_checks import Chunk, Rejection
from shared.audience.import_formats import parser_for
from shared.audience.import_merge import Staged, merge_chunk, staged_parts
from shared.platform.db import is_connection_error
from shared.platform.logging import get_logger

log = get_logger(__name__)

MAX_REJECTIONS_KEPT = 1000
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60
IDLE_TIMEOUT_S = 300.0  # a client that sends nothing for this long is taken as gone
KEY_HOURS = 24  # an Idempotency-Key names its import this long
FEED_BYTES = 256 * 1024  # bytes gathered before the parser takes them
RETRIES = 5  # a chunk that lost a race (a deadlock, a key another import inserted meanwhile)
# A chunk is merged in this many parts at once, on as many connections: Postgres then works on both
# cores of a 2-core machine while this process parses the next chunk (its insert is the bulk of an
# import's work: 1M new contacts took 9 s of one core, measured).
PARTS = 2
QUEUED_CHUNKS = 1  # parsed ahead of the merge, ~22 MB each (2 were no faster: measured on 1M rows)


class ImportRow(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    format: str
    list_id: uuid.UUID | None
    status: str
    error: str | None
    bytes_read: int
    rows_read: int
    created: int
    updated: int
    unchanged: int
    rejected: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class BodyError(Exception):
    """The body cannot be read on: cut off (the client disconnected, or sent nothing for too long),
    or not in the encoding it claims."""


class ImportFailed(Exception):
    """The import was recorded and then failed (the cause is chained); chunks merged before stay."""

    def __init__(self, import_id: uuid.UUID) -> None:
        self.import_id = import_id
        super().__init__(f"import {import_id} failed")


class ImportStopped(Exception):
    """The import is no longer running: marked failed meanwhile (its heartbeat was not heard)."""


class ListGone(Exception):
    """The list the import adds its contacts to was deleted meanwhile."""


class KeyInUse(Exception):
    """Another import with this Idempotency-Key started at the same moment."""


_IMPORT = ("id, format, list_id, status, error, bytes_read, rows_read, created, updated, unchanged, rejected, "
           "created_at, updated_at, finished_at")


def _row(record: asyncpg.Record) -> ImportRow:
    return ImportRow(**dict(record))


async def create_import(
    con: asyncpg.Connection, tenant_id: uuid.UUID, format: str, list_id: uuid.UUID | None, *,
    token_id: uuid.UUID | None = None, idempotency_key: str | None = None,
) -> ImportRow:
    try:
        return _row(await con.fetchrow(
            f"""INSERT INTO contact_imports (id, tenant_id, format, list_id, token_id, idempotency_key)
                VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_IMPORT}""",
            uuid.uuid4(), tenant_id, format, list_id, token_id, idempotency_key,
        ))
    except asyncpg.UniqueViolationError as e:
        raise KeyInUse(idempotency_key) from e


async def keyed_import(con: asyncpg.Connection, tenant_id: uuid.UUID, token_id: uuid.UUID, key: str) -> ImportRow | None:
    """The import this token started with this Idempotency-Key within KEY_HOURS. A failed one frees
    its key (as a 5xx does under the middleware): the retry runs."""
    await _fail_stale(con, tenant_id)
    await con.execute(
        f"""UPDATE contact_imports SET idempotency_key = NULL
            WHERE tenant_id = $1 AND token_id = $2 AND idempotency_key = $3
              AND (status = 'failed' OR created_at < now() - interval '{KEY_HOURS} hours')""",
        tenant_id, token_id, key,
    )
    found = await con.fetchrow(
        f"SELECT {_IMPORT} FROM contact_imports WHERE tenant_id = $1 AND token_id = $2 AND idempotency_key = $3",
        tenant_id, token_id, key,
    )
    return _row(found) if found else None


async def _fail_stale(con: asyncpg.Connection, tenant_id: uuid.UUID) -> None:
    await con.execute(
        f"""UPDATE contact_imports SET status = 'failed', finished_at = updated_at,
                   error = 'interrupted: the API process running it stopped (no sign of it for {STALE_AFTER_S} s)'
            WHERE tenant_id = $1 AND status = 'running' AND updated_at < now() - interval '{STALE_AFTER_S} seconds'""",
        tenant_id,
    )


async def running_imports(con: asyncpg.Connection, tenant_id: uuid.UUID) -> int:
    """How many of the tenant's imports are running now (those whose process died not counted)."""
    await _fail_stale(con, tenant_id)
    return await con.fetchval(
        "SELECT count(*) FROM contact_imports WHERE tenant_id = $1 AND status = 'running'", tenant_id)


async def get_import(con: asyncpg.Connection, tenant_id: uuid.UUID, import_id: uuid.UUID) -> ImportRow | None:
    await _fail_stale(con, tenant_id)
    found = await con.fetchrow(f"SELECT {_IMPORT} FROM contact_imports WHERE id = $1 AND tenant_id = $2",
                               import_id, tenant_id)
    return _row(found) if found else None


async def rejections(con: asyncpg.Connection, import_id: uuid.UUID) -> list[Rejection]:
    rows = await con.fetch(
        "SELECT line, field, reason FROM contact_import_rejections WHERE import_id = $1 ORDER BY line LIMIT $2",
        import_id, MAX_REJECTIONS_KEPT,
    )
    return [Rejection(r["line"], r["field"], r["reason"]) for r in rows]


async def page_imports(con: asyncpg.Connection, tenant_id: uuid.UUID, limit: int, offset: int) -> tuple[list[ImportRow], int]:
    await _fail_stale(con, tenant_id)
    total = await con.fetchval("SELECT count(*) FROM contact_imports WHERE tenant_id = $1", tenant_id)
    rows = await con.fetch(
        f"""SELECT {_IMPORT} FROM contact_imports WHERE tenant_id = $1
            ORDER BY created_at DESC, id LIMIT $2 OFFSET $3""", tenant_id, limit, offset,
    )
    return [_row(r) for r in rows], total


class _Kept:
    """How many rejections are stored; parts merged at once reserve their share before they write."""

    def __init__(self) -> None:
        self.count = 0

    def take(self, wanted: int) -> int:
        share = max(0, min(wanted, MAX_REJECTIONS_KEPT - self.count))
        self.count += share
        return share


async def _write_part(pool: asyncpg.Pool, tenant_id: uuid.UUID, import_id: uuid.UUID, list_id: uuid.UUID | None,
                      part: Staged, kept: _Kept) -> None:
    """Merge one part of a chunk and record its progress, in one transaction."""
    share = 0
    try:
        async with pool.acquire() as con, con.transaction():
            if list_id is not None and await con.fetchval(
                # KEY SHARE: a delete of the list waits for this chunk instead of racing it
                "SELECT true FROM lists WHERE id = $1 AND tenant_id = $2 FOR KEY SHARE", list_id, tenant_id
            ) is None:
                raise ListGone(list_id)
            merged = await merge_chunk(con, tenant_id, list_id, part)
            share = kept.take(len(merged.rejections))
            if keep := merged.rejections[:share]:
                await con.execute(
                    """INSERT INTO contact_import_rejections (import_id, line, field, reason)
                       SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[]) ON CONFLICT DO NOTHING""",
                    import_id, [r.line for r in keep], [r.field for r in keep], [r.reason for r in keep],
                )
            moved = await con.fetchval(
                """UPDATE contact_imports SET bytes_read = greatest(bytes_read, $2), rows_read = rows_read + $3,
                          created = created + $4, updated = updated + $5, unchanged = unchanged + $6,
                          rejected = rejected + $7, updated_at = now()
                   WHERE id = $1 AND status = 'running' RETURNING true""",
                import_id, part.bytes_read, part.rows_read, merged.created, merged.updated, merged.unchanged,
                len(merged.rejections),
            )
            if moved is None:
                raise ImportStopped(import_id)
    except BaseException:
        kept.count -= share  # not stored after all
        raise


async def _write_retried(pool: asyncpg.Pool, tenant_id: uuid.UUID, import_id: uuid.UUID, list_id: uuid.UUID | None,
                         part: Staged, kept: _Kept) -> None:
    for attempt in range(RETRIES):
        try:
            return await _write_part(pool, tenant_id, import_id, list_id, part, kept)
        except (asyncpg.DeadlockDetectedError, asyncpg.UniqueViolationError, asyncpg.SerializationError):
            # another import took the same contacts (or created the same new key) first: the part
            # was rolled back whole, and runs again on what is there now
            if attempt == RETRIES - 1:
                raise
            await asyncio.sleep(0.05 * 2**attempt)


async def _writer(pool: asyncpg.Pool, tenant_id: uuid.UUID, import_id: uuid.UUID, list_id: uuid.UUID | None,
                  queue: asyncio.Queue[list[Staged] | None]) -> None:
    """Each chunk's parts at once, one transaction and connection each; the next chunk after them."""
    kept = _Kept()
    while (parts := await queue.get()) is not None:
        tasks = [asyncio.create_task(_write_retried(pool, tenant_id, import_id, list_id, part, kept)) for part in parts]
        try:
            await asyncio.gather(*tasks)
        except BaseException:  # one part failed (or the import stops): the others stop too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


async def _heartbeat(pool: asyncpg.Pool, import_id: uuid.UUID) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        try:
            async with pool.acquire() as con:
                await con.execute(
                    "UPDATE contact_imports SET updated_at = now() WHERE id = $1 AND status = 'running'", import_id
                )
        except Exception as e:  # the next beat, or a chunk, tries again; STALE_AFTER_S leaves room for several
            log.warning("import heartbeat failed", import_id=str(import_id), error=repr(e))


class _Body:
    """The request body in pieces of about FEED_BYTES (fewer hand-offs to the parser's thread)."""

    def __init__(self, stream: AsyncIterator[bytes]) -> None:
        self.pieces, self.done = stream.__aiter__(), False

    async def next(self) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        while size < FEED_BYTES and not self.done:
            try:
                data = await asyncio.wait_for(self.pieces.__anext__(), IDLE_TIMEOUT_S)
            except StopAsyncIteration:
                self.done = True
                break
            except TimeoutError:
                raise BodyError(f"the client sent nothing for {IDLE_TIMEOUT_S:.0f} s") from None
            parts.append(data)
            size += len(data)
        return b"".join(parts) if parts else None


def _parts(chunks: list[Chunk]) -> list[list[Staged]]:
    return [staged_parts(chunk, PARTS) for chunk in chunks]


async def _parsed(fn: Callable[..., list[Chunk]], *args: bytes) -> list[list[Staged]]:
    """Parse in a worker thread: the event loop serves other requests meanwhile (the GIL is handed
    over every few milliseconds), and Postgres merges the chunk before."""
    return await asyncio.to_thread(lambda: _parts(fn(*args)))


async def _put(queue: asyncio.Queue[list[Staged] | None], parts: list[Staged] | None, writer: asyncio.Task[None]) -> None:
    """Hand a chunk's parts to the writer, unless it stopped (its error is raised here)."""
    put = asyncio.ensure_future(queue.put(parts))
    await asyncio.wait({put, writer}, return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
    if writer.done():
        writer.result()  # raises what stopped it
        if parts is not None:
            raise RuntimeError("the import's writer stopped early")


def _why(e: BaseException) -> str:
    match e:
        case BodyError():
            return f"the body could not be read on: {e}"
        case ListGone():
            return "the list was deleted while the import ran"
        case ImportStopped():
            return "interrupted: marked failed while it ran (no sign of it for a while)"
        case asyncio.CancelledError():
            return "interrupted: the API process stopped"
        case _ if is_connection_error(e):
            return "interrupted: the database could not be reached"
    return f"interrupted by an unexpected error ({type(e).__name__})"


async def _finish(pool: asyncpg.Pool, import_id: uuid.UUID, error: str | None) -> ImportRow:
    async with pool.acquire() as con:
        done = await con.fetchrow(
            f"""UPDATE contact_imports
                SET status = CASE WHEN $2::text IS NULL THEN 'completed' ELSE 'failed' END, error = $2,
                    finished_at = now(), updated_at = now()
                WHERE id = $1 AND status = 'running' RETURNING {_IMPORT}""",
            import_id, error,
        )
        if done is None:  # already ended (marked failed by a reader)
            done = await con.fetchrow(f"SELECT {_IMPORT} FROM contact_imports WHERE id = $1", import_id)
    return _row(done)


async def run_import(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, format: str, body: AsyncIterator[bytes], *,
    list_id: uuid.UUID | None = None, token_id: uuid.UUID | None = None, idempotency_key: str | None = None,
) -> ImportRow:
    """Stream `body` into the tenant's contacts. The CSV header is read before anything is recorded
    (HeaderError, BodyError: no import); from then on the import is recorded, and ends completed, or
    failed (ImportFailed, caused by what stopped it)."""
    parser = parser_for(format)
    pieces = _Body(body)
    early: list[list[Staged]] = []
    finished = False
    while not parser.header_read:
        data = await pieces.next()
        if data is None:
            early += await _parsed(parser.finish)  # raises HeaderError: there is none
            finished = True
        else:
            early += await _parsed(parser.feed, data)
    async with pool.acquire() as con:
        row = await create_import(con, tenant_id, format, list_id, token_id=token_id, idempotency_key=idempotency_key)
    queue: asyncio.Queue[list[Staged] | None] = asyncio.Queue(maxsize=QUEUED_CHUNKS)
    writer = asyncio.create_task(_writer(pool, tenant_id, row.id, list_id, queue))
    beat = asyncio.create_task(_heartbeat(pool, row.id))
    try:
        for parts in early:
            await _put(queue, parts, writer)
        while (data := await pieces.next()) is not None:
            for parts in await _parsed(parser.feed, data):
                await _put(queue, parts, writer)
        if not finished:
            for parts in await _parsed(parser.finish):
                await _put(queue, parts, writer)
        await _put(queue, None, writer)
        await writer
    except BaseException as e:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        log.warning("import failed", import_id=str(row.id), error=repr(e))
        try:
            await _finish(pool, row.id, _why(e))
        except Exception as again:  # the readers' stale check will end it
            log.warning("could not record the failed import", import_id=str(row.id), error=repr(again))
        if isinstance(e, Exception):
            raise ImportFailed(row.id) from e
        raise
    finally:
        beat.cancel()
    return await _finish(pool, row.id, None)
