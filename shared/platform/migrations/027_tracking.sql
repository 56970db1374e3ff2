-- Opens and clicks (shared/tracking).
--
-- A tracking key names one run's content on one channel: tenant, broadcast, run, the broadcast's
-- version whose content the messages were made from, and the channel. A click or open code
-- carries the key (shared/platform/signing.py), so it stays short enough for an SMS.
CREATE TABLE tracking_keys (
    key          bigserial PRIMARY KEY,
    tenant_id    uuid    NOT NULL,
    broadcast_id uuid    NOT NULL,
    run          integer NOT NULL,
    version      bigint  NOT NULL,
    channel      text    NOT NULL,
    UNIQUE (broadcast_id, run, version, channel)
);

-- The links a key's messages carry, numbered from 1: the only URLs a click ever redirects to.
CREATE TABLE tracked_links (
    key  bigint  NOT NULL REFERENCES tracking_keys ON DELETE CASCADE,
    link integer NOT NULL,
    url  text    NOT NULL,
    PRIMARY KEY (key, link)
);

-- Per message: its opens (people and mail privacy proxies apart) and clicks, with the first of each.
CREATE TABLE message_engagement (
    broadcast_id    uuid        NOT NULL,
    run             integer     NOT NULL,
    contact_id      bigint      NOT NULL,
    channel         text        NOT NULL,
    opens           integer     NOT NULL DEFAULT 0,
    proxy_opens     integer     NOT NULL DEFAULT 0,
    clicks          integer     NOT NULL DEFAULT 0,
    opened_at       timestamptz,
    proxy_opened_at timestamptz,
    clicked_at      timestamptz,
    PRIMARY KEY (broadcast_id, run, contact_id, channel)
);

-- Per (message, link): its clicks, for each link's unique and total figures.
CREATE TABLE link_clicks (
    key        bigint      NOT NULL,
    link       integer     NOT NULL,
    contact_id bigint      NOT NULL,
    clicks     integer     NOT NULL,
    first_at   timestamptz NOT NULL,
    last_at    timestamptz NOT NULL,
    PRIMARY KEY (key, link, contact_id)
);

-- What happened after sending, per broadcast, run and channel, counted as opens, clicks, receipts
-- and unsubscribes are written (in their transactions): unique = messages, total = every time.
CREATE TABLE engagement_counters (
    broadcast_id uuid    NOT NULL,
    run          integer NOT NULL,
    channel      text    NOT NULL,
    delivered    integer NOT NULL DEFAULT 0,
    read         integer NOT NULL DEFAULT 0,
    opened       integer NOT NULL DEFAULT 0,
    opens        integer NOT NULL DEFAULT 0,
    proxy_opened integer NOT NULL DEFAULT 0,
    proxy_opens  integer NOT NULL DEFAULT 0,
    clicked      integer NOT NULL DEFAULT 0,
    clicks       integer NOT NULL DEFAULT 0,
    bounced      integer NOT NULL DEFAULT 0,
    complained   integer NOT NULL DEFAULT 0,
    unsubscribed integer NOT NULL DEFAULT 0,
    PRIMARY KEY (broadcast_id, run, channel)
);

-- What a broadcast tracks: {opens, clicks, text_links}, null for nothing.
ALTER TABLE broadcasts ADD COLUMN tracking jsonb;
