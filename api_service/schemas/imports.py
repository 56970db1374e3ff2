"""Response bodies of /v1/contacts/imports: an import's progress and outcome, and its rejected rows."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

import msgspec


class ImportRejection(msgspec.Struct, kw_only=True):
    line: int  # where the row starts in the file (a CSV's header is line 1)
    field: str  # the first field found wrong: `email`, `attributes.plan`; `row` for the row as a whole
    reason: str


class ImportSummary(msgspec.Struct, kw_only=True):
    """An import: while `running`, each committed chunk moves the counts (and `updated_at`, which a
    heartbeat also moves at least every 10 s). `rows_read` = `created` + `updated` + `unchanged` +
    `rejected`. `failed`: stopped, `error` says why; the chunks merged before stay merged."""

    id: uuid.UUID
    status: Literal["running", "completed", "failed"]
    format: Literal["csv", "ndjson"]
    list_id: uuid.UUID | None
    bytes_read: int  # of the file, through the last chunk merged
    rows_read: int
    created: int
    updated: int  # rows that changed a contact (or merged into an earlier row of the same contact)
    unchanged: int  # rows that matched a contact and changed nothing
    rejected: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class ContactImport(ImportSummary, kw_only=True):
    rejections: list[ImportRejection]  # the first 1,000 rejected rows, in file order
