"""/v1/suppressions: addresses and contacts not to send to, one channel or all; add (one or up to
10,000), list with filters, and delete."""
from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter

from api_service.auth import require_write
from api_service.problems import problem
from api_service.schemas.common import ONE_LINE, Page
from api_service.schemas.suppressions import (
    MAX_SUPPRESSIONS,
    Reason,
    Scope,
    Suppression,
    SuppressionIn,
    SuppressionsAdded,
    SuppressionsDeleted,
    SuppressionsIn,
    new_suppressions,
)
from shared.audience import suppressions
from shared.audience.suppressions import MAX_ADDRESS_CHARS
from shared.kernel.limits import MAX_OFFSET

Limit = Annotated[int, QueryParameter(ge=1, le=1000, description="page size")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="items to skip")]  # a bigint in SQL
MAX_ID = 2**63 - 1  # bigint: a larger id cannot exist
NOT_FOUND = "suppression not found"
_SHOWN = 100  # unknown contact ids listed in a 422

ChannelFilter = Annotated[Scope | None, QueryParameter(  # type: ignore[valid-type]
    description="only suppressions of this channel (`all`: those of every channel)")]
AddressFilter = Annotated[str | None, QueryParameter(
    description="only those of this address (any case)", min_length=1, max_length=MAX_ADDRESS_CHARS, pattern=ONE_LINE)]
ContactFilter = Annotated[int | None, QueryParameter(description="only those of this contact", ge=1, le=MAX_ID)]


def _suppression(row: suppressions.Suppression) -> Suppression:
    return Suppression(**msgspec.structs.asdict(row))


class SuppressionController(Controller):
    path = "/v1/suppressions"
    tags = ["suppressions"]

    @post(
        "/",
        guards=[require_write],
        summary="Suppress addresses or contacts (one, or an array of up to 10,000)",
        description=(
            "A suppression names a contact (`contact_id`), an address, or both, on one channel or on `all`; "
            "nothing is sent to a recipient whose contact or address (in any case) is suppressed on the "
            "broadcast's channel. Emails are stored trimmed and in lower case; phones are E.164. Adding one "
            "that exists (same channel, contact and address) is not an error: the first is kept, with its "
            "reason and time. If any item is invalid nothing is written: 422 names every bad field with its "
            "index (`[3].address`), also a `contact_id` that is not one of the tenant's contacts.\n\n"
            "Answers: one object → 201 with the suppression if it is new, 200 with the one that was there; "
            f"an array → 200 with `{{created, existing, ids}}` (`ids[i]` is item i's); over {MAX_SUPPRESSIONS:,} "
            "items → 413."
        ),
        responses={201: ResponseSpec(data_container=Suppression, description="one suppression, new")},
        status_code=200,
    )
    async def add(
        self, request: Request, state: State, data: JSONBody[SuppressionIn | SuppressionsIn],
    ) -> Response[Suppression | SuppressionsAdded]:
        array = isinstance(data, list)
        if isinstance(data, list) and len(data) > MAX_SUPPRESSIONS:  # Litestar drops the union's max_length
            raise problem(413, f"at most {MAX_SUPPRESSIONS:,} suppressions per request, got {len(data):,}: split them",
                          max_items=MAX_SUPPRESSIONS)
        items = new_suppressions(data if isinstance(data, list) else [data], array)
        tenant_id = request.user.tenant_id
        async with state.services.pool.acquire() as con:
            if unknown := await suppressions.unknown_contacts(
                con, tenant_id, [i.contact_id for i in items if i.contact_id is not None]
            ):
                at = [i for i, item in enumerate(items) if item.contact_id in unknown]
                errors = [{"field": f"[{i}].contact_id" if array else "contact_id", "reason": "no such contact"}
                          for i in at[:_SHOWN]]
                raise problem(422, "; ".join(f"{e['field']}: {e['reason']}" for e in errors[:5]), "unknown_contacts",
                              errors=errors, unknown=sorted(unknown)[:_SHOWN])
            async with con.transaction():
                added = await suppressions.add_suppressions(con, tenant_id, items)
            if array:
                return Response(SuppressionsAdded(created=added.created, existing=len(items) - added.created,
                                                  ids=added.ids))
            row = await suppressions.get_suppression(con, tenant_id, added.ids[0])
        assert row is not None
        return Response(_suppression(row), status_code=201 if added.created else 200)

    @get("/", summary="List suppressions, newest first")
    async def list_suppressions(
        self, request: Request, state: State, channel: ChannelFilter = None,
        reason: Annotated[Reason | None, QueryParameter(description="only those with this reason")] = None,  # type: ignore[valid-type]
        address: AddressFilter = None, contact_id: ContactFilter = None, limit: Limit = 50, offset: Offset = 0,
    ) -> Page[Suppression]:
        async with state.services.pool.acquire() as con:
            rows, total = await suppressions.page_suppressions(
                con, request.user.tenant_id, limit, offset, channel=channel, reason=reason, address=address,
                contact_id=contact_id,
            )
        return Page(items=[_suppression(r) for r in rows], total=total, limit=limit, offset=offset)

    @get("/{suppression_id:int}", summary="Get a suppression")
    async def get_suppression(self, request: Request, state: State, suppression_id: FromPath[int]) -> Suppression:
        if not 0 < suppression_id <= MAX_ID:
            raise problem(404, NOT_FOUND)
        async with state.services.pool.acquire() as con:
            row = await suppressions.get_suppression(con, request.user.tenant_id, suppression_id)
        if row is None:
            raise problem(404, NOT_FOUND)
        return _suppression(row)

    @delete("/{suppression_id:int}", guards=[require_write], summary="Delete a suppression (sending may resume)")
    async def delete_suppression(self, request: Request, state: State, suppression_id: FromPath[int]) -> None:
        if not 0 < suppression_id <= MAX_ID:
            raise problem(404, NOT_FOUND)
        async with state.services.pool.acquire() as con:
            if not await suppressions.delete_suppression(con, request.user.tenant_id, suppression_id):
                raise problem(404, NOT_FOUND)

    @delete(
        "/", guards=[require_write], status_code=200,
        summary="Delete the suppressions of an address or a contact",
        description=(
            "Every suppression of the `address` (any case) or of the `contact_id` (one naming both goes when "
            "either is given), on `channel` only if given. Give `address`, `contact_id` or both; none is a 422. "
            "Answers how many were deleted (0 is not an error)."
        ),
    )
    async def delete_matching(
        self, request: Request, state: State, address: AddressFilter = None, contact_id: ContactFilter = None,
        channel: ChannelFilter = None,
    ) -> SuppressionsDeleted:
        if address is None and contact_id is None:
            reason = "give an address or a contact_id (or both)"
            raise problem(422, f"address: {reason}", errors=[{"field": "address", "reason": reason}])
        async with state.services.pool.acquire() as con:
            deleted = await suppressions.delete_suppressions(
                con, request.user.tenant_id, address=address, contact_id=contact_id, channel=channel
            )
        return SuppressionsDeleted(deleted=deleted)
