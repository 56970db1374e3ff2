"""Batch jobs on CRIER_JOBS: what the planner publishes and every sender's workers consume."""
from __future__ import annotations

import uuid
from typing import Any

import msgspec


class Recipient(msgspec.Struct, frozen=True, array_like=True):
    """One recipient with what rendering needs, so workers never read contacts."""

    contact_id: int
    address: str
    external_id: str | None
    email: str | None
    phone: str | None
    locale: str | None
    attributes_json: str  # decoded by the worker, not the planner: spreads the cost over senders

    def variables(self) -> dict[str, Any]:
        variables: dict[str, Any] = _decode_attributes(self.attributes_json)
        # Contact fields win over attributes of the same name.
        variables.update(
            contact_id=self.contact_id, external_id=self.external_id, email=self.email, phone=self.phone,
            locale=self.locale,
        )
        return variables


_decode_attributes = msgspec.json.Decoder(dict).decode


class Job(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: uuid.UUID
    broadcast_id: uuid.UUID
    run: int
    seq: int
    channel: str
    provider_id: uuid.UUID
    recipients: list[Recipient]
    resumes: int = 0  # published again after the n-th resume of a paused run

    @property
    def msg_id(self) -> str:
        """The Nats-Msg-Id: a republished job is dropped by the server within the duplicate window.
        A resume republishes the unsent batches on purpose, so its copies get ids of their own."""
        base = f"{self.broadcast_id}:{self.run}:{self.seq}"
        return f"{base}:r{self.resumes}" if self.resumes else base


encode_job = msgspec.msgpack.Encoder().encode
decode_job = msgspec.msgpack.Decoder(Job).decode
