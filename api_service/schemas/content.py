"""A message's content in the API (templates and broadcasts): shared.kernel.content.Content field by
field, with the limits of shared/kernel/limits.py as JSON Schema constraints.

The schema checks each field's size and characters; shared.content.checks checks the rest on save
(Liquid, locale keys, URLs, addresses, the webhook payload, the whole content's size) and names the
field the same way (`content.sms.body`).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from api_service.schemas.common import Input, text
from shared.kernel import limits as lim
from shared.kernel.content import (
    Content,
    PushPart,
    SmsPart,
    TelegramPart,
    WebhookPart,
    WhatsappPart,
)

_CONTENT_NOTE = f"all fields together: at most {lim.MAX_CONTENT_BYTES:,} bytes as JSON"
_LOCALE_KEYS = {"pattern": lim.LOCALE_PATTERN, "maxLength": lim.MAX_LOCALE_CHARS}


def i18n(value: Any, what: str = "the field") -> Any:
    """`<field>_i18n`: per-locale variants of a field, chosen by the recipient's locale (`de-AT`,
    then `de`, then the field itself). The key pattern is documented here and checked on save
    (shared.content.checks), where a 422 can name the key."""
    return Annotated[dict[str, value], Meta(
        max_length=lim.MAX_I18N_VARIANTS, extra_json_schema={"propertyNames": _LOCALE_KEYS},
        description=f"{what} per locale (BCP 47 tags such as `de`, `pt-BR`), at most {lim.MAX_I18N_VARIANTS}",
    )]


# No string may hold U+0000 (Postgres cannot store it); header values not a CR or LF either.
Subject = text(lim.MAX_SUBJECT_CHARS, one_line=True, description="Liquid; email only when set")
Html = text(lim.MAX_HTML_CHARS, description=f"Liquid HTML, repaired on save ({_CONTENT_NOTE})")
Text = text(lim.MAX_TEXT_CHARS, description=f"Liquid plain text; derived from the HTML when empty ({_CONTENT_NOTE})")
ContentAddress = text(lim.MAX_ADDRESS_CHARS, one_line=True, description="an address, or `Name <address>`")
FromName = text(lim.MAX_FROM_NAME_CHARS, one_line=True, description="the sender's display name (as written: no Liquid)")
Preheader = text(lim.MAX_PREHEADER_CHARS, description="Liquid: the preview text an inbox shows after the subject")
Label = text(lim.MAX_LABEL_CHARS, description="Liquid: a button's label (shown when the URL is set too)")
Url = text(lim.MAX_URL_CHARS, one_line=True, description="an http(s) URL (Liquid inside), or Liquid starting with `{{`")
SmsText = text(lim.MAX_SMS_CHARS, min_length=1, description="Liquid")
TelegramText = text(lim.MAX_TELEGRAM_CHARS, min_length=1, description="Liquid in MarkdownV2 (inserted values escaped)")
PushTitle = text(lim.MAX_PUSH_TITLE_CHARS, min_length=1, description="Liquid")
PushBody = text(lim.MAX_PUSH_BODY_CHARS, description="Liquid")
WhatsappLanguage = Annotated[str, Meta(
    max_length=lim.MAX_WHATSAPP_LANGUAGE_CHARS, pattern=lim.WHATSAPP_LANGUAGE_PATTERN,
    description="the approved translation's language code (`en`, `en_US`, `pt_BR`)",
)]


class SmsIn(Input, kw_only=True):
    body: SmsText
    body_i18n: i18n(SmsText, "the body") = {}  # type: ignore[valid-type]


class TelegramIn(Input, kw_only=True):
    text: TelegramText
    text_i18n: i18n(TelegramText, "the text") = {}  # type: ignore[valid-type]
    media_url: Url | None = None
    media_type: Annotated[Literal["photo", "video"] | None, Meta(description="required with media_url")] = None
    action_label: Label = ""
    action_label_i18n: i18n(Label, "the label") = {}  # type: ignore[valid-type]
    action_url: Url = ""


class WhatsappIn(Input, kw_only=True):
    template_name: Annotated[str, Meta(
        pattern=lim.WHATSAPP_TEMPLATE_PATTERN, description="a template approved in the WhatsApp Business account",
    )]
    language: WhatsappLanguage = "en"
    language_i18n: i18n(WhatsappLanguage, "the language code") = {}  # type: ignore[valid-type]
    parameters: Annotated[dict[str, text(lim.MAX_WHATSAPP_PARAMETER_CHARS)], Meta(
        max_length=lim.MAX_WHATSAPP_PARAMETERS,
        extra_json_schema={"propertyNames": {"pattern": lim.WHATSAPP_PARAMETER_PATTERN}},
        description="the template's parameters by name (`1`, `2`, ... for positional ones), each Liquid",
    )] = {}


class PushIn(Input, kw_only=True):
    title: PushTitle
    title_i18n: i18n(PushTitle, "the title") = {}  # type: ignore[valid-type]
    body: PushBody = ""
    body_i18n: i18n(PushBody, "the body") = {}  # type: ignore[valid-type]
    image_url: Url | None = None
    url: Annotated[Url | None, Meta(description="opened on tap")] = None
    data: Annotated[dict[str, PushBody], Meta(
        max_length=lim.MAX_PUSH_DATA_KEYS,
        extra_json_schema={"propertyNames": {"minLength": 1, "maxLength": lim.MAX_PUSH_DATA_KEY_CHARS}},
        description="key-value data for the app, values Liquid",
    )] = {}


class WebhookIn(Input, kw_only=True):
    payload: Annotated[Any, Meta(description=(
        f"the JSON document POSTed, each string in it Liquid: at most {lim.MAX_WEBHOOK_PAYLOAD_BYTES:,} bytes "
        f"as JSON and {lim.MAX_WEBHOOK_DEPTH} levels deep"
    ))]


class ContentIn(Input, kw_only=True):
    """What a message says: email's fields (email is sent when `subject` is set), then a section per
    other channel. Each text field is Liquid; a `_i18n` field holds its per-locale variants."""

    subject: Subject = ""
    html: Html = ""
    text: Text = ""
    from_email: ContentAddress | None = None
    reply_to: ContentAddress | None = None
    from_name: FromName | None = None
    preheader: Preheader = ""
    action_label: Label = ""
    action_url: Url = ""
    subject_i18n: i18n(Subject, "the subject") = {}  # type: ignore[valid-type]
    html_i18n: i18n(Html, "the HTML") = {}  # type: ignore[valid-type]
    text_i18n: i18n(Text, "the text") = {}  # type: ignore[valid-type]
    preheader_i18n: i18n(Preheader, "the preheader") = {}  # type: ignore[valid-type]
    action_label_i18n: i18n(Label, "the label") = {}  # type: ignore[valid-type]
    sms: SmsIn | None = None
    telegram: TelegramIn | None = None
    whatsapp: WhatsappIn | None = None
    push: PushIn | None = None
    webhook: WebhookIn | None = None


class ContentPatch(Input, kw_only=True):
    """RFC 7396-like: a field given replaces the stored one (a `_i18n` field as a whole), a section
    given replaces the stored section, `null` removes an optional field or a section."""

    subject: Subject | UnsetType = UNSET
    html: Html | UnsetType = UNSET
    text: Text | UnsetType = UNSET
    from_email: ContentAddress | None | UnsetType = UNSET
    reply_to: ContentAddress | None | UnsetType = UNSET
    from_name: FromName | None | UnsetType = UNSET
    preheader: Preheader | UnsetType = UNSET
    action_label: Label | UnsetType = UNSET
    action_url: Url | UnsetType = UNSET
    subject_i18n: i18n(Subject, "the subject") | UnsetType = UNSET  # type: ignore[valid-type]
    html_i18n: i18n(Html, "the HTML") | UnsetType = UNSET  # type: ignore[valid-type]
    text_i18n: i18n(Text, "the text") | UnsetType = UNSET  # type: ignore[valid-type]
    preheader_i18n: i18n(Preheader, "the preheader") | UnsetType = UNSET  # type: ignore[valid-type]
    action_label_i18n: i18n(Label, "the label") | UnsetType = UNSET  # type: ignore[valid-type]
    sms: SmsIn | None | UnsetType = UNSET
    telegram: TelegramIn | None | UnsetType = UNSET
    whatsapp: WhatsappIn | None | UnsetType = UNSET
    push: PushIn | None | UnsetType = UNSET
    webhook: WebhookIn | None | UnsetType = UNSET


class ContentOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The content as stored (HTML repaired); a field at its default is left out, as in ContentIn.
    The sections are the kernel's own structs: what is stored is exactly what is shown."""

    subject: str = ""
    html: str = ""
    text: str = ""
    from_email: str | None = None
    reply_to: str | None = None
    from_name: str | None = None
    preheader: str = ""
    action_label: str = ""
    action_url: str = ""
    subject_i18n: dict[str, str] = {}
    html_i18n: dict[str, str] = {}
    text_i18n: dict[str, str] = {}
    preheader_i18n: dict[str, str] = {}
    action_label_i18n: dict[str, str] = {}
    sms: SmsPart | None = None
    telegram: TelegramPart | None = None
    whatsapp: WhatsappPart | None = None
    push: PushPart | None = None
    webhook: WebhookPart | None = None


def to_content(data: ContentIn) -> Content:
    return msgspec.convert(msgspec.to_builtins(data), Content)


def content_out(content: Content) -> ContentOut:
    return msgspec.convert(msgspec.to_builtins(content), ContentOut)


def merge_content(current: Content, patch: ContentPatch) -> Content:
    """`patch` applied to `current` (see ContentPatch); to_builtins leaves the UNSET fields out."""
    return msgspec.convert({**msgspec.to_builtins(current), **msgspec.to_builtins(patch)}, Content)
