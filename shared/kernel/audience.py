"""Who a broadcast goes to: the union of its includes minus its excludes, each contact once.

A plain value carried by broadcast events (so pure code may hold it); the sender resolves it into
SQL (shared/sending/audience.py), the API resolves `recipients` given as external ids or addresses
into contact ids before a command carries them.
"""
from __future__ import annotations

import uuid

import msgspec

# Bounds: an audience travels in every BroadcastCreated / Edited / Started event (well under NATS's
# 1 MiB: 10,000 contact ids are ~120 KiB as JSON), and each list or segment is one more probe per
# contact of the snapshot.
MAX_AUDIENCE_SETS = 20  # lists, segments, excluded lists, excluded segments: each
MAX_AUDIENCE_RECIPIENTS = 10_000


class Audience(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    lists: tuple[uuid.UUID, ...] = ()
    segments: tuple[uuid.UUID, ...] = ()
    exclude_lists: tuple[uuid.UUID, ...] = ()
    exclude_segments: tuple[uuid.UUID, ...] = ()
    recipients: tuple[int, ...] = ()  # contact ids

    @property
    def empty(self) -> bool:
        """Includes nobody (excludes alone select no one)."""
        return not (self.lists or self.segments or self.recipients)

    @property
    def single_list(self) -> uuid.UUID | None:
        """The list, when the audience is exactly one list and nothing else (the planner's fast path)."""
        if len(self.lists) == 1 and not (self.segments or self.exclude_lists or self.exclude_segments or self.recipients):
            return self.lists[0]
        return None


def of_list(list_id: uuid.UUID | None) -> Audience | None:
    """The audience of a broadcast that names only `list_id` (the shorthand, and every broadcast
    created before audiences)."""
    return Audience(lists=(list_id,)) if list_id is not None else None
