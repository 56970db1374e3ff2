"""What a message says on each channel, as a broadcast or a template stores it (Liquid sources,
rendered per recipient by shared/content).

Email is the content's own top-level fields (the shape broadcasts had before there were other
channels, so stored events read as they always did); every other channel is a section of its
own. Any text field `f` may have per-locale variants `f_i18n: {"de": ..., "pt-BR": ...}`, chosen by
the recipient's locale with fallback (`de-AT` -> `de` -> `f`).
"""
from __future__ import annotations

from typing import Any, Literal

import msgspec

# The channels Crier sends on, in the order a broadcast lists them by default.
CHANNELS = ("email", "sms", "whatsapp", "telegram", "push", "webhook")
# How a multi-channel broadcast picks a recipient's channels: every listed one the contact has an
# address for, or only the first of them.
CHANNEL_POLICIES = ("all", "first_available")

I18n = dict[str, str]


class _Part(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    pass


class SmsPart(_Part):
    body: str  # the seeds' `body_short`
    body_i18n: I18n = {}


class TelegramPart(_Part):
    text: str  # MarkdownV2; values inserted by Liquid are escaped
    text_i18n: I18n = {}
    media_url: str | None = None
    media_type: Literal["photo", "video"] | None = None
    action_label: str = ""  # an inline keyboard button, when both are set
    action_label_i18n: I18n = {}
    action_url: str = ""


class WhatsappPart(_Part):
    template_name: str  # a template approved in the WhatsApp Business account
    language: str = "en"
    language_i18n: I18n = {}  # the approved translation to use per recipient locale
    # The template's parameters, by name ("1", "2", ... for positional ones), each a Liquid expression
    # source such as "{{ first_name }}".
    parameters: dict[str, str] = {}


class PushPart(_Part):
    title: str
    title_i18n: I18n = {}
    body: str = ""
    body_i18n: I18n = {}
    image_url: str | None = None
    url: str | None = None  # opened on tap
    data: dict[str, str] = {}  # key-value data for the app, values Liquid


class WebhookPart(_Part):
    # A JSON document whose strings are Liquid templates, rendered per recipient and POSTed.
    payload: Any


class Content(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Email's fields, then a section per other channel (None: the content has nothing for it)."""

    subject: str = ""
    html: str = ""
    text: str = ""  # derived from the HTML at send time when empty
    from_email: str | None = None
    reply_to: str | None = None
    from_name: str | None = None
    preheader: str = ""  # the hidden preview text after the subject in an inbox
    action_label: str = ""  # a button under the body, when both are set
    action_url: str = ""
    subject_i18n: I18n = {}
    html_i18n: I18n = {}
    text_i18n: I18n = {}
    preheader_i18n: I18n = {}
    action_label_i18n: I18n = {}
    sms: SmsPart | None = None
    telegram: TelegramPart | None = None
    whatsapp: WhatsappPart | None = None
    push: PushPart | None = None
    webhook: WebhookPart | None = None

    def has(self, channel: str) -> bool:
        """Whether this content says something on `channel`."""
        if channel == "email":
            return bool(self.subject)
        return getattr(self, channel, None) is not None


def missing_channels(content: Content, channels: tuple[str, ...]) -> list[str]:
    """The channels of `channels` the content has nothing for."""
    return [c for c in channels if not content.has(c)]
