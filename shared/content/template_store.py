"""Templates (a Postgres adapter): reusable content, every save a new immutable version
(023_templates.sql says why).

Every function takes the tenant: another tenant's template is as absent as a missing one, and so is
a deleted one, except to get_version: a running broadcast still renders the version it started with.
Contents are stored as checked by shared.content.checks; this module does not check them again.
"""
from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import msgspec
from msgspec import UNSET, UnsetType

from shared.kernel.content import CHANNELS, Content
from shared.kernel.errors import Conflict
from shared.platform import db

# The statuses of a broadcast that may still render its template (shared.broadcasts.status: every
# one but the finished ones). Spelled out, since shared.content sits below shared.broadcasts.
_LIVE = ["draft", "scheduled", "queued", "sending", "paused"]


class TemplateRow(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    name: str
    is_template: bool
    version: int
    content: Content
    created_at: datetime
    updated_at: datetime  # when `version` was saved


class TemplateSummary(msgspec.Struct, frozen=True, kw_only=True):
    """A template in a list: its content left out (up to 704 KiB each), the channels it covers shown."""

    id: uuid.UUID
    name: str
    is_template: bool
    version: int
    channels: list[str]
    created_at: datetime
    updated_at: datetime


class TemplateVersion(msgspec.Struct, frozen=True, kw_only=True):
    template_id: uuid.UUID
    version: int
    content: Content
    created_at: datetime


class TemplateChanged(Conflict):
    """Saved by another request since it was read: the edit was made on an older version (409)."""

    def __init__(self, template_id: uuid.UUID) -> None:
        super().__init__("template_changed", "the template was changed by another request meanwhile; retry",
                         template_id=str(template_id))


class TemplateInUse(Conflict):
    """Broadcasts that are not finished use it: they could still start a run with it (409)."""

    def __init__(self, broadcasts: list[uuid.UUID]) -> None:
        super().__init__("template_in_use", f"template is used by {len(broadcasts)} broadcast(s) not finished yet",
                         broadcasts=[str(b) for b in broadcasts])


_decode = msgspec.json.Decoder(Content).decode
_COLUMNS = "id, name, is_template, version, content::text AS content, created_at, updated_at"
# The channels a content covers, in CHANNELS' order: email when it has a subject (Content.has), any
# other when its section is there. Stored without defaults, so a key is present only when set.
_CHANNELS = """ARRAY(SELECT c FROM unnest($6::text[]) WITH ORDINALITY AS x(c, i)
                     WHERE content ? CASE c WHEN 'email' THEN 'subject' ELSE c END ORDER BY i) AS channels"""


def _row(record: asyncpg.Record) -> TemplateRow:
    return TemplateRow(**{**dict(record), "content": _decode(record["content"])})


def _json(content: Content) -> str:
    return msgspec.json.encode(content).decode()


async def create(
    con: asyncpg.Connection, tenant_id: uuid.UUID, name: str, content: Content, *, is_template: bool = True,
    idempotency_key: str | None = None,
) -> tuple[TemplateRow, bool]:
    """A new template at version 1; returns it and whether it is new (False: the key was used before)."""
    by_key = f"SELECT {_COLUMNS} FROM templates WHERE tenant_id = $1 AND idempotency_key = $2"
    async with con.transaction():
        if idempotency_key is not None and (row := await con.fetchrow(by_key, tenant_id, idempotency_key)):
            return _row(row), False
        row = await con.fetchrow(
            f"""INSERT INTO templates (id, tenant_id, name, is_template, content, idempotency_key)
                VALUES ($1, $2, $3, $4, $5::text::jsonb, $6)
                ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                RETURNING {_COLUMNS}""",
            uuid.uuid4(), tenant_id, name, is_template, _json(content), idempotency_key,
        )
        if row is None:  # the same key, committed by a concurrent request after the look above
            return _row(await con.fetchrow(by_key, tenant_id, idempotency_key)), False
        await _add_version(con, row)
    return _row(row), True


async def _add_version(con: asyncpg.Connection, row: asyncpg.Record) -> None:
    await con.execute(
        "INSERT INTO template_versions (template_id, version, content, created_at) VALUES ($1, $2, $3::text::jsonb, $4)",
        row["id"], row["version"], row["content"], row["updated_at"],
    )


async def get(
    con: asyncpg.Connection, tenant_id: uuid.UUID, template_id: uuid.UUID, *, for_share: bool = False
) -> TemplateRow | None:
    """The template's current state; None if it is not the tenant's or is deleted. `for_share`: in
    the caller's transaction, the template cannot be changed or deleted until it ends (a broadcast
    taking it up: delete's in_use check then sees that broadcast)."""
    row = await con.fetchrow(
        f"SELECT {_COLUMNS} FROM templates WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL"
        + (" FOR SHARE" if for_share else ""),
        template_id, tenant_id,
    )
    return _row(row) if row else None


async def get_version(
    con: asyncpg.Connection, tenant_id: uuid.UUID, template_id: uuid.UUID, version: int
) -> TemplateVersion | None:
    """One saved version, also of a deleted template; None if there is no such version of the tenant's."""
    row = await con.fetchrow(
        """SELECT v.template_id, v.version, v.content::text AS content, v.created_at
           FROM template_versions v JOIN templates t ON t.id = v.template_id
           WHERE v.template_id = $1 AND v.version = $2 AND t.tenant_id = $3""",
        template_id, version, tenant_id,
    )
    return TemplateVersion(**{**dict(row), "content": _decode(row["content"])}) if row else None


async def list_templates(
    con: asyncpg.Connection, tenant_id: uuid.UUID, *, search: str | None = None, is_template: bool | None = None,
    limit: int = 50, offset: int = 0,
) -> tuple[list[TemplateSummary], int]:
    """The tenant's templates by name (case-insensitively), and how many there are: those whose name
    holds `search` (case-insensitively), with that `is_template` (either when None)."""
    where = """tenant_id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR lower(name) LIKE $2 ESCAPE '\\')
               AND ($3::boolean IS NULL OR is_template = $3)"""
    args = (tenant_id, None if search is None else db.contains_pattern(search), is_template)
    total = await con.fetchval(f"SELECT count(*) FROM templates WHERE {where}", *args)
    rows = await con.fetch(
        f"""SELECT id, name, is_template, version, {_CHANNELS}, created_at, updated_at FROM templates
            WHERE {where} ORDER BY lower(name), id LIMIT $4 OFFSET $5""",
        *args, limit, offset, list(CHANNELS),
    )
    return [TemplateSummary(**dict(r)) for r in rows], total


async def update(
    con: asyncpg.Connection, tenant_id: uuid.UUID, template_id: uuid.UUID, *, expected_version: int,
    name: str | UnsetType = UNSET, is_template: bool | UnsetType = UNSET, content: Content | UnsetType = UNSET,
) -> TemplateRow | None:
    """Save what is given as the next version, if the template is still at `expected_version` (the
    one the caller merged its change into): TemplateChanged if another save came first. None if the
    template is not the tenant's or is deleted."""
    async with con.transaction():
        row = await con.fetchrow(
            f"""UPDATE templates SET name = coalesce($4, name), is_template = coalesce($5, is_template),
                    content = coalesce($6::text::jsonb, content), version = version + 1, updated_at = now()
                WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL AND version = $3
                RETURNING {_COLUMNS}""",
            template_id, tenant_id, expected_version, None if name is UNSET else name,
            None if is_template is UNSET else is_template, None if content is UNSET else _json(content),
        )
        if row is None:
            if await get(con, tenant_id, template_id) is not None:
                raise TemplateChanged(template_id)
            return None
        await _add_version(con, row)
    return _row(row)


async def delete(con: asyncpg.Connection, tenant_id: uuid.UUID, template_id: uuid.UUID) -> bool:
    """Soft-delete; False if it is not the tenant's (or already deleted), TemplateInUse while a
    broadcast not finished uses it. Its key is released: a later create with it makes a new one."""
    async with con.transaction():
        # Locked first, so that a broadcast taking it up meanwhile (get(for_share=True)) is seen below.
        if await con.fetchval(
            "SELECT true FROM templates WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL FOR UPDATE",
            template_id, tenant_id,
        ) is None:
            return False
        if users := await in_use(con, tenant_id, template_id):
            raise TemplateInUse(users)
        await con.execute(
            "UPDATE templates SET deleted_at = now(), idempotency_key = NULL WHERE id = $1 AND tenant_id = $2",
            template_id, tenant_id,
        )
    return True


async def in_use(con: asyncpg.Connection, tenant_id: uuid.UUID, template_id: uuid.UUID) -> list[uuid.UUID]:
    """The tenant's broadcasts, not deleted nor finished, whose content is this template."""
    rows = await con.fetch(
        """SELECT id FROM broadcasts WHERE tenant_id = $1 AND template_id = $2 AND NOT deleted
             AND status = ANY($3::text[]) ORDER BY id""",
        tenant_id, template_id, _LIVE,
    )
    return [r["id"] for r in rows]
