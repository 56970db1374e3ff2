"""A broadcast's audience as SQL: who its next run goes to, the one definition the planner's
snapshot, the send-time size, the preflight (`GET /v1/broadcasts/{id}/audience`) and the preview
all use, so none of them can disagree with what is sent.

An audience is the union of its includes (lists, segments, recipients) minus its excludes
(lists, segments), each contact once, in contact-id order. Resolved, it is two parts:

- the *candidates*: contact ids in id order after a given one, at most so many (the planner reads
  them in chunks and resumes after the last one);
- the *conditions* on each candidate's contact row `c`: of the tenant, not excluded, not
  suppressed on the channel, not reached by an earlier run (a top-up), and with an address on the
  channel. A recipient is a candidate all of whose conditions hold.

Candidates are walked by the cheapest index that yields them in order: one list's members
(list_members' primary key, the common case), the merge of a few lists' members and the
recipients, or, when a segment is among the includes, the tenant's contacts by (tenant_id, id).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from shared.audience import segment_store
from shared.audience.segments import SqlArgs
from shared.audience.suppressions import suppressed_sql
from shared.channels.registry import address_sql
from shared.kernel.audience import Audience
from shared.sending.jobs import reachable
from shared.tracking.receipt_statuses import HANDED_OVER


class MissingSegment(Exception):
    """A segment the audience names is no longer the tenant's (deleted since the broadcast was saved)."""

    def __init__(self, field: str, segment_id: uuid.UUID) -> None:
        self.field, self.segment_id = field, segment_id
        super().__init__(f"{field}: no segment {segment_id}")


@dataclass(frozen=True)
class Reached:
    """The runs of a broadcast whose recipients a top-up leaves out."""

    broadcast_id: uuid.UUID
    runs: list[int]


_REACHED = ", ".join(f"'{s}'" for s in (*HANDED_OVER, "sending", "unknown"))


def reached_sql(member: str, broadcast: str, runs: str) -> str:
    """SQL: the contact id `member` has a `sent` (or, by its receipts, `delivered`, `read`, `bounced`,
    `complained`: HANDED_OVER), `sending` or `unknown` message in runs `runs` (a placeholder of
    int[]) of broadcast `broadcast`. Not only `sent`: a message claimed by a run that was
    just cancelled may still be on its way, one whose outcome is unknown after a crash may have
    arrived, and sending it again would be the worse mistake (a retry sends `unknown` ones again
    when asked to).

    It is one probe of the ledger's primary key (broadcast_id, run, contact_id) per member.
    `OFFSET 0` keeps it that way: without it Postgres turns the (NOT) EXISTS into an (anti-)join, and
    right after a run wrote its ledger the statistics still say the run has no rows, so it planned
    a nested loop re-scanning the whole run for every member: 187 s to count 100,000 members
    (measured), 0.25 s as probes."""
    return (
        f"EXISTS (SELECT 1 FROM messages x WHERE x.broadcast_id = {broadcast} "
        f"AND x.run = ANY({runs}) AND x.contact_id = {member} "
        f"AND x.status IN ({_REACHED}) OFFSET 0)"
    )


@dataclass(frozen=True)
class ResolvedAudience:
    """An audience resolved for one tenant, channel and time, its parameters in `args`."""

    args: SqlArgs
    single_list: str | None  # the placeholder of the one list, when that is the whole audience
    lists: list[str]  # a placeholder of each included list (uuid), unless single_list
    lists_array: str | None  # ... and of all of them (uuid[])
    recipients: str | None  # placeholder of the included contact ids (bigint[]), if any
    include_segments: list[str]  # each a condition over `c`
    tenant: str
    excluded: str  # a condition over `c`
    suppressed: str
    reached: str  # a condition over `c`: reached by an earlier run ("false" unless a top-up)
    has_address: str

    def candidates(self, after: str | None = None, limit: str | None = None) -> str:
        """SQL: `SELECT contact_id ...`, the candidates in contact-id order, after `after` and at
        most `limit` (placeholders), or all of them."""
        after_lm = f" AND lm.contact_id > {after}" if after else ""
        tail = f" ORDER BY contact_id LIMIT {limit}" if limit else ""
        if self.single_list is not None:
            return (f"SELECT lm.contact_id FROM list_members lm WHERE lm.list_id = {self.single_list}{after_lm}"
                    f"{' ORDER BY lm.contact_id LIMIT ' + limit if limit else ''}")
        if self.include_segments:  # the tenant's contacts in id order, each tested
            includes = list(self.include_segments)
            if self.lists_array:
                includes.append(
                    f"EXISTS (SELECT 1 FROM list_members lm WHERE lm.list_id = ANY({self.lists_array}) "
                    "AND lm.contact_id = c.id)")
            if self.recipients:
                includes.append(f"c.id = ANY({self.recipients})")
            return (f"SELECT c.id AS contact_id FROM contacts c WHERE {self.tenant}"
                    f"{' AND c.id > ' + after if after else ''} AND ({' OR '.join(includes)})"
                    f"{' ORDER BY c.id LIMIT ' + limit if limit else ''}")
        # Lists and recipients: each list's members in order (at most `limit` of each, so a chunk
        # reads no more than it needs of any list), merged, each contact once.
        order = f" ORDER BY 1 LIMIT {limit}" if limit else ""
        branches = [f"(SELECT lm.contact_id FROM list_members lm WHERE lm.list_id = {one}{after_lm}{order})"
                    for one in self.lists]
        if self.recipients:
            branches.append(f"(SELECT r AS contact_id FROM unnest({self.recipients}) r"
                            f"{' WHERE r > ' + after if after else ''}{order})")
        return f"SELECT DISTINCT contact_id FROM ({' UNION ALL '.join(branches)}) u{tail}"

    @property
    def member(self) -> str:
        """SQL over `c`: a candidate of the tenant, not excluded and not reached, whatever its
        addresses (a multi-channel run records the channels it has none on)."""
        return f"({self.tenant}) IS TRUE AND NOT {self.excluded} AND NOT {self.reached}"

    @property
    def recipient(self) -> str:
        """SQL over `c`: a candidate the run sends to. The tenant is checked as a filter (`IS TRUE`
        is no index condition), so each candidate is looked up by the contacts' primary key, hot
        from the import, as before audiences: by (tenant_id, id) the 1M snapshot took 15% longer."""
        return (f"({self.tenant}) IS TRUE AND NOT {self.excluded} AND NOT {self.suppressed} "
                f"AND NOT {self.reached} AND {self.has_address}")


async def resolve(
    con: asyncpg.Connection, tenant_id: uuid.UUID, audience: Audience, channel: str, now: datetime,
    args: SqlArgs, reached: Reached | None = None,
) -> ResolvedAudience:
    """The audience as SQL with its parameters added to `args`. Segments are compiled from their
    rules as they are now (relative dates against `now`); a segment that is gone raises MissingSegment."""
    tenant = args.add(tenant_id, "uuid")

    async def segment(segment_id: uuid.UUID, field: str) -> str:
        condition = await segment_store.segment_condition(con, tenant_id, segment_id, "c", args, now)
        if condition is None:
            raise MissingSegment(field, segment_id)
        return f"({condition})"

    include_segments = [await segment(s, "audience.segments") for s in audience.segments]
    excludes = []
    if audience.exclude_lists:
        excludes.append(
            f"EXISTS (SELECT 1 FROM list_members lx WHERE lx.list_id = ANY({args.add(list(audience.exclude_lists), 'uuid[]')}) "
            f"AND lx.contact_id = c.id)")
    excludes += [await segment(s, "audience.exclude_segments") for s in audience.exclude_segments]
    single = audience.single_list
    # Most tenants never suppressed anyone: then no probe per contact at all (asked once per chunk,
    # so a suppression added meanwhile applies from the next chunk on, and the worker checks again).
    suppressions = await con.fetchval(
        "SELECT EXISTS (SELECT FROM suppression_tenants WHERE tenant_id = $1)", tenant_id)
    # The channel as a literal (a registry name, checked by address_sql), so that a statement using
    # only the other conditions has no parameter it leaves untyped.
    suppressed = (f"({suppressed_sql('c', address_sql(channel), tenant, repr(channel))})"
                  if suppressions else "false")
    return ResolvedAudience(
        args=args,
        single_list=args.add(single, "uuid") if single is not None else None,
        # Every placeholder added must appear in the statement (Postgres cannot type an unused one):
        # the lists as an array where segments make it a scan of contacts, else one each.
        lists=[args.add(one, "uuid") for one in audience.lists] if single is None and not include_segments else [],
        lists_array=args.add(list(audience.lists), "uuid[]") if audience.lists and include_segments else None,
        recipients=args.add(list(audience.recipients), "bigint[]") if audience.recipients else None,
        include_segments=include_segments,
        tenant=f"c.tenant_id = {tenant}",
        excluded=f"({' OR '.join(excludes)})" if excludes else "false",
        suppressed=suppressed,
        reached=(reached_sql("c.id", args.add(reached.broadcast_id, "uuid"), args.add(reached.runs, "int[]"))
                 if reached and reached.runs else "false"),
        has_address=reachable(channel),
    )


@dataclass(frozen=True)
class Preflight:
    """What the next run would do with each contact of the audience's includes, each counted once,
    by the first of these that applies."""

    included: int  # contacts in the includes (of the tenant)
    excluded: int  # ... in an excluded list or segment
    suppressed: int  # ... suppressed on the channel (unsubscribed, bounced, by hand)
    reached: int  # ... reached by an earlier run (a top-up leaves them out)
    no_address: int  # ... without an address on the channel
    reach: int  # the rest: who the next run would send to


async def preflight(
    con: asyncpg.Connection, tenant_id: uuid.UUID, audience: Audience, channel: str, now: datetime,
    reached: Reached | None = None,
) -> Preflight:
    """The next run's audience counted, by the very conditions the planner's snapshot applies."""
    a = await resolve(con, tenant_id, audience, channel, now, SqlArgs([]), reached)
    row = await con.fetchrow(
        f"""SELECT count(*) AS included,
                   count(*) FILTER (WHERE x) AS excluded,
                   count(*) FILTER (WHERE NOT x AND s) AS suppressed,
                   count(*) FILTER (WHERE NOT x AND NOT s AND r) AS reached,
                   count(*) FILTER (WHERE NOT x AND NOT s AND NOT r AND NOT h) AS no_address,
                   count(*) FILTER (WHERE NOT x AND NOT s AND NOT r AND h) AS reach
            FROM (SELECT {a.excluded} AS x, {a.suppressed} AS s, {a.reached} AS r, {a.has_address} AS h
                  FROM ({a.candidates()}) m JOIN contacts c ON c.id = m.contact_id
                  WHERE {a.tenant}) t""",
        *a.args.values,
    )
    return Preflight(**dict(row))


async def first_recipients(
    con: asyncpg.Connection, tenant_id: uuid.UUID, audience: Audience, channel: str, now: datetime, limit: int,
    recipient_json: str, reached: Reached | None = None, any_of: tuple[str, ...] = (),
) -> list[str]:
    """The first `limit` recipients of the next run, in the planner's order, as `recipient_json`
    (SQL over `c`) text. With several channels (`any_of`), those with an address on any of them."""
    a = await resolve(con, tenant_id, audience, channel, now, SqlArgs([]), reached)
    condition = a.recipient
    if len(any_of) > 1:
        condition = f"{a.member} AND NOT {a.suppressed} AND ({' OR '.join(reachable(c) for c in any_of)})"
    rows = await con.fetch(
        f"""SELECT ({recipient_json})::text FROM ({a.candidates()}) m JOIN contacts c ON c.id = m.contact_id
            WHERE {condition} ORDER BY c.id LIMIT {a.args.add(limit, 'int')}""",
        *a.args.values,
    )
    return [r[0] for r in rows]
