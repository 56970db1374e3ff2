-- Send rates per provider account, counted across every sender process together
-- (shared/channels/ratelimit.py has the arithmetic and why it is shaped this way).

-- GCRA state per provider and window ('second', 'minute', 'hour', 'day'): the theoretical arrival
-- time (TAT) of the next send, in nanoseconds since the epoch of the database clock (one clock for
-- every sender; integers, so the spacing never drifts by rounding). A missing row is a full budget.
-- Unlogged, as rate_limits (011): no WAL and no commit flush on the send path; a database crash
-- forgets the budgets, which only resets them (the provider's 429s, recorded below, then slow us).
-- Updated in place on every take (HOT: `tat` is not indexed), hence the room left on each page.
-- No foreign key: a deleted provider leaves a few dozen bytes behind, and a take costs no lookup.
CREATE UNLOGGED TABLE provider_rate_limits (
    provider_id uuid   NOT NULL,
    per         text   NOT NULL,
    tat         bigint NOT NULL,
    PRIMARY KEY (provider_id, per)
) WITH (fillfactor = 50);

-- Per provider: no send before `blocked_until` (ns since the epoch), set from a provider's 429
-- Retry-After. The row is also the lock every taker of that provider queues on (below).
CREATE UNLOGGED TABLE provider_holds (
    provider_id   uuid PRIMARY KEY,
    blocked_until bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

-- Reserve `p_n` sends at once across all the given windows, or none: one call, one round trip.
-- A function rather than one SQL statement because the windows' rows must be read after the
-- provider's lock is held: a plain statement reads them from the snapshot it took before waiting
-- for that lock, i.e. without the reservation of the taker it waited for. Each statement here
-- takes a fresh snapshot (READ COMMITTED, VOLATILE), so the second sees what the first waited for.
-- Per window: p_intervals = the emission interval T, p_taus = the burst tolerance (burst - 1) * T.
-- The batch may go at the earliest s >= now with s >= TAT + (n - 1) * T - tau in every window and
-- s >= blocked_until; when s - now > p_max_wait nothing is written and `reserved` is false.
-- p_at replaces the clock (tests); NULL reads clock_timestamp() once the lock is held, so time
-- spent waiting for it is not given away.
CREATE FUNCTION provider_rate_take(
    p_provider uuid, p_pers text[], p_intervals bigint[], p_taus bigint[], p_n integer, p_max_wait bigint,
    p_at bigint, OUT now_ns bigint, OUT start_ns bigint, OUT reserved boolean
) LANGUAGE plpgsql AS $$
DECLARE
    blocked bigint;
BEGIN
    INSERT INTO provider_holds (provider_id) VALUES (p_provider) ON CONFLICT DO NOTHING;
    SELECT h.blocked_until INTO blocked FROM provider_holds h WHERE h.provider_id = p_provider FOR UPDATE;
    now_ns := coalesce(p_at, (extract(epoch FROM clock_timestamp()) * 1000000000)::bigint);
    SELECT greatest(now_ns, blocked, max(r.tat + (p_n - 1) * w.t - w.tau)) INTO start_ns
    FROM unnest(p_pers, p_intervals, p_taus) AS w (per, t, tau)
    JOIN provider_rate_limits r ON r.provider_id = p_provider AND r.per = w.per;
    reserved := start_ns - now_ns <= p_max_wait;
    IF reserved THEN
        -- TAT' = max(TAT, s) + n * T, written as max(TAT - s, 0) + (s + n * T)
        INSERT INTO provider_rate_limits AS r (provider_id, per, tat)
        SELECT p_provider, w.per, start_ns + p_n * w.t FROM unnest(p_pers, p_intervals) AS w (per, t)
        ON CONFLICT (provider_id, per) DO UPDATE SET tat = greatest(r.tat - start_ns, 0) + EXCLUDED.tat;
    END IF;
END
$$;
