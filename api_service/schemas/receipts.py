"""The bodies of POST /v1/receipts/{provider_id}: a WhatsApp Cloud status webhook (the part of Meta's
shape Crier reads; everything else is ignored, since Meta adds fields) and the email relay's
receipt, a shape of Crier's own (README: Delivery receipts). Twilio's callbacks are a form, read
field by field in the route."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

MAX_RECEIPT_BYTES = 1024 * 1024  # a request's body: Meta batches statuses, a few hundred bytes each
MAX_EMAIL_RECEIPTS = 1000  # receipts in one email relay request
ProviderMessageId = Annotated[str, Meta(min_length=1, max_length=512)]


class WhatsappErrorData(msgspec.Struct, kw_only=True):
    details: str | None = None


class WhatsappError(msgspec.Struct, kw_only=True):
    code: int | None = None
    title: str | None = None
    message: str | None = None
    error_data: WhatsappErrorData | None = None


class WhatsappStatus(msgspec.Struct, kw_only=True):
    id: ProviderMessageId  # the wamid the send's answer gave
    status: str  # sent | delivered | read | failed (others are taken and ignored)
    timestamp: str | int | None = None  # Unix seconds, as a string
    recipient_id: str | None = None
    errors: list[WhatsappError] = []


class WhatsappValue(msgspec.Struct, kw_only=True):
    statuses: list[WhatsappStatus] = []  # absent for incoming messages, which are not Crier's


class WhatsappChange(msgspec.Struct, kw_only=True):
    field: str | None = None
    value: WhatsappValue | None = None


class WhatsappEntry(msgspec.Struct, kw_only=True):
    id: str | None = None
    changes: list[WhatsappChange] = []


class WhatsappWebhook(msgspec.Struct, kw_only=True):
    """`{"object": "whatsapp_business_account", "entry": [{"changes": [{"value": {"statuses": [...]}}]}]}`"""

    object: str | None = None
    entry: list[WhatsappEntry] = []

    def statuses(self) -> list[WhatsappStatus]:
        return [s for e in self.entry for c in e.changes if c.value is not None for s in c.value.statuses]


class EmailReceipt(msgspec.Struct, kw_only=True):
    """One receipt of an email relay (README: Delivery receipts). Fields it does not know are ignored."""

    type: Literal["delivered", "bounced", "complained"]
    message_id: Annotated[str, Meta(min_length=1, max_length=998, description=(
        "the Message-ID header Crier set on the message, `<…@crier>`, with or without the angle brackets"))]
    bounce: Literal["hard", "soft"] | None = None  # required with `bounced`: a hard bounce suppresses the address
    at: datetime | None = None  # when it happened (RFC 3339); when it arrived if left out
    reason: Annotated[str, Meta(max_length=2000)] | None = None  # the bounce's diagnostic, kept in the ledger's error
    address: Annotated[str, Meta(max_length=998)] | None = None  # for the relay's logs; the ledger's address is used


EmailReceipts = EmailReceipt | Annotated[list[EmailReceipt], Meta(max_length=MAX_EMAIL_RECEIPTS)]


class ReceiptsTaken(msgspec.Struct, kw_only=True):
    received: Annotated[int, Meta(description="statuses in the request that the ledger takes")]
    applied: Annotated[int, Meta(description="messages of the provider's tenant that they moved on")]
    held: Annotated[int, Meta(description=(
        "statuses that named no message yet (its outcome not written yet): held, and applied within seconds "
        "of its message being written; dropped after 10 minutes"))] = 0
