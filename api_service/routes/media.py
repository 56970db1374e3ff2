"""/v1/media: photos and videos a tenant uploads once and names by URL in Telegram content; and
/m/{token}, the public URL each is fetched from (by Telegram's servers: no token).

The upload's body is the file itself, not a multipart form: Litestar parses a form only once the
whole body is in memory, while a raw body is read as it arrives, so the 20 MiB cap stops the read
at the first byte past it, and the type can be found from the first bytes before the rest comes.
The body is then held (at most 20 MiB per upload) and written in one short transaction: writing
it to Postgres as it arrives would hold a pooled connection for as long as the slowest client takes.

What a file is comes from its bytes (shared/content/media_types.py), never from the Content-Type
or the file name; it is served back with that type and `nosniff`.
"""
from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

import asyncpg
from litestar import Controller, Request, Response, delete, get, head, post
from litestar.datastructures import State
from litestar.exceptions import InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.response import Stream

from api_service.auth import require_write
from api_service.openapi import PROBLEM_JSON, problem_response
from api_service.problems import problem
from api_service.schemas.common import ONE_LINE, Page
from api_service.schemas.media import Media, media
from shared.content import media as store
from shared.content.media_types import (
    ACCEPTED,
    PHOTO_TYPES,
    SNIFF_BYTES,
    VIDEO_TYPES,
    MediaType,
    NotMedia,
    sniff,
)
from shared.kernel.limits import MAX_OFFSET
from shared.platform.logging import get_logger

log = get_logger(__name__)

Limit = Annotated[int, QueryParameter(ge=1, le=500, description="page size")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="items to skip")]
Filename = Annotated[str | None, QueryParameter(
    description="the file's name, kept and given back (Content-Disposition); not used to tell its type",
    min_length=1, max_length=store.MAX_FILENAME_CHARS, pattern=ONE_LINE,
)]
IfNoneMatch = Annotated[str | None, HeaderParameter(
    name="If-None-Match", max_length=8192, description="an ETag seen before: a 304 if it is still this file's"
)]
NOT_FOUND = "media not found"
MIB = 1024 * 1024
FILE_PATH = "/m/{token:str}"
# No auth middleware on the public URL (api_service/auth.py honours this `opt` key): the token is the credential.
PUBLIC = {"exclude_from_auth": True}
# The bytes at a URL never change (a new upload is a new URL), so caches may keep them a year.
CACHE_CONTROL = "public, max-age=31536000, immutable"
FORM_TYPES = ("multipart/", "application/x-www-form-urlencoded")

_DESCRIPTION = f"""\
The body is the file itself (not a multipart form): `Content-Type` as you like (it is not used:
`application/octet-stream` does), at most {store.MAX_FILE_BYTES // MIB} MiB; past that the upload is
a 413 and nothing more is read. Give its name with `?filename=`.

The type is found from the bytes: {ACCEPTED}. Anything else is a 415 naming `body`, whatever the
Content-Type or the name said. `kind` says which Telegram method sends it (`photo`: sendPhoto, which
fetches photos of up to 5 MB by URL; `video`: sendVideo, up to 20 MB).

The same bytes uploaded again by the tenant are the item it has: 200 with it (its first name and
URL), nothing stored, no quota used; so a retry is harmless. A tenant stores at most
{store.MAX_TENANT_BYTES // MIB // 1024} GiB in {store.MAX_TENANT_ITEMS:,} items: past either, a 409
`media_quota_exceeded` (deleting media makes room; waiting does not, hence no 429).

`url` is public (`{{CRIER_PUBLIC_URL}}/m/{{token}}`, unguessable, no token needed): use it as the
`media_url` of Telegram content. It serves the file until the item is deleted.
"""


@dataclass
class _UploadOperation(Operation):
    """The body as it is read: any bytes (Litestar cannot see a body the handler streams)."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True, description=f"the file's bytes: {ACCEPTED}",
            content={"application/octet-stream": OpenAPIMediaType(
                schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY,
                              max_length=store.MAX_FILE_BYTES))},
        )


def _too_large() -> ProblemDetailsException:
    return problem(413, f"the file is larger than {store.MAX_FILE_BYTES // MIB} MiB "
                        f"({store.MAX_FILE_BYTES:,} bytes), the most one upload may be", "media_too_large",
                   max_bytes=store.MAX_FILE_BYTES)


def _not_media(reason: str) -> ProblemDetailsException:
    return problem(415, f"body: {reason}", "unsupported_media_type", errors=[{"field": "body", "reason": reason}])


def _type_of(head: bytes) -> MediaType:
    try:
        return sniff(head)
    except NotMedia as e:
        if not head:
            reason = "the file is empty"
            raise problem(422, f"body: {reason}", errors=[{"field": "body", "reason": reason}]) from e
        raise _not_media(str(e)) from e


def _refuse_wrappers(request: Request) -> None:
    """A form or a Content-Encoding around the file: its bytes would be the wrapper's."""
    media_type = request.content_type[0].lower()
    if media_type.startswith(FORM_TYPES):
        raise _not_media(f"send the file itself as the body, not a form ({media_type})")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise _not_media(f"Content-Encoding {encoding}: send the file as it is "
                         "(photos and videos are compressed already)")


async def _read(request: Request) -> tuple[MediaType, bytearray, str]:
    """The file's type, bytes and SHA-256. The type is known once SNIFF_BYTES arrived, so a file of
    the wrong kind is refused before the rest is read; Litestar stops the read past the route's cap
    (from Content-Length before any byte, else at the byte over)."""
    data, digest, found = bytearray(), hashlib.sha256(), None
    try:
        async for chunk in request.stream():
            if len(data) + len(chunk) > store.MAX_FILE_BYTES:  # Litestar's own cap says the same first
                raise _too_large()
            data += chunk
            digest.update(chunk)
            if found is None and len(data) >= SNIFF_BYTES:
                found = _type_of(bytes(data[:SNIFF_BYTES]))
    except RequestEntityTooLarge:
        raise _too_large() from None
    except InternalServerException as e:  # Litestar: the client disconnected before the body's end
        raise problem(400, "the client disconnected before the end of the body; nothing was stored",
                      "unreadable_body") from e
    if found is None:
        found = _type_of(bytes(data))
    return found, data, digest.hexdigest()


def _over_quota(e: store.QuotaExceeded) -> ProblemDetailsException:
    return problem(
        409, f"this tenant stores {e.used_items:,} media of {e.used_bytes:,} bytes; with {e.size:,} more bytes it "
             f"would pass its quota of {store.MAX_TENANT_ITEMS:,} items and {store.MAX_TENANT_BYTES:,} bytes: "
             "delete media it no longer uses", "media_quota_exceeded",
        used_bytes=e.used_bytes, used_items=e.used_items, max_bytes=store.MAX_TENANT_BYTES,
        max_items=store.MAX_TENANT_ITEMS,
    )


class MediaController(Controller):
    path = "/v1/media"
    tags = ["media"]

    @post(
        "/", guards=[require_write], status_code=201, request_max_body_size=store.MAX_FILE_BYTES,
        operation_class=_UploadOperation, summary="Upload a photo or a video (the body is the file)",
        description=_DESCRIPTION, response_description="stored: the new item, its public `url` and where it is",
        responses={
            200: ResponseSpec(data_container=Media, description="the tenant had these bytes already: that item"),
            409: problem_response("`media_quota_exceeded`: past the tenant's bytes or items (the problem says "
                                  "`used_bytes`, `used_items`, `max_bytes`, `max_items`); or the first request "
                                  "with this Idempotency-Key is still being processed"),
            413: problem_response(f"the file is over {store.MAX_FILE_BYTES // MIB} MiB (`max_bytes`)"),
            415: problem_response("the bytes are none of the formats taken (`errors` names `body` and says what "
                                  "they are), a form instead of the file, or a Content-Encoding"),
            422: problem_response("an empty body, or a parameter is invalid (`errors` names it)"),
        },
    )
    async def upload(self, request: Request, state: State, filename: Filename = None) -> Response[Media]:
        _refuse_wrappers(request)
        found, data, sha256 = await _read(request)
        services = state.services
        async with services.pool.acquire() as con:
            try:
                row, created = await store.store(con, request.user.tenant_id, found, data, sha256, filename)
            except store.QuotaExceeded as e:
                raise _over_quota(e) from e
        return Response(media(row, services.settings.public_base_url), status_code=201 if created else 200,
                        headers={"Location": f"/v1/media/{row.id}"})

    @get("/", summary="List the tenant's media, newest first")
    async def list_media(self, request: Request, state: State, limit: Limit = 50, offset: Offset = 0) -> Page[Media]:
        services = state.services
        async with services.pool.acquire() as con:
            rows, total = await store.page_media(con, request.user.tenant_id, limit, offset)
        base = services.settings.public_base_url
        return Page(items=[media(r, base) for r in rows], total=total, limit=limit, offset=offset)

    @get("/{media_id:uuid}", summary="Get a photo or video (its metadata and URL)")
    async def get_media(self, request: Request, state: State, media_id: FromPath[uuid.UUID]) -> Media:
        services = state.services
        async with services.pool.acquire() as con:
            row = await store.get_media(con, request.user.tenant_id, media_id)
        if row is None:
            raise problem(404, NOT_FOUND)
        return media(row, services.settings.public_base_url)

    @delete("/{media_id:uuid}", guards=[require_write],
            summary="Delete a photo or video: its URL is a 404 from now on, its room in the quota free")
    async def delete_media(self, request: Request, state: State, media_id: FromPath[uuid.UUID]) -> None:
        async with state.services.pool.acquire() as con:
            if not await store.delete_media(con, request.user.tenant_id, media_id):
                raise problem(404, NOT_FOUND)


# -- the public URL --------------------------------------------------------------------------------


def _disposition(filename: str | None) -> str:
    """`inline`, with the name as RFC 6266 has it: an ASCII fallback and the UTF-8 name (RFC 8187)."""
    if not filename:
        return "inline"
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"inline; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _headers(file: store.MediaFile) -> dict[str, str]:
    return {
        "content-length": str(file.size),
        "etag": f'"{file.sha256}"',
        "cache-control": CACHE_CONTROL,
        "x-content-type-options": "nosniff",
        "content-disposition": _disposition(file.filename),
    }


def _not_modified(file: store.MediaFile, if_none_match: str | None) -> bool:
    """RFC 9110 13.1.2: weak comparison, `*` matches any file."""
    if if_none_match is None:
        return False
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or f'"{file.sha256}"' in tags


async def _open(state: State, token: str, with_bytes: bool) -> store.MediaFile | None:
    if not store.is_token(token):  # never a query for what cannot be a token
        return None
    async with state.services.pool.acquire() as con:
        return await store.open_file(con, token, with_bytes=with_bytes)


async def _pieces(pool: asyncpg.Pool, token: str, file: store.MediaFile) -> AsyncIterator[bytes]:
    """The file a piece at a time, each read on a connection taken for that read only: a slow
    client holds no connection. The bytes of a token never change, so the pieces fit together."""
    if file.first:
        yield file.first
    sent = len(file.first)
    while sent < file.size:
        async with pool.acquire() as con:
            piece = await store.read_piece(con, token, sent, store.PIECE_BYTES)
        if not piece:  # deleted while being sent: the answer falls short of its Content-Length,
            log.info("media deleted while being served", sent=sent, size=file.size)  # which the client sees
            return
        yield piece
        sent += len(piece)


@dataclass
class _FileOperation(Operation):
    """The answers as they are: the file in the type found at upload, no token needed."""

    def __post_init__(self) -> None:
        self.security = []
        for parameter in self.parameters or []:
            if getattr(parameter, "name", None) == "token" and isinstance(parameter.schema, Schema):  # type: ignore[union-attr]
                parameter.schema.min_length = parameter.schema.max_length = store.TOKEN_CHARS  # type: ignore[union-attr]
                parameter.schema.pattern = "^[A-Za-z0-9_-]*$"  # type: ignore[union-attr]
                parameter.description = "the token of the media's `url`; any other string is a 404"  # type: ignore[union-attr]
        binary = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY))
        headers = {name: OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING), description=why) for name, why in (
            ("ETag", "the SHA-256 of the bytes, quoted"), ("Cache-Control", CACHE_CONTROL),
            ("Content-Disposition", "inline, with the uploaded file name if any"),
            ("X-Content-Type-Options", "nosniff"),
        )}
        self.responses = {**(self.responses or {}), "200": OpenAPIResponse(
            description="the file, in the type found from its bytes at upload (HEAD: its headers only)",
            content={t: binary for t in (*PHOTO_TYPES, *VIDEO_TYPES)}, headers=headers,  # type: ignore[misc]
        )}


@get(FILE_PATH, tags=["media"], opt=PUBLIC, operation_class=_FileOperation,
     summary="A media file, public (Telegram's servers fetch it by this URL); HEAD works too",
     responses={304: ResponseSpec(data_container=None, description="If-None-Match has this file's ETag"),
                404: problem_response("no such file: the token is unknown, or the item was deleted")})
async def media_file(request: Request, state: State, token: FromPath[str],
                     if_none_match: IfNoneMatch = None) -> Response[Any]:
    # The first piece comes with the headers' fields in one query, unless a 304 is likely.
    file = await _open(state, token, with_bytes=if_none_match is None)
    if file is None:
        raise problem(404, NOT_FOUND)
    headers = _headers(file)
    if _not_modified(file, if_none_match):
        return Response(None, status_code=304, headers={k: headers[k] for k in ("etag", "cache-control")})
    return Stream(_pieces(state.services.pool, token, file), media_type=file.content_type, headers=headers)


@head(FILE_PATH, opt=PUBLIC, include_in_schema=False)
async def media_file_head(request: Request, state: State, token: FromPath[str],
                          if_none_match: IfNoneMatch = None) -> Response[None]:
    file = await _open(state, token, with_bytes=False)
    if file is None:
        # A HEAD answer has no body, so no problem details either: their type, and nothing
        return Response(b"", status_code=404, media_type=PROBLEM_JSON)
    headers = _headers(file)
    if _not_modified(file, if_none_match):
        return Response(None, status_code=304, headers={k: headers[k] for k in ("etag", "cache-control")})
    return Response(b"", media_type=file.content_type, headers=headers)
