"""/v1/templates: reusable content, checked and its HTML repaired on every save; each save is a new
version, and older versions stay readable (a broadcast renders the version its run started with)."""
from __future__ import annotations

import uuid
from functools import partial
from typing import Annotated

import anyio
import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.datastructures import State
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from msgspec import UNSET

from api_service.auth import require_write
from api_service.idempotency import MAX_KEY_LENGTH
from api_service.openapi import problem_response
from api_service.problems import problem
from api_service.schemas.common import NO_NUL, Page
from api_service.schemas.content import content_out, merge_content, to_content
from api_service.schemas.templates import (
    EmailAsSent,
    SmsSegments,
    Template,
    TemplateCreate,
    TemplatePatch,
    TemplateSummary,
)
from shared.content import template_store
from shared.content.checks import check_content
from shared.content.sms import count_segments
from shared.content.template_store import TemplateChanged, TemplateRow, TemplateVersion
from shared.kernel.content import Content
from shared.kernel.limits import MAX_NAME_CHARS, MAX_OFFSET
from shared.sending.render import email_html, email_text

Limit = Annotated[int, QueryParameter(ge=1, le=500, description="page size")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="items to skip")]  # a bigint in SQL
Search = Annotated[str | None, QueryParameter(
    name="filter[search]", max_length=MAX_NAME_CHARS, pattern=NO_NUL,
    description="only templates whose name contains this, case-insensitively",
)]
IsTemplateFilter = Annotated[bool | None, QueryParameter(description="only templates (true) or only other contents (false)")]
Version = Annotated[int | None, QueryParameter(ge=1, le=2**31 - 1, description="an earlier version (default: the latest)")]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(name="Idempotency-Key", max_length=MAX_KEY_LENGTH, description="a retried POST with the same key returns the first one's template"),
]
NOT_FOUND = "template not found"
# A PATCH merges into the version it read; when another save lands in between, it merges again into
# that one. Saves of one template seconds apart never need more; past this it is a 409 to retry.
_ATTEMPTS = 3


async def _checked(content: Content, stored: Content | None = None) -> Content:
    """check_content in a worker thread: repairing and parsing 500 KiB of HTML takes about half a
    second, which would otherwise stall every other request this process serves."""
    return await anyio.to_thread.run_sync(partial(check_content, content, stored=stored))


def _template(row: TemplateRow, version: TemplateVersion | None = None) -> Template:
    content = row.content if version is None else version.content
    return Template(
        id=row.id, name=row.name, is_template=row.is_template, version=row.version if version is None else version.version,
        content=content_out(content), sms_segments=_segments(content), email_as_sent=_email_as_sent(content),
        created_at=row.created_at,
        updated_at=row.updated_at if version is None else version.created_at,
    )


def _email_as_sent(content: Content) -> EmailAsSent | None:
    if not content.has("email"):
        return None
    return EmailAsSent(html=email_html(content, None), text=email_text(content, None))


def _segments(content: Content) -> SmsSegments | None:
    if content.sms is None:
        return None
    counted = count_segments(content.sms.body)
    return SmsSegments(encoding=counted.encoding, characters=counted.characters, segments=counted.segments)


class TemplateController(Controller):
    path = "/v1/templates"
    tags = ["templates"]

    @post("/", guards=[require_write], summary="Create a template (content checked, HTML repaired): version 1")
    async def create(
        self, request: Request, state: State, data: JSONBody[TemplateCreate], idempotency_key: IdempotencyKey = None
    ) -> Template:
        content = await _checked(to_content(data.content))
        async with state.services.pool.acquire() as con:
            row, _ = await template_store.create(
                con, request.user.tenant_id, data.name, content, is_template=data.is_template,
                idempotency_key=idempotency_key,
            )
        return _template(row)

    @get("/", summary="List the templates by name, without their content")
    async def list_templates(
        self, request: Request, state: State, search: Search = None, is_template: IsTemplateFilter = None,
        limit: Limit = 50, offset: Offset = 0,
    ) -> Page[TemplateSummary]:
        async with state.services.pool.acquire() as con:
            rows, total = await template_store.list_templates(
                con, request.user.tenant_id, search=search or None,  # an empty search box: no filter
                is_template=is_template, limit=limit, offset=offset,
            )
        return Page(items=[TemplateSummary(**msgspec.structs.asdict(r)) for r in rows], total=total, limit=limit,
                    offset=offset)

    @get("/{template_id:uuid}", summary="Get a template: its latest version, or an earlier one with `version`")
    async def get_template(
        self, request: Request, state: State, template_id: FromPath[uuid.UUID], version: Version = None
    ) -> Template:
        tenant_id = request.user.tenant_id
        async with state.services.pool.acquire() as con:
            row = await template_store.get(con, tenant_id, template_id)
            if row is None:
                raise problem(404, NOT_FOUND)
            if version is None or version == row.version:
                return _template(row)
            older = await template_store.get_version(con, tenant_id, template_id, version)
        if older is None:
            raise problem(404, f"template has no version {version} (the latest is {row.version})")
        return _template(row, older)

    @patch(
        "/{template_id:uuid}", guards=[require_write],
        summary="Change a template's name, is_template and/or content (merged): a new version",
        responses={409: problem_response("the template kept changing while this edit was applied: retry")},
    )
    async def edit(
        self, request: Request, state: State, template_id: FromPath[uuid.UUID], data: JSONBody[TemplatePatch]
    ) -> Template:
        tenant_id, pool = request.user.tenant_id, state.services.pool
        for _ in range(_ATTEMPTS):
            async with pool.acquire() as con:
                row = await template_store.get(con, tenant_id, template_id)
            if row is None:
                raise problem(404, NOT_FOUND)
            if data.name is UNSET and data.is_template is UNSET and data.content is UNSET:
                return _template(row)  # nothing given: nothing saved
            # Checked on the merged content, holding no connection meanwhile.
            content = (UNSET if data.content is UNSET
                       else await _checked(merge_content(row.content, data.content), row.content))
            try:
                async with pool.acquire() as con:
                    saved = await template_store.update(
                        con, tenant_id, template_id, expected_version=row.version,
                        name=data.name, is_template=data.is_template, content=content,
                    )
            except TemplateChanged:
                continue
            if saved is None:  # deleted meanwhile
                raise problem(404, NOT_FOUND)
            return _template(saved)
        raise TemplateChanged(template_id)

    @delete(
        "/{template_id:uuid}", guards=[require_write],
        summary="Delete a template; 409 while a broadcast not finished uses it",
        responses={409: problem_response("broadcasts not finished use the template (`broadcasts`): "
                                         "delete them or change their content first")},
    )
    async def delete_template(self, request: Request, state: State, template_id: FromPath[uuid.UUID]) -> None:
        async with state.services.pool.acquire() as con:
            if not await template_store.delete(con, request.user.tenant_id, template_id):
                raise problem(404, NOT_FOUND)
