"""Rebuild a projection by name from the whole event log (`crier rebuild NAME`)."""
from __future__ import annotations

from shared.broadcasts.counters import CountersView
from shared.broadcasts.view import BroadcastsView
from shared.platform import db
from shared.platform.projections import Projection, rebuild


def all_projections() -> dict[str, Projection]:
    projections: list[Projection] = [BroadcastsView(), CountersView()]
    return {p.name: p for p in projections}


async def rebuild_named(database_url: str, name: str) -> int:
    projections = all_projections()
    if name not in projections:
        raise SystemExit(f"crier: unknown projection {name!r}; known: {', '.join(sorted(projections))}")
    pool = await db.create_pool(database_url, max_size=2)
    try:
        return await rebuild(pool, projections[name])
    finally:
        await pool.close()
