"""The registry: the channels Crier sends on, with where each finds a contact's address, and the
provider kinds that send on them. Adding a channel is a provider module and a line here."""
from __future__ import annotations

from typing import Any

from shared.channels.fcm import FcmProvider
from shared.channels.null import NullProvider
from shared.channels.provider import Provider
from shared.channels.smtp import SmtpProvider
from shared.channels.telegram_bot import TelegramBotProvider
from shared.channels.twilio import TwilioProvider
from shared.channels.webhook import WebhookProvider
from shared.channels.whatsapp_cloud import WhatsappCloudProvider

# SQL over a contact row `c`: its address on the channel, NULL when it has none (it is then not
# part of that channel's audience). The one place that decides a recipient's address.
ADDRESS_SQL: dict[str, str] = {
    "email": "c.email",
    "sms": "c.phone",  # E.164
    "whatsapp": "coalesce(c.whatsapp, c.phone)",  # E.164: a WhatsApp number of its own, else the phone
    "telegram": "c.telegram_chat_id",
    "push": "c.push_tokens[1]",  # the most recent device token
    # A webhook goes to the tenant's own URL (the provider's), once per contact: every contact has it.
    "webhook": "c.id::text",
}

KINDS: dict[str, Any] = {
    "smtp": SmtpProvider, "twilio": TwilioProvider, "whatsapp_cloud": WhatsappCloudProvider,
    "telegram_bot": TelegramBotProvider, "fcm": FcmProvider, "webhook": WebhookProvider, "null": NullProvider,
}


def address_sql(channel: str) -> str:
    try:
        return ADDRESS_SQL[channel]
    except KeyError:
        raise ValueError(f"unknown channel {channel!r}; known: {', '.join(sorted(ADDRESS_SQL))}") from None


def build_provider(kind: str, config: dict[str, Any], *, allow_private_networks: bool = False) -> Provider:
    """A fresh, unopened provider: build one per job, it holds that job's connection.

    `allow_private_networks` (the operator's CRIER_ALLOW_PRIVATE_NETWORKS): whether the provider
    may connect to hosts that are not on the public internet (shared/platform/netguard.py)."""
    try:
        cls = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown provider kind {kind!r}; known: {', '.join(sorted(KINDS))}") from None
    return cls(config, allow_private_networks=allow_private_networks)
