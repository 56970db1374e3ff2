"""What a worker needs besides the job: the broadcast's compiled content, a provider session and
a signer for the recipients' unsubscribe links.

Content is compiled once per broadcast version (not per recipient, not per job); provider rows
are cached briefly so a PATCH reaches running senders within seconds; signing keys are cached per
process (shared/platform/signing.py).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, NamedTuple

import asyncpg

from shared.channels import accounts
from shared.channels.provider import EmailContent, OutgoingMessage, Provider
from shared.channels.registry import build_provider
from shared.content.templates import CompiledContent
from shared.platform.signing import KeyRing, Signer
from shared.sending.jobs import Job, Recipient

PROVIDER_TTL_S = 5.0


class JobContext:
    """Everything one job's messages are made with."""

    def __init__(
        self, job: Job, content: CompiledContent, from_email: str, reply_to: str | None, provider: Provider,
        max_retries: int, signer: Signer, uses_unsubscribe_url: bool = True,
    ) -> None:
        self.content, self.from_email, self.reply_to = content, from_email, reply_to
        self.provider, self.max_retries = provider, max_retries
        # "broadcast:run:contact:channel", with the job's part formatted once (str(UUID) is not free).
        self._key_prefix, self._key_suffix = f"{job.broadcast_id}:{job.run}:", f":{job.channel}"
        # Each recipient's signed unsubscribe link (about 1 µs), made where it is used: here for the
        # templates when they name it, and by a provider that puts it in the headers (SMTP).
        self._unsubscribe_link = signer.unsubscribe_links(job.tenant_id, job.broadcast_id, job.channel).url
        self._templates_link = uses_unsubscribe_url

    def message(self, recipient: Recipient) -> OutgoingMessage:
        variables = recipient.variables()
        if self._templates_link:
            variables["unsubscribe_url"] = self._unsubscribe_link(recipient.contact_id)
        subject, html, text = self.content.render(variables)
        return OutgoingMessage(
            contact_id=recipient.contact_id,
            to=recipient.address,
            idempotency_key=f"{self._key_prefix}{recipient.contact_id}{self._key_suffix}",
            content=EmailContent(subject=subject, html=html, text=text, from_email=self.from_email,
                                 reply_to=self.reply_to),
            unsubscribe_link=self._unsubscribe_link,
        )


class _Content(NamedTuple):
    templates: CompiledContent
    from_email: str | None
    reply_to: str | None
    uses_unsubscribe_url: bool


class JobContextLoader:
    def __init__(self, *, allow_private_networks: bool = False, public_url: str = "http://127.0.0.1:8000") -> None:
        self.allow_private_networks = allow_private_networks  # the operator's setting, for the providers
        self.keys = KeyRing(base_url=public_url)  # unsubscribe links point at the API's public address
        self._content: dict[tuple[uuid.UUID, int], _Content] = {}
        self._providers: dict[uuid.UUID, tuple[float, accounts.ProviderRow]] = {}

    async def load(self, con: asyncpg.Connection, job: Job, version: int) -> JobContext:
        """The context for `job` at broadcast `version` (read with the batch, so content is only
        fetched when it changed)."""
        compiled = self._content.get((job.broadcast_id, version))
        if compiled is None:
            row = await con.fetchrow("SELECT content, version FROM broadcasts WHERE id = $1", job.broadcast_id)
            if row is None:
                raise LookupError(f"broadcast {job.broadcast_id} has no view row yet")
            compiled = self._compiled(job.broadcast_id, row["version"], row["content"])
        provider = await self._provider(con, job)
        if provider is None:
            raise LookupError(f"provider {job.provider_id} is gone")
        from_email = compiled.from_email or provider.config.get("from_email") or "crier@localhost"
        return JobContext(
            job, compiled.templates, from_email, compiled.reply_to,
            build_provider(provider.kind, provider.config, allow_private_networks=self.allow_private_networks),
            provider.max_retries, await self.keys.signer(con), compiled.uses_unsubscribe_url,
        )

    def _compiled(self, broadcast_id: uuid.UUID, version: int, content: dict[str, Any]) -> "_Content":
        key = (broadcast_id, version)
        compiled = self._content.get(key)
        if compiled is None:
            if len(self._content) > 256:
                self._content.clear()
            compiled = _Content(
                CompiledContent.compile(content["subject"], content.get("html", ""), content.get("text", "")),
                content.get("from_email"),
                content.get("reply_to"),
                # Read from the source: a template that never names the variable needs no link rendered.
                any("unsubscribe_url" in (content.get(f) or "") for f in ("subject", "html", "text")),
            )
            self._content[key] = compiled
        return compiled

    async def _provider(self, con: asyncpg.Connection, job: Job) -> accounts.ProviderRow | None:
        cached = self._providers.get(job.provider_id)
        if cached and time.monotonic() - cached[0] < PROVIDER_TTL_S:
            return cached[1]
        row = await accounts.get(con, job.tenant_id, job.provider_id)
        if row is not None:
            self._providers[job.provider_id] = (time.monotonic(), row)
        return row
