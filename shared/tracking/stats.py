"""A broadcast's engagement in detail (a Postgres adapter): its figures per channel, per link, and
over time. Read on demand (GET /v1/broadcasts/{id}/stats), never by the progress feed.

What each part reads, all by a primary key's broadcast_id prefix, so its cost follows the size of
the broadcast's own rows, never the table's:
- per channel: the sends' outcomes from `batches` (a row per 500 or so recipients, its counts
  written at its completion), the engagement from `engagement_counters` (a row per run and channel);
- per link: `tracked_links` of the broadcast's tracking keys, and `link_clicks` (a row per message
  and link clicked). A URL in several runs or content versions is one link: `clicked` counts the
  contacts who clicked it, `clicks` every time. The MAX_LINKS most clicked;
- over time: sends from `batches` (a row per 500 or so recipients: a batch's sends are counted at
  its completion), first opens and clicks from `message_engagement` (a row per message opened or
  clicked), in buckets of a minute (the default while a run is sending) or an hour (after), the
  latest MAX_BUCKETS that had anything. The ledger itself (a row per recipient) is not read.
"""
from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import msgspec

MAX_LINKS = 500
MAX_BUCKETS = {"minute": 1440, "hour": 2160}  # a day of minutes, 90 days of hours
BUCKETS = tuple(MAX_BUCKETS)
CHANNEL_FIGURES = ("delivered", "read", "opened", "opens", "proxy_opened", "proxy_opens", "clicked", "clicks",
                   "bounced", "complained", "unsubscribed")


class ChannelStats(msgspec.Struct, kw_only=True):
    channel: str
    delivered: int
    read: int
    opened: int
    opens: int
    proxy_opened: int
    proxy_opens: int
    clicked: int
    clicks: int
    bounced: int
    complained: int
    unsubscribed: int


class ChannelFigures(ChannelStats, kw_only=True):
    """A channel's engagement, and its sends' outcomes over the broadcast's runs (by their batch's
    completion, as the timeline counts them)."""

    sent: int
    failed: int
    unknown: int  # handed over by a sender that died before the provider's answer
    suppressed: int  # left out after the snapshot: suppressed before their batch went


class LinkStats(msgspec.Struct, kw_only=True):
    url: str
    clicked: int  # contacts who clicked it
    clicks: int


class Bucket(msgspec.Struct, kw_only=True):
    at: datetime  # the start of the minute or hour (UTC)
    sent: int  # messages sent (by their batch's completion)
    opened: int  # messages first opened by a person
    proxy_opened: int  # messages whose pixel a privacy proxy first fetched
    clicked: int  # messages first clicked


class Stats(msgspec.Struct, kw_only=True):
    channels: list[ChannelFigures]
    links: list[LinkStats]
    bucket: str
    timeline: list[Bucket]  # oldest first


SEND_FIGURES = ("sent", "failed", "unknown", "suppressed")
# A batch written before channels were (migration 021) was an email one.
_CHANNELS = f"""
WITH sends AS (
    SELECT coalesce(channel, 'email') AS channel, {", ".join(f"sum({f})::bigint AS {f}" for f in SEND_FIGURES)}
    FROM batches WHERE broadcast_id = $1 GROUP BY 1
), engaged AS (
    SELECT channel, {", ".join(f"sum({f})::bigint AS {f}" for f in CHANNEL_FIGURES)}
    FROM engagement_counters WHERE broadcast_id = $1 GROUP BY channel
)
SELECT channel, {", ".join(f"coalesce({f}, 0) AS {f}" for f in SEND_FIGURES + CHANNEL_FIGURES)}
FROM sends FULL JOIN engaged USING (channel) ORDER BY channel"""

_LINKS = """
SELECT l.url, count(DISTINCT c.contact_id) AS clicked, coalesce(sum(c.clicks), 0)::bigint AS clicks
FROM tracking_keys k JOIN tracked_links l ON l.key = k.key
LEFT JOIN link_clicks c ON c.key = l.key AND c.link = l.link
WHERE k.broadcast_id = $1 AND k.tenant_id = $2
GROUP BY l.url ORDER BY clicks DESC, min(k.key), min(l.link) LIMIT $3"""

# date_trunc in UTC, whatever the session's time zone.
_TIMELINE = """
WITH sends AS (
    SELECT date_trunc($2, completed_at AT TIME ZONE 'UTC') AS at, sum(sent)::bigint AS n
    FROM batches WHERE broadcast_id = $1 AND completed_at IS NOT NULL AND sent > 0 GROUP BY 1
), engaged AS (
    SELECT date_trunc($2, t.at AT TIME ZONE 'UTC') AS at, count(*) FILTER (WHERE t.what = 'o') AS opened,
           count(*) FILTER (WHERE t.what = 'p') AS proxy_opened, count(*) FILTER (WHERE t.what = 'c') AS clicked
    FROM message_engagement me
    CROSS JOIN LATERAL (VALUES ('o', me.opened_at), ('p', me.proxy_opened_at), ('c', me.clicked_at)) AS t(what, at)
    WHERE me.broadcast_id = $1 AND t.at IS NOT NULL GROUP BY 1
)
SELECT at AT TIME ZONE 'UTC' AS at, coalesce(s.n, 0) AS sent, coalesce(e.opened, 0) AS opened,
       coalesce(e.proxy_opened, 0) AS proxy_opened, coalesce(e.clicked, 0) AS clicked
FROM sends s FULL JOIN engaged e USING (at) ORDER BY at DESC LIMIT $3"""


async def broadcast_stats(con: asyncpg.Connection, tenant_id: uuid.UUID, broadcast_id: uuid.UUID,
                          bucket: str) -> Stats:
    """The broadcast's stats (the caller has checked it is the tenant's); `bucket`: minute or hour."""
    if bucket not in MAX_BUCKETS:
        raise ValueError(f"bucket must be one of {', '.join(BUCKETS)}")
    async with con.transaction(isolation="repeatable_read", readonly=True):  # the parts agree
        channels = await con.fetch(_CHANNELS, broadcast_id)
        links = await con.fetch(_LINKS, broadcast_id, tenant_id, MAX_LINKS)
        timeline = await con.fetch(_TIMELINE, broadcast_id, bucket, MAX_BUCKETS[bucket])
    return Stats(
        channels=[ChannelFigures(**dict(r)) for r in channels],
        links=[LinkStats(**dict(r)) for r in links],
        bucket=bucket,
        timeline=[Bucket(**dict(r)) for r in reversed(timeline)],
    )
