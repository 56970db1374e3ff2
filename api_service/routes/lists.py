"""/v1/lists: static lists of contacts; add and remove members by contact id or external id."""
from __future__ import annotations

import uuid
from typing import Annotated

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from api_service.auth import require_write
from api_service.idempotency import MAX_KEY_LENGTH
from api_service.openapi import problem_response
from api_service.problems import problem
from api_service.schemas.audience import (
    ContactList,
    ListCreate,
    MembersAdded,
    MembersChange,
    MembersRemoved,
)
from api_service.schemas.common import Page
from shared.audience import lists, segment_store
from shared.audience.lists import ListRow, UnknownContacts
from shared.broadcasts import view as broadcasts_view
from shared.kernel.limits import MAX_OFFSET

Limit = Annotated[int, QueryParameter(ge=1, le=500, description="page size")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="items to skip")]  # a bigint in SQL
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(name="Idempotency-Key", max_length=MAX_KEY_LENGTH, description="a retried POST with the same key returns the first one's list"),
]
NOT_FOUND = "list not found"
_SHOWN = 100  # unknown ids listed in a 422


def _list(row: ListRow) -> ContactList:
    return ContactList(**msgspec.structs.asdict(row))


async def _change(request: Request, state: State, list_id: uuid.UUID, data: MembersChange, add: bool) -> tuple[int, int]:
    if (data.contact_ids is None) == (data.external_ids is None):
        raise problem(422, "give exactly one of contact_ids and external_ids", errors=[
            {"field": "body", "reason": "give exactly one of contact_ids and external_ids"}
        ])
    async with state.services.pool.acquire() as con:
        try:
            changed = await lists.change_members(
                con, request.user.tenant_id, list_id, add=add, contact_ids=data.contact_ids, external_ids=data.external_ids
            )
        except UnknownContacts as e:
            shown = ", ".join(map(str, e.unknown[:_SHOWN])) + (", …" if len(e.unknown) > _SHOWN else "")
            reason = f"{len(e.unknown)} unknown: {shown}"
            raise problem(
                422, f"{e.field}: {reason}", "unknown_contacts",
                errors=[{"field": e.field, "reason": reason}], unknown=e.unknown[:_SHOWN],
            ) from e
    if changed is None:
        raise problem(404, NOT_FOUND)
    return changed


class ListController(Controller):
    path = "/v1/lists"
    tags = ["lists"]

    @post("/", guards=[require_write], summary="Create a static list (empty)")
    async def create(
        self, request: Request, state: State, data: JSONBody[ListCreate], idempotency_key: IdempotencyKey = None
    ) -> ContactList:
        async with state.services.pool.acquire() as con:
            row, _ = await lists.create_list(con, request.user.tenant_id, data.name, idempotency_key=idempotency_key)
        return _list(row)

    @get("/", summary="List the lists, newest first, each with its member count")
    async def list_lists(self, request: Request, state: State, limit: Limit = 50, offset: Offset = 0) -> Page[ContactList]:
        async with state.services.pool.acquire() as con:
            rows, total = await lists.page_lists(con, request.user.tenant_id, limit, offset)
        return Page(items=[_list(r) for r in rows], total=total, limit=limit, offset=offset)

    @get("/{list_id:uuid}", summary="Get a list with its member count")
    async def get_list(self, request: Request, state: State, list_id: FromPath[uuid.UUID]) -> ContactList:
        async with state.services.pool.acquire() as con:
            row = await lists.get_list(con, request.user.tenant_id, list_id)
        if row is None:
            raise problem(404, NOT_FOUND)
        return _list(row)

    @delete(
        "/{list_id:uuid}", guards=[require_write],
        summary="Delete a list and its memberships (the contacts stay); 409 while a broadcast is snapshotting it",
        responses={409: problem_response("a queued broadcast is snapshotting the list (`broadcasts`): retry later; "
                                         "or a segment uses it (`segments`)")},
    )
    async def delete_list(self, request: Request, state: State, list_id: FromPath[uuid.UUID]) -> None:
        tenant_id = request.user.tenant_id
        async with state.services.pool.acquire() as con, con.transaction():
            if await lists.get_list(con, tenant_id, list_id) is None:
                raise problem(404, NOT_FOUND)
            if busy := await broadcasts_view.snapshotting_list(con, tenant_id, list_id):
                raise problem(
                    409, f"list is being snapshotted by {len(busy)} queued broadcast(s); retry when they are sending",
                    "list_in_use", broadcasts=[str(b) for b in busy],
                )
            if users := await segment_store.segments_using_list(con, tenant_id, list_id):
                raise problem(
                    409, f"list is used by {len(users)} segment(s) (member_of); change them first",
                    "list_in_use", segments=[str(s) for s in users],
                )
            await lists.delete_list(con, tenant_id, list_id)

    @post(
        "/{list_id:uuid}/members", guards=[require_write], status_code=200,
        summary="Add contacts to a list (by contact_ids or external_ids; members already in are fine)",
    )
    async def add_members(self, request: Request, state: State, list_id: FromPath[uuid.UUID], data: JSONBody[MembersChange]) -> MembersAdded:
        added, member_count = await _change(request, state, list_id, data, add=True)
        return MembersAdded(added=added, member_count=member_count)

    @delete(
        "/{list_id:uuid}/members", guards=[require_write], status_code=200,
        summary="Remove contacts from a list (by contact_ids or external_ids; non-members are fine)",
    )
    async def remove_members(self, request: Request, state: State, list_id: FromPath[uuid.UUID], data: JSONBody[MembersChange]) -> MembersRemoved:
        removed, member_count = await _change(request, state, list_id, data, add=False)
        return MembersRemoved(removed=removed, member_count=member_count)
