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
from typing import Any, NamedTuple

import asyncpg
import msgspec

from sender_service import provider_pool
from sender_service.provider_pool import FailingProviders
from shared.broadcasts.decider import Tracking
from shared.channels import accounts
from shared.channels.provider import OutgoingMessage, Provider, ProviderUnavailable
from shared.channels.ratelimit import Window, windows_of
from shared.channels.registry import build_provider
from shared.kernel.content import Content
from shared.kernel.limits import MAX_PROVIDER_WEIGHT
from shared.platform.logging import get_logger
from shared.platform.signing import KeyRing, Signer, TrackingLinks
from shared.sending.jobs import Job, Recipient
from shared.sending.render import ChannelRenderer, LinkTracking, Tracker
from shared.tracking import keys as tracking_keys

PROVIDER_TTL_S = 5.0
log = get_logger(__name__)


class Account(NamedTuple):
    """One provider account a job may send through, with what its settings make of the job."""

    provider_id: uuid.UUID
    make_provider: Callable[[], Provider]
    max_retries: int
    # What becomes of a message a sender that died had handed over without hearing back:
    # `mark_unknown` (never sent again by itself) or `resend` (the provider's account accepts
    # that a recipient may get it twice).
    on_unknown: str
    rate_windows: list[Window]  # the account's rate limits, held across every sender (ratelimit.py)
    renderer: ChannelRenderer  # its own: a provider's from_email is the content's default sender


class JobContext:
    """Everything one job's messages are made with: the content, and the provider account it goes
    through now (of `accounts`, in the order to try them: more than one for a run's pool)."""

    def __init__(
        self, job: Job, accounts: list[Account], signer: Signer, failing: FailingProviders | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        self._accounts = accounts
        self._tracker = tracker  # the run's signed click and open URLs, when it tracks any
        self._failing = failing or FailingProviders()
        self._use(0)
        # "broadcast:run:contact:channel", with the job's part formatted once (str(UUID) is not free).
        self._key_prefix, self._key_suffix = f"{job.broadcast_id}:{job.run}:", f":{job.channel}"
        # Each recipient's signed unsubscribe link (about 1 µs), made where it is used: here for the
        # templates when they name it, and by a provider that puts it in the headers (SMTP).
        self._unsubscribe_link = signer.unsubscribe_links(job.tenant_id, job.broadcast_id, job.channel).url

    @property
    def accounts(self) -> list[Account]:
        return self._accounts

    def _use(self, at: int) -> None:
        """Send through account `at` from now on (plain attributes: `message` runs per recipient)."""
        self._at, account = at, self._accounts[at]
        self.provider = account.make_provider()
        self.provider_id, self.max_retries, self.on_unknown = account.provider_id, account.max_retries, account.on_unknown
        self.rate_windows, self.renderer = account.rate_windows, account.renderer
        self._templates_link = account.renderer.uses_unsubscribe_url

    async def open(self) -> None:
        """Open the provider session; when it cannot be opened, the pool's next provider's (see
        fail_over). Raises ProviderUnavailable when none can be."""
        while True:
            try:
                await self.provider.open()
                self._failing.clear(self.provider_id)
                return
            except ProviderUnavailable as exc:
                if not await self._next(str(exc)):
                    raise

    async def fail_over(self, why: str) -> bool:
        """Go on with the pool's next provider, opened, this one marked failing (for SKIP_S). False
        when no other is left (the current one stays)."""
        while await self._next(why):
            try:
                await self.provider.open()
                self._failing.clear(self.provider_id)
                return True
            except ProviderUnavailable as exc:
                why = str(exc)
        return False

    async def _next(self, why: str) -> bool:
        if self._at + 1 >= len(self._accounts):
            return False
        log.warning("provider failing: its batches go to the next of the pool", provider_id=str(self.provider_id),
                    next_provider_id=str(self._accounts[self._at + 1].provider_id), why=why)
        self._failing.mark(self.provider_id)
        await self.provider.close()
        self._use(self._at + 1)
        return True

    async def reopen(self) -> None:
        """A fresh provider session (after the account refused us: a session may remember a refusal
        and fail the rest without asking again). Raises ProviderUnavailable as open() does."""
        await self.provider.close()
        self.provider = self._accounts[self._at].make_provider()
        await self.provider.open()

    def message(self, recipient: Recipient) -> OutgoingMessage:
        variables = recipient.variables()
        if self._templates_link:
            variables["unsubscribe_url"] = self._unsubscribe_link(recipient.contact_id)
        return OutgoingMessage(
            contact_id=recipient.contact_id,
            to=recipient.address,
            idempotency_key=f"{self._key_prefix}{recipient.contact_id}{self._key_suffix}",
            content=self.renderer.render(variables, recipient.locale, tracker=self._tracker),
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
        self._content: dict[tuple[uuid.UUID, int], tuple[Content, Tracking]] = {}
        self._tracking_keys: dict[tuple[uuid.UUID, int, int, str], int] = {}
        self._trackers: dict[tuple[int, int], TrackingLinks] = {}
        self._renderers: dict[tuple[uuid.UUID, int, str, str], ChannelRenderer] = {}
        self._providers: dict[uuid.UUID, tuple[float, accounts.ProviderRow]] = {}
        self.failing = provider_pool.FailingProviders()  # of this process's pools

    async def load(self, con: asyncpg.Connection, job: Job, version: int) -> JobContext:
        """The context for `job` at broadcast `version` (read with the batch, so content is only
        fetched when it changed)."""
        if not job.pool:
            provider = await self._provider(con, job.tenant_id, job.provider_id)
            if provider is None:
                raise LookupError(f"provider {job.provider_id} is gone")
            accounts_ = [await self._account(con, job, version, provider)]
        else:  # a pool: its providers in the order this batch tries them (provider_pool.py)
            rows = {p: row for p in job.pool if (row := await self._provider(con, job.tenant_id, p)) is not None}
            if not rows:
                raise LookupError(f"providers {', '.join(map(str, job.pool))} are gone")
            pool = [p for p in job.pool if p in rows]
            weights = [_weight(rows[p]) for p in pool]
            accounts_ = [await self._account(con, job, version, rows[p])
                         for p in provider_pool.order(job.seq, pool, weights, self.failing.now())]
        signer = await self.keys.signer(con)
        renderer = accounts_[0].renderer
        tracker = None
        if renderer.tracking.any:
            key = await self._tracking_key(con, job, version, renderer)
            tracker = self._trackers.get((signer.kid, key))
            if tracker is None:  # kept across jobs: it holds the functions written for its link sets
                if len(self._trackers) > 1024:
                    self._trackers.clear()
                tracker = self._trackers[(signer.kid, key)] = signer.tracking_links(key, urls=True)
        return JobContext(job, accounts_, signer, self.failing, tracker)

    async def _tracking_key(self, con: asyncpg.Connection, job: Job, version: int, renderer: ChannelRenderer) -> int:
        """The tracking key of the run's content on the job's channel (made, with its links, once)."""
        cache_key = (job.broadcast_id, job.run, version, job.channel)
        key = self._tracking_keys.get(cache_key)
        if key is None:
            if len(self._tracking_keys) > 1024:
                self._tracking_keys.clear()
            key = self._tracking_keys[cache_key] = await tracking_keys.key_for(
                con, job.tenant_id, job.broadcast_id, job.run, version, job.channel, renderer.links)
        return key

    async def _account(
        self, con: asyncpg.Connection, job: Job, version: int, provider: accounts.ProviderRow
    ) -> Account:
        def make_provider() -> Provider:
            return build_provider(provider.kind, provider.config, allow_private_networks=self.allow_private_networks)

        return Account(provider.id, make_provider, provider.max_retries, provider.config.get("on_unknown") or "mark_unknown",
                       windows_of(provider.kind, provider.config), await self._renderer(con, job, version, provider))

    async def _renderer(
        self, con: asyncpg.Connection, job: Job, version: int, provider: accounts.ProviderRow
    ) -> ChannelRenderer:
        from_email = provider.config.get("from_email") or "crier@localhost"
        key = (job.broadcast_id, version, job.channel, from_email)
        renderer = self._renderers.get(key)
        if renderer is None:
            cached = self._content.get((job.broadcast_id, version))
            if cached is None:
                row = await con.fetchrow(
                    "SELECT content, version, template_id, template_version, tracking FROM broadcasts WHERE id = $1",
                    job.broadcast_id)
                if row is None:
                    raise LookupError(f"broadcast {job.broadcast_id} has no view row yet")
                if len(self._content) > 256:
                    self._content.clear()
                cached = self._content[(job.broadcast_id, row["version"])] = (
                    await content_of(con, row), msgspec.convert(row["tracking"] or {}, Tracking))
            content, tracks = cached
            if len(self._renderers) > 256:
                self._renderers.clear()
            renderer = self._renderers[key] = ChannelRenderer(
                content, job.channel, from_email=content.from_email or from_email,
                tracking=LinkTracking(opens=tracks.opens, clicks=tracks.clicks, text_links=tracks.text_links))
        return renderer

    async def _provider(self, con: asyncpg.Connection, tenant_id: uuid.UUID, provider_id: uuid.UUID
                        ) -> accounts.ProviderRow | None:
        cached = self._providers.get(provider_id)
        if cached and time.monotonic() - cached[0] < PROVIDER_TTL_S:
            return cached[1]
        row = await accounts.get(con, tenant_id, provider_id)
        if row is not None:
            self._providers[provider_id] = (time.monotonic(), row)
        return row


def _weight(row: accounts.ProviderRow) -> int:
    weight = row.config.get("weight")
    return weight if isinstance(weight, int) and 1 <= weight <= MAX_PROVIDER_WEIGHT else 1
