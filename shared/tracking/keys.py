"""Tracking keys and their links (a Postgres adapter): what a click or open code points into.

A key names one run's content on one channel (tenant, broadcast, run, the broadcast's version the
messages were made from, channel); its links are the content's tracked URLs by number
(shared/tracking/links.py). The sender makes both the first time it renders that content for the
run, before any message carrying them goes out; every sender numbers the links alike, so a second
sender's insert finds the same rows.
"""
from __future__ import annotations

import uuid

import asyncpg


async def key_for(
    con: asyncpg.Connection, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, run: int, version: int, channel: str,
    links: dict[int, str],
) -> int:
    """The key of (broadcast, run, version, channel), made if new, with its links stored."""
    async with con.transaction():
        key = await con.fetchval(
            """INSERT INTO tracking_keys (tenant_id, broadcast_id, run, version, channel) VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (broadcast_id, run, version, channel) DO UPDATE SET channel = EXCLUDED.channel
               RETURNING key""",
            tenant_id, broadcast_id, run, version, channel,
        )
        if links:
            await con.execute(
                """INSERT INTO tracked_links (key, link, url) SELECT $1, l.link, l.url
                   FROM unnest($2::int[], $3::text[]) AS l(link, url) ON CONFLICT DO NOTHING""",
                key, list(links), list(links.values()),
            )
    return key
