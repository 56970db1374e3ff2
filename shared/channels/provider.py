"""The provider Protocol every channel implements, and the messages and results it exchanges."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec


class EmailContent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A rendered email."""

    subject: str
    html: str
    text: str
    from_email: str
    reply_to: str | None = None
    headers: dict[str, str] = {}


class SmsContent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A rendered SMS (or RCS) text."""

    body: str


class TelegramContent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A rendered Telegram message: MarkdownV2 text (a caption with media), an optional photo or
    video by URL, an optional inline keyboard button."""

    text: str
    media_url: str | None = None
    media_type: str | None = None  # photo | video
    button_label: str | None = None
    button_url: str | None = None


class WhatsappContent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A WhatsApp template message: the approved template, its language, its parameters' values."""

    template_name: str
    language: str
    parameters: dict[str, str] = {}


class PushContent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    title: str
    body: str
    image_url: str | None = None
    url: str | None = None
    data: dict[str, str] = {}


class WebhookContent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    payload: object  # the rendered JSON document


# What a message says, rendered for its channel.
Content = EmailContent | SmsContent | TelegramContent | WhatsappContent | PushContent | WebhookContent


class OutgoingMessage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One message to one recipient on a channel: the envelope every provider reads, and the
    channel's content."""

    contact_id: int
    to: str  # the recipient's address on the channel (chosen by the channel registry)
    idempotency_key: str  # "broadcast:run:contact:channel": stable across retries
    content: Content
    # Makes the recipient's signed one-click unsubscribe link from `contact_id` (about 1 µs): a
    # provider that builds headers sends it as List-Unsubscribe and List-Unsubscribe-Post (RFC 2369,
    # RFC 8058; Gmail and Yahoo require them of bulk mail). Shared by a job's messages; called only
    # by providers that use it (the null provider builds no message).
    unsubscribe_link: Callable[[int], str] | None = None


# Failure classes: what a test send tells the tenant, instead of the remote server's own words (a
# banner or an error text could turn a test send into a probe of whatever answers at the host).
# `error` keeps the details for the ledger and the logs.
UNREACHABLE = "unreachable"  # no connection (refused, no route, the name does not resolve)
TIMEOUT = "timeout"
TLS_FAILED = "tls_failed"  # the handshake or the certificate check failed
TLS_UNAVAILABLE = "tls_unavailable"  # STARTTLS required but not offered: nothing is sent in clear
AUTH_FAILED = "auth_failed"
REJECTED = "rejected"  # the server refused the session or the message
DEFERRED = "deferred"  # the server refused for now (SMTP 4xx)
CONNECTION_LOST = "connection_lost"
OUTCOME_UNKNOWN = "outcome_unknown"  # lost while the server had the message: not resent
WITHDRAWN = "withdrawn"  # the sender's commit said no before the message was handed over: not sent
SUPPRESSED = "suppressed"  # the address or contact was suppressed (unsubscribed ...) before its batch: not sent
INVALID_MESSAGE = "invalid_message"  # the address or the message could not be sent as given
# The address will never take a message from us (an invalid number, a STOP, a bot blocked by the
# user, an unregistered device token): failed for good, not retried, and the address suppressed
# (a push token removed from its contact) so no later broadcast tries it again.
ADDRESS_DEAD = "address_dead"
REFUSED_PRIVATE_ADDRESS = "refused_private_address"  # the host is not on the public internet


# Failures of the provider account rather than of a message (a refused login, a revoked token, an
# endpoint gone): counted by the breaker (shared/channels/breaker.py), which pauses the broadcast.
PROVIDER_FAILURES = frozenset({AUTH_FAILED})


class SendResult(msgspec.Struct, frozen=True, kw_only=True):
    contact_id: int
    ok: bool
    error: str | None = None
    retryable: bool = False  # a transient failure (SMTP 4xx, connection drop): worth retrying
    provider_message_id: str | None = None
    failure: str | None = None  # the failure class of a failed result (see above)


class ProviderUnavailable(Exception):
    """`open()` could not start a session (server down, TLS or login refused): nothing was sent.

    `retryable` is False when retrying cannot help without a change of settings (bad credentials,
    TLS verification failure, STARTTLS not offered, a host that is not public). `failure` is the
    failure class, the only part a tenant's test send is told."""

    def __init__(self, message: str, *, retryable: bool = True, failure: str = UNREACHABLE) -> None:
        super().__init__(message)
        self.retryable, self.failure = retryable, failure


# Called by a provider with a message at the last moment it can still be withdrawn unsent (SMTP:
# the whole message written, its final "." not yet; HTTP: the request about to go out). The worker
# records there that the message is in flight, so a crash leaves ambiguous only the messages that
# were past that point. False withdraws the message (another attempt holds it, or the run was
# called off); an exception withdraws it too and propagates.
Commit = Callable[[OutgoingMessage], Awaitable[bool]]


class CommitFailed(Exception):
    """The commit raised (Postgres went away, say): the message was withdrawn unsent, and `send`
    gives up at once with this error, its cause attached."""


class Provider(Protocol):
    # True if resending a message with the same idempotency_key can never reach the recipient twice
    # (the provider dedupes by key, or has no side effects like null).
    dedupes: bool

    async def open(self) -> None:
        """Start a session for one job (SMTP: connect and log in once, reused for the whole job).

        Raises ProviderUnavailable when no session can be started."""
        ...

    async def send(self, messages: list[OutgoingMessage], commit: Commit | None = None) -> list[SendResult]:
        """One result per message, in the same order; never raises for a per-recipient failure.

        With `commit`, each message is handed over only once `commit(message)` said yes (see
        Commit); a withdrawn one's result has failure WITHDRAWN, and a commit that raised ends the
        call with CommitFailed. A provider may call it again for the same message (a retry after a
        transient failure), and not at all for a message refused before that point."""
        ...

    async def close(self) -> None:
        """End the session; never raises."""
        ...
