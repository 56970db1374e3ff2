"""Preview (the resolved messages of the first recipients, nothing sent) and test sends (the
content to a few addresses now, through the broadcast's providers, recorded but not counted).

Both resolve each recipient as a send would: its channels by the broadcast's policy, its locale's
variant of the content, and the content rendered per channel within a message's limits."""
from __future__ import annotations

import itertools
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from shared.broadcasts import decider as b
from shared.broadcasts import view
from shared.broadcasts.handlers import DECIDER, INLINE, Actor
from shared.channels import accounts
from shared.channels.provider import (
    Content as RenderedContent,
)
from shared.channels.provider import (
    EmailContent,
    OutgoingMessage,
    ProviderUnavailable,
    PushContent,
    SmsContent,
    TelegramContent,
    WebhookContent,
    WhatsappContent,
)
from shared.channels.registry import address_sql, build_provider
from shared.content.templates import Budget, TemplateError, preview_budget
from shared.kernel.content import Content
from shared.kernel.errors import Invalid, NotFound
from shared.platform import commands, signing
from shared.platform.logging import get_logger
from shared.platform.signing import Signer
from shared.sending import audience, snapshot
from shared.sending.channel_policy import choose_channels
from shared.sending.jobs import Recipient, decode_recipient, recipient_json
from shared.sending.render import ChannelRenderer, LinkTracking, Tracker

log = get_logger(__name__)


class ChannelMessage(msgspec.Struct, frozen=True, kw_only=True):
    channel: str
    address: str
    content: dict[str, Any]  # the rendered content of the channel (EmailContent, SmsContent, ... as JSON)
    error: str | None = None  # why it could not be rendered (the send would fail this message)


class Resolved(msgspec.Struct, frozen=True, kw_only=True):
    """One recipient as the next send would resolve it."""

    contact_id: int
    channel: str  # the first channel it gets (or the broadcast's first, if none)
    address: str
    subject: str  # the email's, when the first channel is email
    html: str
    text: str
    locale: str | None = None  # the content variant chosen for it (None: the default)
    channels: list[str] = []  # every channel it gets, in the broadcast's order
    skipped: list[str] = []  # channels the policy would have used, without an address
    messages: list[ChannelMessage] = []


async def content_now(con: asyncpg.Connection, row: view.BroadcastRow) -> Content:
    """The content a run starting now would render: its own, or its template's current version."""
    if row.template_id is None:
        return msgspec.convert(row.content, Content)
    stored = await con.fetchval(
        "SELECT content FROM templates WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
        row.tenant_id, row.template_id)
    if stored is None:
        raise Invalid("template_id", f"no template {row.template_id}")
    return msgspec.convert(stored, Content)


def renderers_for(
    content: Content, channels: tuple[str, ...], from_email: dict[str, str], tracking: LinkTracking | None = None,
) -> dict[str, ChannelRenderer | str]:
    """A renderer per channel, or why there is none (the content has nothing for it, or does not compile)."""
    out: dict[str, ChannelRenderer | str] = {}
    for channel in channels:
        if not content.has(channel):
            out[channel] = f"the content has nothing for {channel}"
            continue
        try:
            out[channel] = ChannelRenderer(content, channel,
                                           from_email=content.from_email or from_email.get(channel, "crier@localhost"),
                                           tracking=tracking)
        except TemplateError as exc:
            out[channel] = str(exc)
    return out


def render_message(
    renderer: ChannelRenderer | str, recipient: Recipient, variables: dict[str, Any], preview: Budget | None,
    tracker: Tracker | None = None,
) -> tuple[RenderedContent | None, str | None]:
    """One recipient's message on the renderer's channel within a message's limits (charged to
    `preview`, if any), or why there is none: what a preview, a test send and GET /v1/messages/{id}
    show."""
    if isinstance(renderer, str):
        return None, renderer
    if preview is not None and preview.used_up:
        return None, "not rendered: the preview's budget of two messages' work is used up"
    budget = Budget()  # a message's limits, as in the send
    try:
        return renderer.render(variables, recipient.locale, budget, tracker), None
    except TemplateError as exc:  # shown, as the send would fail this recipient
        return None, f"not rendered: {exc}"
    finally:
        if preview is not None:
            preview.charge(budget)


def _resolve(
    row: view.BroadcastRow, renderers: dict[str, ChannelRenderer | str], recipient: Recipient,
    addresses: dict[str, str | None], preview: Budget | None = None, signer: Signer | None = None,
) -> Resolved:
    choice = choose_channels(row.channels, row.channel_policy, addresses)
    messages = []
    for channel in choice.chosen:
        variables = recipient.variables()
        if signer is not None:  # the recipient's own link, as the send signs it
            variables["unsubscribe_url"] = signer.unsubscribe_links(row.tenant_id, row.id, channel).url(
                recipient.contact_id)
        rendered, error = render_message(renderers[channel], recipient, variables, preview)
        messages.append(ChannelMessage(channel=channel, address=addresses[channel] or "",
                                       content=msgspec.to_builtins(rendered) if rendered is not None else {},
                                       error=error))
    first = messages[0] if messages else None
    email = first.content if first is not None and first.channel == "email" else {}
    renderer = renderers.get(first.channel) if first else None
    return Resolved(
        contact_id=recipient.contact_id, channel=first.channel if first else row.channel,
        address=first.address if first else "",
        subject=email.get("subject", f"({first.error})" if first and first.error else ""),
        html=email.get("html", ""), text=email.get("text", ""),
        locale=renderer.locale_for(recipient.locale) if isinstance(renderer, ChannelRenderer) else None,
        channels=list(choice.chosen), skipped=list(choice.skipped), messages=messages,
    )


def _addresses_json(channels: tuple[str, ...]) -> str:
    """SQL over `c`: its address on each channel, as a JSON object."""
    return "json_build_object(" + ", ".join(f"'{c}', {address_sql(c)}" for c in channels) + ")::text"


async def _live(con: asyncpg.Connection, tenant_id: uuid.UUID, broadcast_id: uuid.UUID) -> view.BroadcastRow:
    row = await view.get(con, tenant_id, broadcast_id)
    if row is None:
        raise NotFound("broadcast not found")
    return row


async def _from_emails(con: asyncpg.Connection, row: view.BroadcastRow) -> dict[str, str]:
    """Each channel's provider's from_email (the sender when the content names none)."""
    out = {}
    for channel in row.channels:
        provider_id = row.provider_of(channel)
        found = await accounts.get(con, row.tenant_id, provider_id) if provider_id else None
        if found is not None and found.config.get("from_email"):
            out[channel] = found.config["from_email"]
    return out


_decode_addresses = msgspec.json.Decoder(dict[str, str | None]).decode
_CONTENT_OF: dict[str, type] = {"email": EmailContent, "sms": SmsContent, "telegram": TelegramContent,
                                "whatsapp": WhatsappContent, "push": PushContent, "webhook": WebhookContent}


async def preview(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, limit: int, at: datetime, public_url: str = "",
) -> list[Resolved]:
    """The first `limit` recipients the next send would go to (a top-up: members not reached yet),
    each with its channels, its locale's variant and the messages rendered, with its own
    unsubscribe link (under `public_url`, the deployment's CRIER_PUBLIC_URL)."""
    async with pool.acquire() as con:
        row = await _live(con, tenant_id, broadcast_id)
        target = row.target
        if target is None:
            return []
        runs = snapshot.reached_runs(row.reset_run, row.run)
        reached = audience.Reached(broadcast_id, runs) if runs else None
        columns = (f"json_build_array(({recipient_json(row.channel, may_lack_address=True)})::text, "
                   f"{_addresses_json(row.channels)})")
        try:
            records = await audience.first_recipients(
                con, tenant_id, target, row.channel, at, limit, columns, reached, any_of=row.channels)
        except audience.MissingSegment as exc:
            raise Invalid(exc.field, f"no segment {exc.segment_id}") from exc
        signer = await signing.load_signer(con, public_url)
        renderers = renderers_for(await content_now(con, row), row.channels, await _from_emails(con, row))
    # Each message within a message's limits, and all of them within two messages' worth, so that
    # a heavy template stops the preview within a fraction of a second; the messages past it say why.
    budget = preview_budget()
    resolved = []
    for record in records:
        recipient_text, addresses = msgspec.json.decode(record)
        resolved.append(_resolve(row, renderers, decode_recipient(recipient_text), _decode_addresses(addresses),
                                 budget, signer))
    return resolved


async def test_send(
    pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, emails: list[str], contact_ids: list[int],
    at: datetime, *, allow_private_networks: bool = False,
) -> list[tuple[str, bool, str | None]]:
    """Send the content to `emails` (on email; variables: just the address) and `contact_ids` (on
    the channels each would get, with their own variables), through each channel's provider.

    A failure is told as its class ("unreachable", "auth_failed", "rejected" ...), never in the
    server's own words: those stay in the log."""
    async with pool.acquire() as con:
        row = await _live(con, actor.tenant_id, broadcast_id)
        if emails and "email" not in row.channels:
            raise Invalid("emails", "the broadcast does not send on email: give contact_ids")
        providers = {}
        for channel in row.channels:
            provider_id = row.provider_of(channel)
            field = "provider_id" if channel == row.channel else f"providers.{channel}"
            if provider_id is None:
                raise Invalid(field, f"the broadcast has no provider for {channel} to send the test through")
            found = await accounts.get(con, actor.tenant_id, provider_id)
            if found is None:
                raise Invalid(field, f"no provider {provider_id}")
            providers[channel] = found
        contacts = await con.fetch(
            f"""SELECT c.id, ({recipient_json(row.channel, may_lack_address=True)})::text AS recipient,
                       {_addresses_json(row.channels)} AS addresses
                FROM contacts c WHERE c.tenant_id = $1 AND c.id = ANY($2::bigint[])""",
            actor.tenant_id, contact_ids,
        )
        from_emails = {c: p.config["from_email"] for c, p in providers.items() if p.config.get("from_email")}
        renderers = renderers_for(await content_now(con, row), row.channels, from_emails)
    found_ids = {r["id"] for r in contacts}
    for i, cid in enumerate(contact_ids):
        if cid not in found_ids:
            raise Invalid(f"contact_ids[{i}]", f"no contact {cid}")
    # (recipient, its addresses) of each contact, then each address as a recipient on email.
    targets = [(decode_recipient(r["recipient"]), _decode_addresses(r["addresses"])) for r in contacts]
    targets += [(Recipient(0, e, None, e, None, None), {"email": e}) for e in emails]
    test_id, numbers = uuid.uuid4(), itertools.count()
    by_channel: dict[str, list[OutgoingMessage]] = {}
    failed_to_render: list[tuple[str, bool, str | None]] = []
    for n, (recipient, addresses) in enumerate(targets):
        for message in _resolve(row, renderers, recipient, addresses).messages:
            if message.error is not None:
                failed_to_render.append((message.address, False, "template"))
                continue
            content = msgspec.convert(message.content, _CONTENT_OF[message.channel])
            if isinstance(content, EmailContent):
                content = msgspec.structs.replace(content, subject=f"[Test] {content.subject}",
                                                  headers={"X-Crier-Test": "true"})
            # contact_id numbers the test's messages: it pairs each with its result
            by_channel.setdefault(message.channel, []).append(OutgoingMessage(
                contact_id=next(numbers), to=message.address,
                idempotency_key=f"test:{test_id}:{n}:{message.channel}", content=content))
    results = failed_to_render + [
        result for channel, messages in by_channel.items()
        for result in await _send_test(broadcast_id, providers[channel], messages, allow_private_networks)]
    ok = sum(1 for _, good, _ in results if good)
    command = b.RecordTestSend(addresses=[a for a, _, _ in results], sent=ok, failed=len(results) - ok, at=at)
    await commands.handle(pool, DECIDER, b.stream_name(broadcast_id), command, actor.metadata(), INLINE)
    return results


async def _send_test(
    broadcast_id: uuid.UUID, provider_row: accounts.ProviderRow, messages: list[OutgoingMessage],
    allow_private_networks: bool,
) -> list[tuple[str, bool, str | None]]:
    provider = build_provider(provider_row.kind, provider_row.config, allow_private_networks=allow_private_networks)
    try:
        await provider.open()
        outcomes = {r.contact_id: r for r in await provider.send(messages)}
        failure = None
    except ProviderUnavailable as exc:
        log.info("test send: provider unavailable", broadcast_id=str(broadcast_id),
                 provider_id=str(provider_row.id), failure=exc.failure, error=str(exc))
        outcomes, failure = {}, exc.failure
    finally:
        await provider.close()
    results: list[tuple[str, bool, str | None]] = []
    for m in messages:
        r = outcomes.get(m.contact_id)
        if r is not None and not r.ok:
            log.info("test send: message failed", broadcast_id=str(broadcast_id), failure=r.failure, error=r.error)
        results.append((m.to, True, None) if r and r.ok else (m.to, False, (r.failure or "failed") if r else failure))
    return results
