"""Preview (the resolved messages of the first recipients, nothing sent) and test sends (the
content to a few addresses now, through the broadcast's provider, recorded but not counted)."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from shared.broadcasts import decider as b
from shared.broadcasts import view
from shared.broadcasts.handlers import DECIDER, INLINE, Actor
from shared.channels import accounts
from shared.channels.provider import EmailContent, OutgoingMessage, ProviderUnavailable
from shared.channels.registry import build_provider
from shared.content.templates import (
    Budget,
    CompiledContent,
    TemplateError,
    preview_budget,
)
from shared.kernel.errors import Invalid, NotFound
from shared.platform import commands, signing
from shared.platform.logging import get_logger
from shared.platform.signing import Signer
from shared.sending import audience, snapshot
from shared.sending.jobs import Recipient, decode_recipient, reachable, recipient_json

log = get_logger(__name__)


class Resolved(msgspec.Struct, frozen=True, kw_only=True):
    contact_id: int
    channel: str
    address: str
    subject: str
    html: str
    text: str


def _compiled(row: view.BroadcastRow) -> CompiledContent:
    c = row.content
    return CompiledContent.compile(c["subject"], c.get("html", ""), c.get("text", ""))


def _resolve(
    row: view.BroadcastRow, content: CompiledContent, recipient: Recipient, preview: Budget | None = None,
    signer: Signer | None = None,
) -> Resolved:
    if preview is not None and preview.used_up:
        subject, html, text = "(not rendered: the preview's budget of two messages' work is used up)", "", ""
    else:
        budget = Budget()  # a message's limits, as in the send
        variables = recipient.variables()
        if signer is not None:  # the recipient's own link, as the send signs it
            variables["unsubscribe_url"] = signer.unsubscribe_url(row.tenant_id, row.id, recipient.contact_id,
                                                                  row.channel)
        try:
            subject, html, text = content.render(variables, budget)
        except TemplateError as exc:  # shown, as the send would fail this recipient
            subject, html, text = f"(not rendered: {exc})", "", ""
        if preview is not None:
            preview.charge(budget)
    return Resolved(contact_id=recipient.contact_id, channel=row.channel, address=recipient.address,
                    subject=subject, html=html, text=text)


async def _live(con: asyncpg.Connection, tenant_id: uuid.UUID, broadcast_id: uuid.UUID) -> view.BroadcastRow:
    row = await view.get(con, tenant_id, broadcast_id)
    if row is None:
        raise NotFound("broadcast not found")
    return row


async def preview(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, limit: int, at: datetime, public_url: str = "",
) -> list[Resolved]:
    """The first `limit` messages the next send would produce (a top-up: members not reached yet),
    each with its own unsubscribe link (under `public_url`, the deployment's CRIER_PUBLIC_URL)."""
    async with pool.acquire() as con:
        row = await _live(con, tenant_id, broadcast_id)
        target = row.target
        if target is None:
            return []
        runs = snapshot.reached_runs(row.reset_run, row.run)
        reached = audience.Reached(broadcast_id, runs) if runs else None
        try:
            records = await audience.first_recipients(
                con, tenant_id, target, row.channel, at, limit, recipient_json(row.channel), reached)
        except audience.MissingSegment as exc:
            raise Invalid(exc.field, f"no segment {exc.segment_id}") from exc
        signer = await signing.load_signer(con, public_url)
    content = _compiled(row)
    # Each message within a message's limits, and all of them within two messages' worth, so that
    # a heavy template stops the preview within a fraction of a second; the messages past it say why.
    budget = preview_budget()
    return [_resolve(row, content, decode_recipient(r), budget, signer) for r in records]


async def test_send(
    pool: asyncpg.Pool, actor: Actor, broadcast_id: uuid.UUID, emails: list[str], contact_ids: list[int],
    at: datetime, *, allow_private_networks: bool = False,
) -> list[tuple[str, bool, str | None]]:
    """Send the content to `emails` (variables: just the address) and `contact_ids` (their own).

    A failure is told as its class ("unreachable", "auth_failed", "rejected" ...), never in the
    server's own words: those stay in the log."""
    async with pool.acquire() as con:
        row = await _live(con, actor.tenant_id, broadcast_id)
        if row.provider_id is None:
            raise Invalid("provider_id", "the broadcast has no provider to send the test through")
        provider_row = await accounts.get(con, actor.tenant_id, row.provider_id)
        if provider_row is None:
            raise Invalid("provider_id", f"no provider {row.provider_id}")
        contacts = await con.fetch(
            f"""SELECT c.id, {reachable(row.channel)} AS reachable, ({recipient_json(row.channel)})::text AS recipient
                FROM contacts c WHERE c.tenant_id = $1 AND c.id = ANY($2::bigint[])""",
            actor.tenant_id, contact_ids,
        )
    found = {r["id"] for r in contacts}
    for i, cid in enumerate(contact_ids):
        if cid not in found:
            raise Invalid(f"contact_ids[{i}]", f"no contact {cid}")
    recipients = [decode_recipient(r["recipient"]) for r in contacts if r["reachable"]]
    recipients += [Recipient(0, e, None, e, None, None) for e in emails]
    config: dict[str, Any] = provider_row.config
    content = _compiled(row)
    test_id = uuid.uuid4()
    messages = []
    for n, r in enumerate(recipients):
        resolved = _resolve(row, content, r)
        messages.append(OutgoingMessage(
            contact_id=n, to=r.address, idempotency_key=f"test:{test_id}:{n}",
            content=EmailContent(
                subject=f"[Test] {resolved.subject}", html=resolved.html, text=resolved.text,
                from_email=row.content.get("from_email") or config.get("from_email") or "crier@localhost",
                reply_to=row.content.get("reply_to"), headers={"X-Crier-Test": "true"},
            ),
        ))
    provider = build_provider(provider_row.kind, config, allow_private_networks=allow_private_networks)
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
    ok = sum(1 for _, good, _ in results if good)
    command = b.RecordTestSend(addresses=[m.to for m in messages], sent=ok, failed=len(results) - ok, at=at)
    await commands.handle(pool, DECIDER, b.stream_name(broadcast_id), command, actor.metadata(), INLINE)
    return results
