"""The provider Protocol every channel implements, and the messages and results it exchanges."""
from __future__ import annotations

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


# What a message says, rendered for its channel: one struct per channel as channels come.
Content = EmailContent


class OutgoingMessage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One message to one recipient on a channel: the envelope every provider reads, and the
    channel's content."""

    contact_id: int
    to: str  # the recipient's address on the channel (chosen by the channel registry)
    idempotency_key: str  # "broadcast:run:contact:channel": stable across retries
    content: Content


class SendResult(msgspec.Struct, frozen=True, kw_only=True):
    contact_id: int
    ok: bool
    error: str | None = None
    retryable: bool = False  # a transient failure (SMTP 4xx, connection drop): worth retrying
    provider_message_id: str | None = None


class ProviderUnavailable(Exception):
    """`open()` could not start a session (server down, TLS or login refused): nothing was sent.

    `retryable` is False when retrying cannot help without a change of settings (bad credentials,
    TLS verification failure, STARTTLS not offered)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Provider(Protocol):
    # True if resending a message with the same idempotency_key can never reach the recipient twice
    # (the provider dedupes by key, or has no side effects like null).
    dedupes: bool

    async def open(self) -> None:
        """Start a session for one job (SMTP: connect and log in once, reused for the whole job).

        Raises ProviderUnavailable when no session can be started."""
        ...

    async def send(self, messages: list[OutgoingMessage]) -> list[SendResult]:
        """One result per message, in the same order; never raises for a per-recipient failure."""
        ...

    async def close(self) -> None:
        """End the session; never raises."""
        ...
