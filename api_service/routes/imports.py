"""/v1/contacts/imports: stream a CSV or NDJSON file of any size into the contacts; follow the imports."""
from __future__ import annotations

import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import InternalServerException
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, HeaderParameter, QueryParameter

from api_service.auth import require_write
from api_service.idempotency import MAX_KEY_LENGTH, STREAMED_BODY
from api_service.openapi import problem_response
from api_service.problems import problem
from api_service.schemas.common import Page
from api_service.schemas.imports import ContactImport, ImportRejection, ImportSummary
from shared.audience import imports, lists
from shared.audience.import_checks import Rejection
from shared.audience.import_formats import HeaderError
from shared.audience.imports import BodyError, ImportRow
from shared.kernel.limits import MAX_OFFSET

Limit = Annotated[int, QueryParameter(ge=1, le=500, description="page size")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="items to skip")]
IdempotencyKey = Annotated[str | None, HeaderParameter(
    name="Idempotency-Key", max_length=MAX_KEY_LENGTH,
    description="a retry with the same key gets the import it started (its body is not read again); "
                "a failed import frees its key",
)]
NOT_FOUND = "import not found"
# media type -> format
FORMATS = {"text/csv": "csv", "application/csv": "csv", "application/x-ndjson": "ndjson",
           "application/ndjson": "ndjson", "application/jsonl": "ndjson"}
INFLATED_PIECE = 1024 * 1024  # a gzip body is inflated this much at a time (a small body may inflate to any size)
_DESCRIPTION = """\
Send the file as the body, `Content-Type: text/csv` or `application/x-ndjson` (`Content-Encoding: gzip`
is fine), of any size: it is read as it arrives, never held whole, and merged in chunks of 50,000
rows as it goes, each chunk committed on its own. The answer (202) comes once the whole body is merged; meanwhile
`GET /v1/contacts/imports` and `GET /v1/contacts/imports/{id}` show the import advancing.

Rows are matched by `external_id`, or by `email` (any case) when they have none: a match is updated
(the fields given replace the stored ones, attributes merge key by key), else a contact is created;
rows of one contact apply in file order. A row that fails a check is rejected (counted, the first
1,000 kept with their line and reason) and the others are written.

CSV: a header row names the columns. `external_id, email, phone, phone_region, locale, timezone,
whatsapp, telegram_chat_id, push_tokens` are the contact's fields (`phone_region`: the region of
national phone and WhatsApp numbers, `DE`; `push_tokens`: separated by spaces or semicolons); every
other column is an attribute (a string; `NAME:number`, `NAME:boolean`, `NAME:json` type it, and
`attributes.NAME` names one explicitly). An empty cell is not given: the stored value is kept.
NDJSON: one object per line, the shape of a `POST /v1/contacts` item (null clears a field).

Bounds: lines of at most 1 MiB, 200 columns, attributes as for `POST /v1/contacts`. With `list_id`,
every contact imported is added to that list (another tenant's list is a 404 before anything is read).
An import cut off (the client gone, the process stopped) ends `failed`, the chunks merged before kept.
"""

MAX_RUNNING_IMPORTS = 2  # per tenant at once


@dataclass
class _ImportOperation(Operation):
    def __post_init__(self) -> None:
        text = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))
        self.request_body = RequestBody(
            required=True, description="the file: CSV with a header row, or NDJSON (one contact object per line)",
            content={"text/csv": text, "application/x-ndjson": text},
        )


def _format(request: Request) -> str:
    media_type, options = request.content_type
    format = FORMATS.get(media_type.lower())
    if format is None:
        raise problem(415, f"send text/csv or application/x-ndjson, not {media_type or 'no Content-Type'}",
                      "unsupported_media_type")
    if options.get("charset", "utf-8").lower().replace("_", "-") not in ("utf-8", "utf8", "us-ascii"):
        raise problem(415, f"the file must be UTF-8, not {options['charset']}", "unsupported_media_type")
    return format


async def _body(request: Request, gzipped: bool) -> AsyncIterator[bytes]:
    """The body as it arrives (inflated a piece at a time when gzipped)."""
    inflate = zlib.decompressobj(wbits=47) if gzipped else None  # 32 + 15: a gzip or zlib header
    try:
        async for data in request.stream():
            if inflate is None:
                yield data
                continue
            try:
                while data:
                    yield inflate.decompress(data, INFLATED_PIECE)
                    data = inflate.unconsumed_tail
            except zlib.error as e:
                raise BodyError(f"not valid gzip: {e}") from None
    except InternalServerException as e:  # Litestar: the client disconnected before the body's end
        raise BodyError("the client disconnected before the end of the body") from e
    if inflate is not None and not inflate.eof:
        raise BodyError("the gzip stream ends before its end")


def _summary(row: ImportRow) -> ImportSummary:
    return ImportSummary(**msgspec.structs.asdict(row))


def _import(row: ImportRow, refused: list[Rejection]) -> ContactImport:
    return ContactImport(**msgspec.structs.asdict(row),
                         rejections=[ImportRejection(line=r.line, field=r.field, reason=r.reason) for r in refused])


async def _answer(state: State, row: ImportRow, **headers: str) -> Response[ContactImport]:
    async with state.services.pool.acquire() as con:
        refused = await imports.rejections(con, row.id)
    return Response(_import(row, refused), status_code=202,
                    headers={"Location": f"/v1/contacts/imports/{row.id}", **headers})


class ImportController(Controller):
    path = "/v1/contacts/imports"
    tags = ["contacts"]

    @post(
        "/", guards=[require_write], status_code=202, request_max_body_size=None, opt={STREAMED_BODY: True},
        operation_class=_ImportOperation, summary="Import contacts from a CSV or NDJSON file of any size",
        response_description="the import once the whole body is merged: `completed`, its counts and first rejected rows",
        description=_DESCRIPTION,
        responses={
            400: problem_response("the body could not be read: not valid gzip, or cut off"),
            404: problem_response("`list_id` names no list of this tenant"),
            409: problem_response("the list was deleted while the import ran, or the import with this "
                                  "Idempotency-Key is still running"),
            415: problem_response("not text/csv or application/x-ndjson in UTF-8, or an encoding other than gzip"),
            422: problem_response("the CSV header cannot be used (`errors` names it), or a parameter is invalid"),
        },
    )
    async def create(
        self, request: Request, state: State,
        list_id: Annotated[uuid.UUID | None, QueryParameter(description="add every contact imported to this list")] = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[ContactImport]:
        format = _format(request)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip"):
            raise problem(415, f"Content-Encoding: only gzip, not {encoding}", "unsupported_media_type")
        user, pool = request.user, state.services.pool
        async with pool.acquire() as con:
            if list_id is not None and await lists.get_list(con, user.tenant_id, list_id) is None:
                raise problem(404, "list not found")
            if idempotency_key is not None and (
                first := await imports.keyed_import(con, user.tenant_id, user.token_id, idempotency_key)
            ) is not None:
                if first.status == "running":
                    raise problem(409, "Idempotency-Key: the import with this key is still running", "import_running",
                                  import_id=str(first.id))
                return await _answer(state, first, **{"Idempotent-Replayed": "true"})
            # Each import keeps up to three connections and a core busy: a tenant's own imports
            # queue behind each other rather than take the pool from every other tenant.
            if (running := await imports.running_imports(con, user.tenant_id)) >= MAX_RUNNING_IMPORTS:
                refused = problem(429, f"{running} imports of this tenant are running; at most {MAX_RUNNING_IMPORTS} "
                                       "at once: send this one when one is done", "too_many_imports")
                refused.headers = {"Retry-After": "5"}
                raise refused
        try:
            row = await imports.run_import(
                pool, user.tenant_id, format, _body(request, encoding != "identity"), list_id=list_id,
                token_id=user.token_id, idempotency_key=idempotency_key,
            )
        except HeaderError as e:
            raise problem(422, f"{e.field}: {e.reason}; nothing was imported",
                          errors=[{"field": e.field, "reason": e.reason}]) from e
        except BodyError as e:
            raise problem(400, f"{e}; nothing was imported", "unreadable_body") from e
        except imports.KeyInUse as e:
            raise problem(409, "Idempotency-Key: an import with this key has just started", "import_running") from e
        except imports.ImportFailed as e:
            cause, at = e.__cause__, {"import_id": str(e.import_id)}
            done = "; the chunks before were merged"
            if isinstance(cause, BodyError):
                raise problem(400, f"{cause}{done}", "unreadable_body", **at) from e
            if isinstance(cause, imports.ListGone):
                raise problem(409, f"the list was deleted while the import ran{done}", "list_deleted", **at) from e
            if isinstance(cause, imports.ImportStopped):
                raise problem(409, f"the import was marked failed while it ran{done}", "import_stopped", **at) from e
            raise cause from None  # Postgres gone: a 503 (api_service/problems.py)
        return await _answer(state, row)

    @get("/", summary="List the tenant's imports, newest first")
    async def list_imports(self, request: Request, state: State, limit: Limit = 50, offset: Offset = 0) -> Page[ImportSummary]:
        async with state.services.pool.acquire() as con:
            rows, total = await imports.page_imports(con, request.user.tenant_id, limit, offset)
        return Page(items=[_summary(r) for r in rows], total=total, limit=limit, offset=offset)

    @get("/{import_id:uuid}", summary="An import: its progress or outcome, and its first 1,000 rejected rows")
    async def get_import(self, request: Request, state: State, import_id: FromPath[uuid.UUID]) -> ContactImport:
        async with state.services.pool.acquire() as con:
            row = await imports.get_import(con, request.user.tenant_id, import_id)
            if row is None:
                raise problem(404, NOT_FOUND)
            refused = await imports.rejections(con, import_id)
        return _import(row, refused)
