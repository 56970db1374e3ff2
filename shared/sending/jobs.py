"""Batch jobs on CRIER_JOBS: what the planner publishes and every sender's workers consume.

A job is JSON. The planner does not build its recipients in Python: Postgres renders them as a
JSON array (`recipients_json`) and the planner wraps that text, untouched, in the job's envelope
(`PlannedJob`). Decoding a million contact rows into Recipient structs and encoding them was a
quarter of the planner's sender process (profiled), and the planner is a send's critical path.
"""
from __future__ import annotations

import uuid
from typing import Any

import msgspec

from shared.channels.registry import address_sql


class Recipient(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One recipient with what rendering needs, so workers never read contacts. (gc=False: it
    cannot be part of a reference cycle, so the cyclic collector need not track it.)"""

    contact_id: int
    address: str
    external_id: str | None
    email: str | None
    phone: str | None
    locale: str | None
    attributes: dict[str, Any] = {}

    def variables(self) -> dict[str, Any]:
        variables = dict(self.attributes)
        # Contact fields win over attributes of the same name.
        variables.update(
            contact_id=self.contact_id, external_id=self.external_id, email=self.email, phone=self.phone,
            locale=self.locale,
        )
        return variables


def recipient_json(channel: str) -> str:
    """SQL: contact `c` as a Recipient of `channel` in JSON (its fields in order, the address the
    channel's, from the registry)."""
    return f"json_build_array(c.id, {address_sql(channel)}, c.external_id, c.email, c.phone, c.locale, c.attributes)"


def recipients_json(channel: str) -> str:
    """SQL: a JSON array of Recipients in contact-id order, from an aggregate over contacts `c`."""
    return f"json_agg({recipient_json(channel)} ORDER BY c.id)"


def reachable(channel: str) -> str:
    """SQL: contact `c` has an address on `channel`."""
    return f"{address_sql(channel)} IS NOT NULL"


class _JobFields(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: uuid.UUID
    broadcast_id: uuid.UUID
    run: int
    seq: int
    channel: str
    provider_id: uuid.UUID
    resumes: int = 0  # published again after the n-th resume of a paused run

    @property
    def msg_id(self) -> str:
        """The Nats-Msg-Id: a republished job is dropped by the server within the duplicate window.
        A resume republishes the unsent batches on purpose, so its copies get ids of their own."""
        base = f"{self.broadcast_id}:{self.run}:{self.seq}"
        return f"{base}:r{self.resumes}" if self.resumes else base


class Job(_JobFields, frozen=True, kw_only=True):
    """A job as workers read it."""

    recipients: list[Recipient]


class PlannedJob(_JobFields, frozen=True, kw_only=True):
    """A job as the planner writes it: the recipients are Postgres's `recipients_json` text."""

    recipients: msgspec.Raw


encode_job = msgspec.json.Encoder().encode
decode_job = msgspec.json.Decoder(Job).decode
decode_recipient = msgspec.json.Decoder(Recipient).decode
