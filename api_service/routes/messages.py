"""/v1/messages: the ledger across the tenant's broadcasts, newest first a page at a time, and one
message with its content made again for its recipient."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Annotated

import msgspec
from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import FromPath, QueryParameter

from api_service.openapi import problem_response
from api_service.problems import problem
from api_service.schemas.broadcasts import Channel
from api_service.schemas.messages import (
    LedgerMessage,
    LedgerStatus,
    MessagePage,
    MessageWithContent,
)
from shared.broadcasts import ledger, message_content
from shared.kernel.errors import Invalid

NOT_FOUND = "message not found"
MAX_ID = 2**63 - 1  # a contact id is a bigint: a larger one cannot exist
Limit = Annotated[int, QueryParameter(ge=1, le=ledger.MAX_PAGE, description="page size")]
Cursor = Annotated[str | None, QueryParameter(
    min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
    description="where the page starts: the `next_cursor` of the page before (filters are not in it: give the same)")]
Time = Annotated[datetime | None, QueryParameter(description="ISO 8601; UTC without an offset")]


def _out(message: ledger.LedgerMessage) -> dict:
    return {"id": ledger.message_id(message.key), **msgspec.to_builtins(message)}


def _utc(at: datetime | None) -> datetime | None:
    return at.replace(tzinfo=timezone.utc) if at is not None and at.tzinfo is None else at


class MessageController(Controller):
    path = "/v1/messages"
    tags = ["messages"]

    @get("/", summary="The ledger across broadcasts: every message recorded, newest first",
         description=(
             "One item per recipient, channel and run the senders attempted (recipients whose batch has not been "
             "attempted yet are only in `GET /v1/broadcasts/{id}/messages`), of live and deleted broadcasts alike. "
             "Newest first by `recorded_at` (when the ledger recorded the message: its attempt; every status has "
             "one, unlike `sent_at`); `since` (inclusive) and `until` (exclusive) filter on it. Filters combine. "
             "Another tenant's `broadcast_id` or `contact_id` matches nothing. Keyset pages: no `total`; the next "
             "page is `cursor=next_cursor` with the same filters, until `next_cursor` is null. A page holds its "
             "place while messages are added: newer ones are on the first page, never between pages. A tenant "
             "with a large ledger whose messages are older than much of everyone's may find a page without "
             f"filters slow to read: past {ledger.WALK_TIMEOUT_MS // 1000} s it is a 503 asking for since/until "
             "or a broadcast_id or contact_id."),
         responses={503: problem_response(
             f"the page could not be read within {ledger.WALK_TIMEOUT_MS // 1000} s (or Postgres or NATS cannot "
             "be reached)")})
    async def list_messages(
        self, request: Request, state: State,
        broadcast_id: Annotated[uuid.UUID | None, QueryParameter(description="only this broadcast's messages")] = None,
        contact_id: Annotated[int | None, QueryParameter(ge=1, le=MAX_ID, description="only this contact's messages")] = None,
        channel: Annotated[Channel | None, QueryParameter(description="only messages on this channel")] = None,
        status: Annotated[LedgerStatus | None, QueryParameter(description="only messages in this status")] = None,
        since: Time = None, until: Time = None, cursor: Cursor = None, limit: Limit = 100,
    ) -> MessagePage:
        since, until = _utc(since), _utc(until)
        if since is not None and until is not None and until <= since:
            raise Invalid("until", "must be after since")
        filters = ledger.Filters(broadcast_id=broadcast_id, contact_id=contact_id, channel=channel, status=status,
                                 since=since, until=until)
        async with state.services.pool.acquire() as con:
            try:
                found, next_cursor = await ledger.page(con, request.user.tenant_id, filters, limit, cursor)
            except ledger.WalkTooLong:
                slow = problem(503, f"the page could not be read within {ledger.WALK_TIMEOUT_MS // 1000} s: narrow it "
                                    "with since/until, broadcast_id or contact_id", retry_after=60)
                slow.headers = {"Retry-After": "60"}
                raise slow from None
        return MessagePage(items=[msgspec.convert(_out(m), LedgerMessage) for m in found], limit=limit,
                           next_cursor=next_cursor)

    @get("/{message_id:str}", summary="One message, with its content made again for its recipient",
         description=(
             "The message as the ledger has it, and `content`: what its recipient got, made again (nothing per "
             "recipient is stored) as the sender made it: from the template version its run started with, or "
             "the broadcast's own content as it was when the message was recorded (an edit while the run was "
             "paused reached the messages after it), in the recipient's locale variant, with its own "
             "unsubscribe link, tracked links signed for it. The recipient's data is the contact's as it was when "
             "the message was recorded (`data_as_sent`; contacts keep their former data 90 days, an older message "
             "shows the earliest kept since); an erased contact's message cannot be made again (`content: null`, "
             "`content_error` says why)."))
    async def get_message(self, request: Request, state: State, message_id: FromPath[str]) -> MessageWithContent:
        key = ledger.parse_message_id(message_id)
        if key is None:  # not an id this API gave out: as absent as another tenant's
            raise problem(404, NOT_FOUND)
        tenant_id, services = request.user.tenant_id, state.services
        async with services.pool.acquire() as con:
            found = await ledger.get(con, tenant_id, key)
            if found is None:
                raise problem(404, NOT_FOUND)
            rendered = await message_content.render(con, tenant_id, found, services.settings.public_base_url)
        return msgspec.convert({**_out(found), "content": rendered.content, "content_error": rendered.error,
                                "template_version": rendered.template_version, "locale": rendered.locale,
                                "data_as_sent": rendered.data_as_sent},
                               MessageWithContent)
