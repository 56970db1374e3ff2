"""/v1/contacts: upsert one contact or import up to 10,000 at once; read, filter, change and erase them."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.datastructures import State
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody
from litestar.params import FromPath, QueryParameter, RawBody

from api_service.auth import require_write
from api_service.openapi import problem_response
from api_service.problems import invalid, problem
from api_service.schemas.audience import (
    MAX_CONTACTS,
    Contact,
    ContactIn,
    ContactPatch,
    ContactsImported,
    contact_batch,
    contact_changes,
    decode_problem,
)
from api_service.schemas.common import NO_NUL, Page
from shared.audience import contacts, erasure, segment_store
from shared.audience.contacts import ContactRow
from shared.audience.segments import SqlArgs
from shared.kernel.limits import MAX_OFFSET
from shared.platform.logging import get_logger

Limit = Annotated[int, QueryParameter(ge=1, le=1000, description="page size")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="items to skip")]  # a bigint in SQL
NOT_FOUND = "contact not found"
MAX_ID = 2**63 - 1  # bigint: a larger id cannot exist
log = get_logger(__name__)

# The body is decoded by hand (one msgspec pass straight into structs, instead of Litestar's JSON to
# builtins then builtins to structs), so the OpenAPI request body is written from the same struct here.
_decode = msgspec.json.Decoder(list[ContactIn] | ContactIn).decode
_decode_patch = msgspec.json.Decoder(ContactPatch).decode


def _schema_of(struct: type[msgspec.Struct]) -> dict[str, Any]:
    (one,), components = msgspec.json.schema_components([struct], ref_template="{name}")
    schema = components[one["$ref"]]
    schema["description"] = " ".join((struct.__doc__ or "").split())
    return schema


def _request_body_schema() -> dict[str, Any]:
    contact = _schema_of(ContactIn)
    return {"oneOf": [contact, {"type": "array", "items": contact, "maxItems": MAX_CONTACTS}]}


@dataclass
class _UpsertOperation(Operation):
    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            description=f"one contact, or an array of up to {MAX_CONTACTS:,} (more: 413)",
            content={"application/json": OpenAPIMediaType(schema=_request_body_schema())},  # type: ignore[arg-type]
        )


@dataclass
class _PatchOperation(Operation):
    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True, description="the fields to change",
            content={"application/json": OpenAPIMediaType(schema=_schema_of(ContactPatch))},  # type: ignore[arg-type]
        )


def _contact(row: ContactRow) -> Contact:
    return Contact(**msgspec.structs.asdict(row))


def _decoded_with(decode: Any, body: bytes) -> Any:
    try:
        return decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        # Reported like Litestar's own body errors: 400 for broken JSON, 422 naming the field.
        message = decode_problem(str(e))
        raise ValidationException(detail=message, extra=[{"message": message}]) from e


def _decoded(body: bytes) -> tuple[list[ContactIn], bool]:
    decoded = _decoded_with(_decode, body)
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

    @get(
        "/",
        summary="List contacts, in id order",
        description=(
            "Filters combine (all must hold): `email` (any case), `external_id`, `list_id` (the list's members), "
            "`segment_id` (the contacts the segment selects now), `updated_since` (created or changed at or after "
            "this time; a time without offset is UTC). A list or segment that is not the tenant's is a 404, like "
            "any other tenant's object. With `segment_id` the request is bounded in time: past "
            f"{contacts.SEGMENT_TIMEOUT_MS // 1000} s it is a 503."
        ),
        responses={
            404: problem_response("`list_id` or `segment_id` is not the tenant's"),
            503: problem_response(f"the segment's contacts could not be read within {contacts.SEGMENT_TIMEOUT_MS // 1000} s"),
        },
    )
    async def list_contacts(
        self,
        request: Request,
        state: State,
        external_id: Annotated[str | None, QueryParameter(
            description="only the contact with this external id", max_length=255, pattern=NO_NUL)] = None,
        email: Annotated[str | None, QueryParameter(
            description="only contacts with this email (any case)", max_length=254, pattern=NO_NUL)] = None,
        list_id: Annotated[uuid.UUID | None, QueryParameter(description="only the members of this list")] = None,
        segment_id: Annotated[uuid.UUID | None, QueryParameter(description="only the contacts this segment selects now")] = None,
        updated_since: Annotated[datetime | None, QueryParameter(
            description="only contacts created or changed at or after this time (ISO 8601; UTC without an offset)")] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> Page[Contact]:
        if updated_since is not None and updated_since.tzinfo is None:
            updated_since = updated_since.replace(tzinfo=timezone.utc)
        tenant_id, now = request.user.tenant_id, state.services.clock()
        async with state.services.pool.acquire() as con:

            async def in_segment(args: SqlArgs) -> str:
                condition = await segment_store.segment_condition(con, tenant_id, segment_id, "c", args, now)
                if condition is None:
                    raise problem(404, "segment not found")
                return condition

            try:
                rows, total = await contacts.page_contacts(
                    con, tenant_id, limit, offset, external_id=external_id, email=email, list_id=list_id,
                    updated_since=updated_since, condition=in_segment if segment_id is not None else None,
                )
            except asyncpg.QueryCanceledError:  # only a segment's conditions can take that long
                slow = problem(503, f"the segment's contacts could not be read within {contacts.SEGMENT_TIMEOUT_MS // 1000} s",
                               retry_after=60)
                slow.headers = {"Retry-After": "60"}
                raise slow from None
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

    @patch(
        "/{contact_id:int}",
        guards=[require_write],
        operation_class=_PatchOperation,
        summary="Change some fields of a contact",
        responses={409: problem_response("`external_id_taken`: the new `external_id` is another contact's (`contact_id`)")},
        description=(
            "The fields given replace the stored ones (`null` clears one) and fields left out are kept, with the "
            "checks and normal forms of `POST /v1/contacts` (`phone_region` for national numbers). `attributes` is a "
            "JSON merge patch (RFC 7396): a key given replaces the stored value, an object is merged into a stored "
            "object the same way, a `null` removes the key, keys left out are kept; `\"attributes\": null` removes "
            "them all. (Unlike the upsert, which merges the top-level keys and stores a `null` as a value.) "
            "`push_tokens` given replaces the whole list.\n\n"
            "404 for a contact that is not the tenant's; 409 `external_id_taken` when the new `external_id` is "
            "another contact's (its id in `contact_id`)."
        ),
    )
    async def patch_contact(self, request: Request, state: State, contact_id: FromPath[int], body: RawBody) -> Contact:
        changes = contact_changes(_decoded_with(_decode_patch, body))
        if not 0 < contact_id <= MAX_ID:
            raise problem(404, NOT_FOUND)
        async with state.services.pool.acquire() as con:
            try:
                row = await contacts.patch_contact(con, request.user.tenant_id, contact_id, changes)
            except contacts.ExternalIdTaken as e:
                raise problem(409, str(e), "external_id_taken", field="external_id", contact_id=e.holder) from e
        if row is None:
            raise problem(404, NOT_FOUND)
        return _contact(row)

    @delete(
        "/{contact_id:int}",
        guards=[require_write],
        summary="Erase a contact (GDPR)",
        description=(
            "Deletes the contact and its list memberships. The send history keeps a record per message with the "
            "contact id, its address replaced by `[erased]` (also where a provider's error quoted it); the "
            "broadcasts' counters stay as they were. One transaction: all of it or nothing."
        ),
    )
    async def delete_contact(self, request: Request, state: State, contact_id: FromPath[int]) -> None:
        if not 0 < contact_id <= MAX_ID:
            raise problem(404, NOT_FOUND)
        async with state.services.pool.acquire() as con:
            erased = await erasure.erase_contact(con, request.user.tenant_id, contact_id)
        if erased is None:
            raise problem(404, NOT_FOUND)
        log.info("contact erased", contact_id=contact_id, ledger_rows=erased.ledger_rows, batches=erased.batches)
