-- The audience figures of GET /v1/broadcasts/{id} (audience_total, remaining) cost a pass over the
-- list (3-4 s for a million members, measured), so they are kept once computed, for as long as
-- neither the broadcast (a new run, a reset) nor the list's membership changed since.

-- Bumped by every statement that adds or removes members, next to member_count.
ALTER TABLE lists ADD COLUMN members_version bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION list_members_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE lists l SET member_count = l.member_count + n.added, members_version = l.members_version + 1
        FROM (SELECT list_id, count(*) AS added FROM added_members GROUP BY list_id) n
        WHERE l.id = n.list_id;
    ELSE
        UPDATE lists l SET member_count = l.member_count - o.removed, members_version = l.members_version + 1
        FROM (SELECT list_id, count(*) AS removed FROM removed_members GROUP BY list_id) o
        WHERE l.id = o.list_id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TABLE audience_counts (
    broadcast_id      uuid PRIMARY KEY,
    broadcast_version bigint NOT NULL,
    list_id           uuid NOT NULL,
    members_version   bigint NOT NULL,
    total             bigint NOT NULL,
    remaining         bigint NOT NULL,
    computed_at       timestamptz NOT NULL DEFAULT now()
);
