"""What a worker needs besides the job: the broadcast's content compiled for the job's channel, a
provider session and a signer for the recipients' unsubscribe links.

Content is compiled once per broadcast version and channel (not per recipient, not per job); provider rows
are cached briefly so a PATCH reaches running senders within seconds; signing keys are cached per
process (shared/platform/signing.py).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec

from shared.channels import accounts
from shared.channels.provider import OutgoingMessage, Provider
from shared.channels.ratelimit import Window, windows_of
from shared.channels.registry import build_provider
from shared.kernel.content import Content
from shared.platform.signing import KeyRing, Signer
from shared.sending.jobs import Job, Recipient
from shared.sending.render import ChannelRenderer

PROVIDER_TTL_S = 5.0


class JobContext:
    """Everything one job's messages are made with."""

    def __init__(
        self, job: Job, renderer: ChannelRenderer, provider: Provider, max_retries: int, signer: Signer,
        on_unknown: str = "mark_unknown", make_provider: Callable[[], Provider] | None = None,
        rate_windows: list[Window] | None = None,
    ) -> None:
        # The provider account's rate limits, held across every sender (shared/channels/ratelimit.py).
        self.rate_windows = rate_windows or []
        self.renderer, self.provider, self.max_retries = renderer, provider, max_retries
        self._make_provider = make_provider
        # What becomes of a message a sender that died had handed over without hearing back:
        # `mark_unknown` (never sent again by itself) or `resend` (the provider's account accepts
        # that a recipient may get it twice).
        self.on_unknown = on_unknown
        # "broadcast:run:contact:channel", with the job's part formatted once (str(UUID) is not free).
        self._key_prefix, self._key_suffix = f"{job.broadcast_id}:{job.run}:", f":{job.channel}"
        # Each recipient's signed unsubscribe link (about 1 µs), made where it is used: here for the
        # templates when they name it, and by a provider that puts it in the headers (SMTP).
        self._unsubscribe_link = signer.unsubscribe_links(job.tenant_id, job.broadcast_id, job.channel).url
        self._templates_link = renderer.uses_unsubscribe_url

    async def reopen(self) -> None:
        """A fresh provider session (after the account refused us: a session may remember a refusal
        and fail the rest without asking again). Raises ProviderUnavailable as open() does."""
        if self._make_provider is None:
            return
        await self.provider.close()
        self.provider = self._make_provider()
        await self.provider.open()

    def message(self, recipient: Recipient) -> OutgoingMessage:
        variables = recipient.variables()
        if self._templates_link:
            variables["unsubscribe_url"] = self._unsubscribe_link(recipient.contact_id)
        return OutgoingMessage(
            contact_id=recipient.contact_id,
            to=recipient.address,
            idempotency_key=f"{self._key_prefix}{recipient.contact_id}{self._key_suffix}",
            content=self.renderer.render(variables, recipient.locale),
            unsubscribe_link=self._unsubscribe_link,
        )


async def content_of(con: asyncpg.Connection, row: asyncpg.Record | Any) -> Content:
    """A broadcast's content as its latest run renders it: its own, or its template's version the run
    started with (a template edited since does not reach the run)."""
    if row["template_id"] is None:
        return msgspec.convert(row["content"], Content)
    stored = await con.fetchval("SELECT content FROM template_versions WHERE template_id = $1 AND version = $2",
                                row["template_id"], row["template_version"])
    if stored is None:
        raise LookupError(f"template {row['template_id']} version {row['template_version']} is gone")
    return msgspec.convert(stored, Content)


class JobContextLoader:
    def __init__(self, *, allow_private_networks: bool = False, public_url: str = "http://127.0.0.1:8000") -> None:
        self.allow_private_networks = allow_private_networks  # the operator's setting, for the providers
        self.keys = KeyRing(base_url=public_url)  # unsubscribe links point at the API's public address
        self._content: dict[tuple[uuid.UUID, int], Content] = {}
        self._renderers: dict[tuple[uuid.UUID, int, str, str], ChannelRenderer] = {}
        self._providers: dict[uuid.UUID, tuple[float, accounts.ProviderRow]] = {}

    async def load(self, con: asyncpg.Connection, job: Job, version: int) -> JobContext:
        """The context for `job` at broadcast `version` (read with the batch, so content is only
        fetched when it changed)."""
        provider = await self._provider(con, job)
        if provider is None:
            raise LookupError(f"provider {job.provider_id} is gone")
        from_email = provider.config.get("from_email") or "crier@localhost"
        key = (job.broadcast_id, version, job.channel, from_email)
        renderer = self._renderers.get(key)
        if renderer is None:
            content = self._content.get((job.broadcast_id, version))
            if content is None:
                row = await con.fetchrow(
                    "SELECT content, version, template_id, template_version FROM broadcasts WHERE id = $1",
                    job.broadcast_id)
                if row is None:
                    raise LookupError(f"broadcast {job.broadcast_id} has no view row yet")
                content = await content_of(con, row)
                if len(self._content) > 256:
                    self._content.clear()
                self._content[(job.broadcast_id, row["version"])] = content
            if len(self._renderers) > 256:
                self._renderers.clear()
            renderer = self._renderers[key] = ChannelRenderer(
                content, job.channel, from_email=content.from_email or from_email)
        def make_provider() -> Provider:
            return build_provider(provider.kind, provider.config, allow_private_networks=self.allow_private_networks)

        return JobContext(
            job, renderer, make_provider(), provider.max_retries, await self.keys.signer(con),
            provider.config.get("on_unknown") or "mark_unknown", make_provider,
            windows_of(provider.kind, provider.config),
        )

    async def _provider(self, con: asyncpg.Connection, job: Job) -> accounts.ProviderRow | None:
        cached = self._providers.get(job.provider_id)
        if cached and time.monotonic() - cached[0] < PROVIDER_TTL_S:
            return cached[1]
        row = await accounts.get(con, job.tenant_id, job.provider_id)
        if row is not None:
            self._providers[job.provider_id] = (time.monotonic(), row)
        return row
