"""/v1/contacts: upsert one contact or import up to 10,000 at once; read, filter and delete them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody
from litestar.params import FromPath, QueryParameter, RawBody

from api_service.auth import require_write
from api_service.problems import invalid, problem
from api_service.schemas.audience import (
    MAX_CONTACTS,
    Contact,
    ContactIn,
    ContactsImported,
    contact_batch,
    decode_problem,
)
from api_service.schemas.common import NO_NUL, Page
from shared.audience import contacts
from shared.audience.contacts import ContactRow
from shared.kernel.limits import MAX_OFFSET

Limit = Annotated[int, QueryParameter(ge=1, le=1000, description="page size")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="items to skip")]  # a bigint in SQL
NOT_FOUND = "contact not found"
MAX_ID = 2**63 - 1  # bigint: a larger id cannot exist

# The body is decoded by hand (one msgspec pass straight into structs, instead of Litestar's JSON to
# builtins then builtins to structs), so the OpenAPI request body is written from the same struct here.
_decode = msgspec.json.Decoder(list[ContactIn] | ContactIn).decode


def _request_body_schema() -> dict[str, Any]:
    (one,), components = msgspec.json.schema_components([ContactIn], ref_template="{name}")
    contact = components[one["$ref"]]
    contact["description"] = " ".join((ContactIn.__doc__ or "").split())
    return {"oneOf": [contact, {"type": "array", "items": contact, "maxItems": MAX_CONTACTS}]}


@dataclass
class _UpsertOperation(Operation):
    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            description=f"one contact, or an array of up to {MAX_CONTACTS:,} (more: 413)",
            content={"application/json": OpenAPIMediaType(schema=_request_body_schema())},  # type: ignore[arg-type]
        )


def _contact(row: ContactRow) -> Contact:
    return Contact(**msgspec.structs.asdict(row))


def _decoded(body: bytes) -> tuple[list[ContactIn], bool]:
    try:
        decoded = _decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        # Reported like Litestar's own body errors: 400 for broken JSON, 422 naming the field.
        message = decode_problem(str(e))
        raise ValidationException(detail=message, extra=[{"message": message}]) from e
    if isinstance(decoded, list):
        return decoded, True
    return [decoded], False


class ContactController(Controller):
    path = "/v1/contacts"
    tags = ["contacts"]

    @post(
        "/",
        guards=[require_write],
        operation_class=_UpsertOperation,
        summary="Create or update contacts (upsert by external_id)",
        description=(
            "Send one contact or an array of up to 10,000. A contact whose `external_id` the tenant already has is "
            "updated: the fields given replace the stored ones (`null` clears one), fields left out are kept, and "
            "`attributes` are merged key by key. Without `external_id` a new contact is always created. An "
            "`external_id` that appears twice in one array is applied in order, as if sent one after the other. "
            "If any item is invalid nothing is written: 422 names every bad field with its index (`[3].email`).\n\n"
            "Answers: one object → 201 with the contact if it was created, 200 if it was updated; an array → 200 "
            "with `{created, updated, ids}` (`ids[i]` is the id of item i); more than 10,000 items → 413."
        ),
        responses={201: ResponseSpec(data_container=Contact, description="one contact, created")},
        status_code=200,
    )
    async def upsert(self, request: Request, state: State, body: RawBody) -> Response[Contact | ContactsImported]:
        items, array = _decoded(body)
        if len(items) > MAX_CONTACTS:
            raise problem(
                413, f"at most {MAX_CONTACTS:,} contacts per request, got {len(items):,}: split the import",
                max_items=MAX_CONTACTS,
            )
        batch = contact_batch(items, array)
        tenant_id = request.user.tenant_id
        async with state.services.pool.acquire() as con:
            try:
                done = await contacts.upsert_contacts(con, tenant_id, batch)
            except asyncpg.DataError as e:  # what only Postgres rejects, e.g. a lone surrogate in attributes
                bad = await contacts.invalid_attributes_at(con, batch.attributes_json)
                raise invalid(f"[{bad[0]}].attributes" if array and bad else "attributes", str(e)) from e
            except contacts.AttributesTooLarge as e:  # only the merge with the stored ones shows it
                keys = set(e.external_ids)
                at = [i for i, c in enumerate(items) if c.external_id in keys and c.attributes is not msgspec.UNSET]
                errors = [{"field": f"[{i}].attributes" if array else "attributes", "reason": e.reason} for i in at[:50]]
                errors = errors or [{"field": "attributes", "reason": e.reason}]
                raise problem(422, "; ".join(f"{x['field']}: {x['reason']}" for x in errors[:5]), errors=errors) from e
            if array:
                return Response(ContactsImported(created=done.created, updated=done.updated, ids=done.ids))
            row = await contacts.get_contact(con, tenant_id, done.ids[0])
        assert row is not None
        return Response(_contact(row), status_code=201 if done.created else 200)

    @get("/", summary="List contacts, in id order")
    async def list_contacts(
        self,
        request: Request,
        state: State,
        external_id: Annotated[str | None, QueryParameter(
            description="only the contact with this external id", max_length=255, pattern=NO_NUL)] = None,
        email: Annotated[str | None, QueryParameter(
            description="only contacts with this email (any case)", max_length=254, pattern=NO_NUL)] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> Page[Contact]:
        async with state.services.pool.acquire() as con:
            rows, total = await contacts.page_contacts(
                con, request.user.tenant_id, limit, offset, external_id=external_id, email=email
            )
        return Page(items=[_contact(r) for r in rows], total=total, limit=limit, offset=offset)

    @get("/{contact_id:int}", summary="Get a contact")
    async def get_contact(self, request: Request, state: State, contact_id: FromPath[int]) -> Contact:
        if not 0 < contact_id <= MAX_ID:
            raise problem(404, NOT_FOUND)
        async with state.services.pool.acquire() as con:
            row = await contacts.get_contact(con, request.user.tenant_id, contact_id)
        if row is None:
            raise problem(404, NOT_FOUND)
        return _contact(row)

    @delete("/{contact_id:int}", guards=[require_write], summary="Delete a contact (and its list memberships)")
    async def delete_contact(self, request: Request, state: State, contact_id: FromPath[int]) -> None:
        if not 0 < contact_id <= MAX_ID:
            raise problem(404, NOT_FOUND)
        async with state.services.pool.acquire() as con:
            if not await contacts.delete_contact(con, request.user.tenant_id, contact_id):
                raise problem(404, NOT_FOUND)
