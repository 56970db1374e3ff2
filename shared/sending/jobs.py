"""Batch jobs on CRIER_JOBS: what the dispatcher publishes and every sender's workers consume.

A job names a batch; it does not carry its recipients. The worker that takes it reads them from
the batch row (Postgres is authoritative), rendered by Postgres as one JSON array
(`batch_recipients`) that msgspec decodes straight into Recipient structs. So a job is a few
hundred bytes whatever the contacts hold (it always fits what NATS accepts), the dispatcher
publishes without reading a contact, and the JSON is built by the workers of every sender in
parallel rather than by one planner.
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


def recipient_json(channel: str, *, may_lack_address: bool = False) -> str:
    """SQL: contact `c` as a Recipient of `channel` in JSON (its fields in order, the address the
    channel's, from the registry; '' for a contact without one if it `may_lack_address`)."""
    address = f"coalesce({address_sql(channel)}, '')" if may_lack_address else address_sql(channel)
    return f"json_build_array(c.id, {address}, c.external_id, c.email, c.phone, c.locale, c.attributes)"


def recipients_json(channel: str) -> str:
    """SQL: a JSON array of Recipients in contact-id order, from an aggregate over contacts `c`."""
    return f"json_agg({recipient_json(channel)} ORDER BY c.id)"


def reachable(channel: str) -> str:
    """SQL: contact `c` has an address on `channel`."""
    return f"{address_sql(channel)} IS NOT NULL"


def batch_recipients(channel: str, contact_ids: str = "bt.contact_ids") -> str:
    """SQL: a scalar subquery, the JSON array of the Recipients among `contact_ids` (a batch row's)
    that still have an address on `channel`, in contact-id order ('[]' when none has)."""
    return (f"coalesce((SELECT {recipients_json(channel)} FROM contacts c "
            f"WHERE c.id = ANY({contact_ids}) AND {reachable(channel)})::text, '[]')")


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One batch of a run to send."""

    tenant_id: uuid.UUID
    broadcast_id: uuid.UUID
    run: int
    seq: int
    channel: str
    provider_id: uuid.UUID
    resumes: int = 0  # published again after the n-th resume of a paused run
    # The run's providers for this channel when it has several (provider_id is the first): the
    # worker picks one by weight and fails over to the others (sender_service/provider_pool.py).
    pool: tuple[uuid.UUID, ...] = ()

    @property
    def msg_id(self) -> str:
        """The Nats-Msg-Id: a republished job is dropped by the server within the duplicate window.
        A resume republishes the unsent batches on purpose, so its copies get ids of their own."""
        base = f"{self.broadcast_id}:{self.run}:{self.seq}"
        return f"{base}:r{self.resumes}" if self.resumes else base


encode_job = msgspec.json.Encoder().encode
decode_job = msgspec.json.Decoder(Job).decode
decode_recipient = msgspec.json.Decoder(Recipient).decode
decode_recipients = msgspec.json.Decoder(list[Recipient]).decode
