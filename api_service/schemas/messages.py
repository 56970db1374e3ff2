"""/v1/messages: the ledger across a tenant's broadcasts, and one message with its content."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import msgspec

# Ledger statuses (the queued and dropped records of a broadcast's own list are not in the ledger yet).
LedgerStatus = Literal["sending", "sent", "delivered", "read", "bounced", "complained", "failed", "unknown",
                       "suppressed", "skipped"]


class LedgerMessage(msgspec.Struct, kw_only=True):
    """One recipient's message on one channel in one run, as the ledger has it."""

    id: str  # opaque: its broadcast, run, contact and channel, for GET /v1/messages/{id}
    broadcast_id: uuid.UUID
    run: int
    contact_id: int
    channel: str
    address: str  # `[erased]` once the contact was erased
    # sending (handed to the provider, no answer yet), sent, then what receipts made of it (delivered,
    # read, bounced, complained); failed, unknown (a sender died after handing it over), suppressed
    # (after the snapshot, before its batch), skipped (no address on a channel the policy would have used)
    status: str
    attempts: int
    error: str | None
    provider_message_id: str | None
    recorded_at: datetime  # when the ledger recorded it: its attempt (every status has one); the list's order
    sent_at: datetime | None  # when the provider took it
    delivered_at: datetime | None
    read_at: datetime | None
    opened_at: datetime | None  # the first open (null: none recorded, or opens not tracked)
    clicked_at: datetime | None  # the first click
    opens: int
    clicks: int


class MessagePage(msgspec.Struct, kw_only=True):
    items: list[LedgerMessage]
    limit: int
    next_cursor: str | None  # the `cursor` of the next page; null on the last one


class MessageWithContent(LedgerMessage, kw_only=True):
    """A message with its content made again for its recipient (see the route's description)."""

    content: dict[str, Any] | None  # as the channel's provider got it: email {subject, html, text, from_email, ...}, sms {body} ...
    content_error: str | None  # why `content` is null, or why the send failed to render it
    template_version: int  # the template version it was made from (0: the broadcast's own content)
    locale: str | None  # the content's locale variant the recipient gets (null: the default)
    # true: rendered with the recipient data the message was made from; false: with later data (the
    # message is older than the days contact versions are kept), or nothing was rendered
    data_as_sent: bool
