"""Batch outcomes: one event per finished batch job, in a stream of its own.

A stream per batch (`batch-<broadcast>:<run>:<seq>`) appended with NO_STREAM means a batch can
complete only once, and concurrent workers never contend for one stream's version.
"""
from __future__ import annotations

import uuid
from datetime import datetime

import msgspec

from shared.kernel import streams

CATEGORY = "batch"


def stream_name(broadcast_id: uuid.UUID, run: int, seq: int) -> str:
    return streams.stream_name(CATEGORY, f"{broadcast_id}:{run}:{seq}")


class BatchCompleted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    broadcast_id: uuid.UUID
    run: int
    seq: int
    sent: int  # counted from the ledger rows written in the same transaction
    failed: int
    at: datetime
    # Recipients whose outcome nobody knows: a sender died after handing them to the provider
    # and before hearing back. Not resent (that could send twice); a retry may send them again.
    unknown: int = 0
    # Recipients suppressed (unsubscribed, bounced, by hand) after the snapshot and before their
    # batch was sent: not sent, neither failed.
    suppressed: int = 0


Event = BatchCompleted
