"""A ledger message as its recipient got it, rendered again: nothing per recipient is stored, so it
is made the way the sender made it, from the content the message was made from and the contact.

The content: a template broadcast's is the template version its run started with (recorded in the
run's BroadcastStarted, kept in template_versions for good). Inline content is the broadcast's as
of the message: its events folded up to the run's start and on to the last one recorded before the
message was (both times are Postgres's). An edit lands only while the run is paused and reaches the
rest of the run (the decider's rule), so this is the content the sender rendered the message from,
where "as of the run's start" would be wrong for the messages after such an edit.

The recipient's data is the contact's as it was when the message was recorded: the contact keeps
its former data for CONTACT_VERSIONS_KEPT_DAYS (migration 031: one row per change of what a message
renders from, not one per recipient and run), so a message that old or younger renders with the data
it was made from; an older one with the earliest kept since (`data_as_sent` false). The sender reads
a batch's contacts just before sending it, so a change in the second between that read and the
message's record shows already. An erased contact's data is gone with it: its message cannot be
rendered again.

The sender is the run's provider for the channel as it is now (the first of a pool). A tracked
message's links and pixel are signed again under the run's tracking key for that content (the
latest made by the time of the message) with today's signing key: the codes may differ from the
ones sent (another kid), and go to the same places.
"""
from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec

from shared.audience import contact_versions
from shared.broadcasts import decider as b
from shared.broadcasts.ledger import LedgerMessage
from shared.broadcasts.previews import render_message, renderers_for
from shared.kernel.content import Content
from shared.platform import codec, eventstore, signing
from shared.sending.jobs import decode_recipient, recipient_json
from shared.sending.render import LinkTracking


class Rendered(msgspec.Struct, frozen=True, kw_only=True):
    content: dict[str, Any] | None  # as the channel's provider got it (EmailContent, SmsContent ... as JSON)
    error: str | None = None  # why there is no content
    template_version: int = 0  # the template's version it was made from (0: inline content)
    locale: str | None = None  # the content's variant the recipient got (None: the default)
    # Whether the recipient data is the very data the message was made from (see the module's doc).
    data_as_sent: bool = False


async def render(con: asyncpg.Connection, tenant_id: uuid.UUID, message: LedgerMessage, public_url: str) -> Rendered:
    """`message` (the tenant's) rendered again for its contact, with its own unsubscribe link under
    `public_url`; or why it cannot be."""
    if message.status == "skipped":
        return Rendered(content=None, error="nothing was sent: the contact had no address on this channel")
    started, state, version_at = await _as_of(con, message)
    if started is None:
        return Rendered(content=None, error="the run's start is not in the broadcast's history")
    content, version = await _content(con, tenant_id, state, started)
    if content is None:
        return Rendered(content=None, error=f"template {state.template_id} version {version} is gone")
    found = await con.fetchrow(
        contact_versions.as_recorded_sql(f"({recipient_json(message.channel, may_lack_address=True)})::text AS recipient, "
                                         f"$3 >= {contact_versions.exact_since_sql()} AS exact"),
        tenant_id, message.contact_id, message.recorded_at)
    if found is None:
        return Rendered(content=None, error="the contact was erased: its data is gone, so its message cannot be made again",
                        template_version=version)
    recipient = decode_recipient(found["recipient"])
    tracks = state.tracking
    from_email = await _from_email(con, tenant_id, started, message.channel)
    tracking = LinkTracking(opens=tracks.opens, clicks=tracks.clicks, text_links=tracks.text_links)
    renderer = renderers_for(content, (message.channel,), from_email, tracking)[message.channel]
    variables = recipient.variables()
    signer = await signing.load_signer(con, public_url)
    if not isinstance(renderer, str) and renderer.uses_unsubscribe_url:
        variables["unsubscribe_url"] = signer.unsubscribe_links(tenant_id, message.broadcast_id, message.channel).url(
            message.contact_id)
    tracker = None
    if tracks.opens or tracks.clicks:
        key = await con.fetchval(
            """SELECT key FROM tracking_keys WHERE broadcast_id = $1 AND run = $2 AND channel = $3 AND version <= $4
               ORDER BY version DESC LIMIT 1""",
            message.broadcast_id, message.run, message.channel, version_at)
        tracker = signer.tracking_links(key, urls=True) if key is not None else None
    rendered, error = render_message(renderer, recipient, variables, None, tracker)
    return Rendered(content=msgspec.to_builtins(rendered) if rendered is not None else None, error=error,
                    template_version=version, data_as_sent=found["exact"],
                    locale=None if isinstance(renderer, str) else renderer.locale_for(recipient.locale))


async def _as_of(
    con: asyncpg.Connection, message: LedgerMessage,
) -> tuple[b.BroadcastStarted | None, b.State, int]:
    """The run's BroadcastStarted, and the broadcast's state when the message was recorded (never
    before the run's start), with its version then (the position of its last event, as the view
    keeps it)."""
    state, started, version = b.INITIAL, None, 0
    for event in await eventstore.read_stream(con, b.stream_name(message.broadcast_id)):
        if started is not None and event.created_at > message.recorded_at:
            break
        decoded = codec.from_recorded(event, b.Event)
        state, version = b.evolve(state, decoded), event.position
        if isinstance(decoded, b.BroadcastStarted) and decoded.run == message.run:
            started = decoded
    return started, state, version


async def _content(
    con: asyncpg.Connection, tenant_id: uuid.UUID, state: b.State, started: b.BroadcastStarted,
) -> tuple[Content | None, int]:
    """The content, and the template version (0: inline), as the sender reads them: the broadcast's
    template at the version its run started with (sender_service/job_context.py, content_of)."""
    if state.template_id is None:
        assert state.content is not None
        return state.content, 0
    stored = await con.fetchval(
        """SELECT v.content FROM template_versions v JOIN templates t ON t.id = v.template_id
           WHERE v.template_id = $1 AND v.version = $2 AND t.tenant_id = $3""",
        state.template_id, started.template_version, tenant_id)
    return (msgspec.convert(stored, Content) if stored is not None else None), started.template_version


async def _from_email(
    con: asyncpg.Connection, tenant_id: uuid.UUID, started: b.BroadcastStarted, channel: str,
) -> dict[str, str]:
    """The run's provider's from_email on `channel` (read as it is now, deleted or not; no secret opened)."""
    found = await con.fetchval(
        "SELECT config->>'from_email' FROM providers WHERE id = $1 AND tenant_id = $2",
        started.provider_of(channel), tenant_id)
    return {channel: found} if found else {}
