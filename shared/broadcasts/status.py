"""A broadcast's statuses and the groups every part of Crier reasons with (the one vocabulary:
views, workers, the planner and the progress feed import these, never spell them again)."""
from __future__ import annotations

from collections.abc import Iterable
from enum import Enum


class Status(str, Enum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    PAUSED = "paused"
    COMPLETED = "completed"
    PARTIALLY_FAILED = "partially_failed"
    FAILED = "failed"
    CANCELLED = "cancelled"


EDITABLE = frozenset({Status.DRAFT, Status.SCHEDULED, Status.PAUSED})
# A run ended by itself (every batch has an outcome).
FINISHED = frozenset({Status.COMPLETED, Status.PARTIALLY_FAILED, Status.FAILED})
RUNNING = frozenset({Status.QUEUED, Status.SENDING})
# The last run ended and nothing more goes out until a new one (a stop ends it in draft, where
# broadcasts also begin, so draft is not among them).
ENDED = FINISHED | {Status.CANCELLED}
# A run exists whose unsent messages are kept: it still goes on (a paused one is resumed later).
ACTIVE = RUNNING | {Status.PAUSED}
# `send` is always a top-up: only audience members this broadcast has not reached yet.
SENDABLE = ENDED | {Status.DRAFT, Status.SCHEDULED}
SCHEDULABLE = frozenset({Status.DRAFT, Status.SCHEDULED})
CANCELLABLE = frozenset({Status.SCHEDULED}) | ACTIVE
STOPPABLE = CANCELLABLE
RESETTABLE = ENDED | {Status.DRAFT}
# `retry` sends the latest run again to its failed / unknown recipients: only once that run ended.
RETRYABLE = ENDED
DELETABLE = frozenset(Status) - ACTIVE


def sql_list(statuses: Iterable[Status]) -> str:
    """The statuses as an SQL list literal, `('queued', 'sending')`, in a fixed order, for queries
    that test a status column (a literal keeps hot statements free of extra parameters)."""
    return "(" + ", ".join(f"'{s.value}'" for s in sorted(statuses, key=lambda s: s.value)) + ")"
