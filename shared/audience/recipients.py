"""Ad-hoc recipients of a broadcast (a Postgres adapter): contact ids, external ids and addresses
made into the tenant's contact ids, in the caller's transaction.

An address names the tenant's contact with that address (emails compared case-insensitively),
and becomes a new contact when there is none, so every recipient is a contact: the ledger, the
suppression list and an erasure treat them all alike.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Literal

import asyncpg

from shared.kernel.errors import Invalid

Kind = Literal["contact_id", "external_id", "email", "phone"]
FIELD = "audience.recipients"


async def resolve_recipients(
    con: asyncpg.Connection, tenant_id: uuid.UUID, refs: Sequence[tuple[Kind, int | str]]
) -> list[int]:
    """The contact id of each reference, in order, duplicates dropped. Addresses must already be
    valid and in normal form. Invalid naming `audience.recipients[i]` for an id or external id the
    tenant does not have."""
    kinds: dict[Kind, list[tuple[int, int | str]]] = {"contact_id": [], "external_id": [], "email": [], "phone": []}
    for i, (kind, value) in enumerate(refs):
        kinds[kind].append((i, value))
    ids: dict[int, int] = {}
    for kind, column, cast in (("contact_id", "id", "bigint"), ("external_id", "external_id", "text")):
        wanted = kinds[kind]  # type: ignore[index]
        if not wanted:
            continue
        rows = await con.fetch(
            f"SELECT id, {column} AS key FROM contacts WHERE tenant_id = $1 AND {column} = ANY($2::{cast}[])",
            tenant_id, [v for _, v in wanted],
        )
        found = {r["key"]: r["id"] for r in rows}
        for i, value in wanted:
            if value not in found:
                raise Invalid(f"{FIELD}[{i}]", f"the tenant has no contact with {kind.replace('_', ' ')} {value}")
            ids[i] = found[value]
    for kind, match in (("email", "lower(c.email) = lower(a.v)"), ("phone", "c.phone = a.v")):
        wanted = kinds[kind]  # type: ignore[index]
        if not wanted:
            continue
        # The oldest contact with the address, or a new one with just that address.
        rows = await con.fetch(
            f"""WITH a AS (SELECT DISTINCT v FROM unnest($2::text[]) v),
                     known AS (SELECT DISTINCT ON (a.v) a.v, c.id FROM a
                               JOIN contacts c ON c.tenant_id = $1 AND {match}
                               ORDER BY a.v, c.id),
                     created AS (INSERT INTO contacts (tenant_id, {kind})
                                 SELECT $1, a.v FROM a WHERE a.v NOT IN (SELECT v FROM known) ORDER BY a.v
                                 RETURNING {kind} AS v, id)
                SELECT v, id FROM known UNION ALL SELECT v, id FROM created""",
            tenant_id, [str(v) for _, v in wanted],
        )
        by_address = {r["v"]: r["id"] for r in rows}
        for i, value in wanted:
            ids[i] = by_address[value]
    return list(dict.fromkeys(ids[i] for i in range(len(refs))))
