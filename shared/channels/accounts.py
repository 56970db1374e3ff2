"""Provider accounts (a Postgres adapter): tenant-scoped rows whose `config` holds the secrets.

The secret fields of a config are sealed on the way in and opened on the way out
(shared/platform/secrets.py), so a ProviderRow's config is plain while the table holds no
credential in clear. A value stored before sealing existed is read as it is until `crier secrets
seal` (reseal_all) seals it.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from shared.platform.secrets import (
    SecretBox,
    SecretKeyMissing,
    SecretUnreadable,
    process_box,
    token_of,
    wrap,
)

DEFAULT_BATCH_SIZE = 50  # the defaults of seed 002: 50 per batch, 5 s apart, 3 retries
DEFAULT_BATCH_DELAY_MS = 5000
DEFAULT_MAX_RETRIES = 3
_UPDATABLE = frozenset({"name", "config", "batch_size", "batch_delay_ms", "max_retries"})

# Per provider kind, the config fields that are credentials: sealed at rest, never returned. Only
# these are sealed and opened. A webhook's static header values are usually the receiver's
# credential (Authorization, X-Api-Key): the whole dict is sealed.
SECRET_FIELDS: dict[str, tuple[str, ...]] = {
    "smtp": ("password", "receipt_secret"),
    "twilio": ("auth_token", "api_key_secret"),
    "whatsapp_cloud": ("access_token", "app_secret", "verify_token"),
    "telegram_bot": ("bot_token",),
    "fcm": ("service_account_key",),
    "webhook": ("secret", "headers"),
}


class ProviderSecretsUnreadable(SecretUnreadable):
    """A provider's sealed secret opens with no key of CRIER_SECRET_KEY (an old key dropped before
    `crier secrets seal` ran, another deployment's key ...): the provider cannot be used until the
    key is back. Names the provider and the field, never the value."""

    def __init__(self, provider_id: uuid.UUID, name: str, reason: str) -> None:
        super().__init__(f"provider {provider_id}: its {name} cannot be opened: {reason}")
        self.provider_id, self.field = provider_id, name


class ProviderRow(msgspec.Struct, frozen=True, kw_only=True):
    """One provider as stored, secrets included: never hand it to a client as is."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    channel: str
    kind: str
    config: dict[str, Any]
    batch_size: int
    batch_delay_ms: int
    max_retries: int
    created_at: datetime
    updated_at: datetime


_ROW = "id, tenant_id, name, channel, kind, config, batch_size, batch_delay_ms, max_retries, created_at, updated_at"


def _seal(kind: str, name: str, value: Any, box: SecretBox) -> Any:
    """One secret as it is stored. Whatever comes in is sealed, even a value shaped like a sealed
    one: only rows read back from the table are trusted to hold tokens, so no input can make the
    server open a token of someone's choosing."""
    if value is None:
        return None
    if box.can_seal:
        # JSON first, so a secret that is not a string (a dict of header values) comes back as it was.
        return wrap(box.seal(json.dumps(value)))
    if box.allow_plaintext and token_of(value) is None:
        return value
    raise SecretKeyMissing(f"cannot store the {name} of a {kind} provider: CRIER_SECRET_KEY is not set "
                           "(CRIER_ALLOW_PLAINTEXT_SECRETS=true stores it in clear)")


def _sealed(kind: str, config: dict[str, Any], box: SecretBox) -> dict[str, Any]:
    """A plain `config` (a create's, a PATCH's merge) with its secret fields sealed."""
    return {name: _seal(kind, name, value, box) if name in SECRET_FIELDS.get(kind, ()) else value
            for name, value in config.items()}


def _opened(provider_id: uuid.UUID, kind: str, config: dict[str, Any], box: SecretBox) -> dict[str, Any]:
    """A stored `config` with its secret fields opened; one stored before sealing is kept as it is."""
    out = dict(config)
    for name in SECRET_FIELDS.get(kind, ()):
        if (token := token_of(config.get(name))) is not None:
            try:
                out[name] = json.loads(box.open(token))
            except SecretUnreadable as exc:
                raise ProviderSecretsUnreadable(provider_id, name, str(exc)) from None
    return out


def _row(record: asyncpg.Record | None, box: SecretBox | None = None) -> ProviderRow | None:
    if record is None:
        return None
    values = dict(record)
    values["config"] = _opened(values["id"], values["kind"], values["config"], box or process_box())
    return ProviderRow(**values)


async def create(
    con: asyncpg.Connection,
    *,
    tenant_id: uuid.UUID,
    name: str,
    kind: str,
    config: dict[str, Any],
    channel: str = "email",
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_delay_ms: int = DEFAULT_BATCH_DELAY_MS,
    max_retries: int = DEFAULT_MAX_RETRIES,
    provider_id: uuid.UUID | None = None,
    idempotency_key: str | None = None,
    at: datetime | None = None,
    box: SecretBox | None = None,
) -> ProviderRow:
    """Insert a provider (its secrets sealed); with an idempotency key already used by this tenant,
    return that row instead. `box`: the process's (shared/platform/secrets.py) unless given."""
    box = box or process_box()
    record = await con.fetchrow(
        f"""INSERT INTO providers (id, tenant_id, name, channel, kind, config, batch_size, batch_delay_ms,
                                   max_retries, idempotency_key, created_at, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, coalesce($11, now()), coalesce($11, now()))
            ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING {_ROW}""",
        provider_id or uuid.uuid4(), tenant_id, name, channel, kind, _sealed(kind, config, box), batch_size,
        batch_delay_ms, max_retries, idempotency_key, at,
    )
    if record is None:  # the key was used before: the first POST's row is the answer
        record = await con.fetchrow(
            f"SELECT {_ROW} FROM providers WHERE tenant_id = $1 AND idempotency_key = $2", tenant_id, idempotency_key
        )
    row = _row(record, box)
    assert row is not None
    return row


async def get(
    con: asyncpg.Connection, tenant_id: uuid.UUID, provider_id: uuid.UUID, *, for_update: bool = False,
    box: SecretBox | None = None,
) -> ProviderRow | None:
    """One live provider of this tenant; another tenant's (or a deleted) provider is as absent as a missing one.
    Raises ProviderSecretsUnreadable when a secret of it opens with no key."""
    lock = " FOR UPDATE" if for_update else ""
    return _row(
        await con.fetchrow(
            f"SELECT {_ROW} FROM providers WHERE id = $1 AND tenant_id = $2 AND NOT deleted{lock}",
            provider_id, tenant_id,
        ),
        box,
    )


async def find(con: asyncpg.Connection, provider_id: uuid.UUID, *, box: SecretBox | None = None) -> ProviderRow | None:
    """A live provider by its id alone, whatever its tenant: only for a public endpoint whose URL
    names the provider, and so its tenant (delivery receipts, shared/tracking/receipts.py), never
    with a tenant's token (that is `get`). Raises ProviderSecretsUnreadable as `get` does."""
    return _row(await con.fetchrow(f"SELECT {_ROW} FROM providers WHERE id = $1 AND NOT deleted", provider_id), box)


async def page(
    con: asyncpg.Connection,
    tenant_id: uuid.UUID,
    limit: int,
    offset: int,
    *,
    channel: str | None = None,
    kind: str | None = None,
    box: SecretBox | None = None,
) -> tuple[list[ProviderRow], int]:
    where = "tenant_id = $1 AND NOT deleted AND ($2::text IS NULL OR channel = $2) AND ($3::text IS NULL OR kind = $3)"
    total = await con.fetchval(f"SELECT count(*) FROM providers WHERE {where}", tenant_id, channel, kind)
    records = await con.fetch(
        f"SELECT {_ROW} FROM providers WHERE {where} ORDER BY created_at DESC, id LIMIT $4 OFFSET $5",
        tenant_id, channel, kind, limit, offset,
    )
    rows = [_row(r, box) for r in records]
    return [r for r in rows if r is not None], total


async def update(
    con: asyncpg.Connection,
    tenant_id: uuid.UUID,
    provider_id: uuid.UUID,
    changes: dict[str, Any],
    at: datetime | None = None,
    box: SecretBox | None = None,
) -> ProviderRow | None:
    """Set the given columns (name, config, batch_size, batch_delay_ms, max_retries); None if not found.
    A new config is sealed as a created one is."""
    unknown = set(changes) - _UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    box = box or process_box()
    if "config" in changes:
        kind = await con.fetchval("SELECT kind FROM providers WHERE id = $1 AND tenant_id = $2", provider_id, tenant_id)
        changes = {**changes, "config": _sealed(kind or "", changes["config"], box)}
    columns = sorted(changes)
    assignments = ", ".join(f"{c} = ${i + 4}" for i, c in enumerate(columns))
    sets = f"{assignments}, updated_at = coalesce($3, now())" if columns else "updated_at = coalesce($3, now())"
    return _row(
        await con.fetchrow(
            f"UPDATE providers SET {sets} WHERE id = $1 AND tenant_id = $2 AND NOT deleted RETURNING {_ROW}",
            provider_id, tenant_id, at, *(changes[c] for c in columns),
        ),
        box,
    )


async def delete(
    con: asyncpg.Connection, tenant_id: uuid.UUID, provider_id: uuid.UUID, at: datetime | None = None
) -> bool:
    """Soft delete: the row stays for the history of broadcasts that used it. False if not found."""
    status = await con.execute(
        "UPDATE providers SET deleted = true, updated_at = coalesce($3, now()) "
        "WHERE id = $1 AND tenant_id = $2 AND NOT deleted",
        provider_id, tenant_id, at,
    )
    return status.endswith(" 1")


async def channel_of(con: asyncpg.Connection, tenant_id: uuid.UUID, provider_id: uuid.UUID) -> str | None:
    """The channel of the tenant's live provider, None if there is none."""
    return await con.fetchval(
        "SELECT channel FROM providers WHERE id = $1 AND tenant_id = $2 AND NOT deleted", provider_id, tenant_id
    )


async def pacing(con: asyncpg.Connection, tenant_id: uuid.UUID, provider_id: uuid.UUID) -> tuple[int, int] | None:
    """(batch_size, batch_delay_ms) of the tenant's live provider, None if there is none."""
    row = await con.fetchrow(
        "SELECT batch_size, batch_delay_ms FROM providers WHERE id = $1 AND tenant_id = $2 AND NOT deleted",
        provider_id, tenant_id,
    )
    return (row["batch_size"], row["batch_delay_ms"]) if row else None


async def batch_delays(con: asyncpg.Connection, providers: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    """batch_delay_ms of each of these providers (a deleted one still paces what is left of its runs)."""
    rows = await con.fetch("SELECT id, batch_delay_ms FROM providers WHERE id = ANY($1::uuid[])", providers)
    return {r["id"]: r["batch_delay_ms"] for r in rows}


@dataclass
class ResealReport:
    """What `crier secrets seal` did: values sealed from clear, re-sealed under the first key, and
    the providers left as they were because a value of theirs opens with no key."""

    sealed: int = 0
    resealed: int = 0
    current: int = 0
    unreadable: list[ProviderSecretsUnreadable] = field(default_factory=list)


async def reseal_all(con: asyncpg.Connection, box: SecretBox) -> ResealReport:
    """Seal every provider's secrets under the first key: values stored in clear, and values sealed
    with an older key (key rotation). Deleted providers too, so that no row needs the old key once
    it is dropped. One short transaction per row, locked, so it runs beside live services and a
    concurrent PATCH is neither lost nor overwritten; a row's `updated_at` stays (nothing a tenant
    set has changed)."""
    if not box.can_seal:
        raise SecretKeyMissing("CRIER_SECRET_KEY is not set: there is no key to seal with")
    report = ResealReport()
    for provider_id in [r["id"] for r in await con.fetch("SELECT id FROM providers ORDER BY id")]:
        async with con.transaction():
            row = await con.fetchrow("SELECT kind, config FROM providers WHERE id = $1 FOR UPDATE", provider_id)
            if row is None:  # rows are only soft-deleted; should one ever go, it has nothing left to seal
                continue
            try:
                config, sealed, resealed, current = _resealed(provider_id, row["kind"], row["config"], box)
            except ProviderSecretsUnreadable as exc:
                report.unreadable.append(exc)
                continue
            if sealed or resealed:
                await con.execute("UPDATE providers SET config = $2 WHERE id = $1", provider_id, config)
        report.sealed, report.resealed, report.current = (
            report.sealed + sealed, report.resealed + resealed, report.current + current)
    return report


def _resealed(
    provider_id: uuid.UUID, kind: str, config: dict[str, Any], box: SecretBox
) -> tuple[dict[str, Any], int, int, int]:
    """A stored config under the first key: (new config, values sealed from clear, values re-sealed,
    values already under the first key)."""
    out, sealed, resealed, current = dict(config), 0, 0, 0
    for name in SECRET_FIELDS.get(kind, ()):
        value = config.get(name)
        if value is None:
            continue
        if (token := token_of(value)) is None:  # stored before sealing existed
            out[name], sealed = _seal(kind, name, value, box), sealed + 1
        elif box.is_current(token):
            current += 1
        else:
            try:
                out[name], resealed = wrap(box.reseal(token)), resealed + 1
            except SecretUnreadable as exc:
                raise ProviderSecretsUnreadable(provider_id, name, str(exc)) from None
    return out, sealed, resealed, current
