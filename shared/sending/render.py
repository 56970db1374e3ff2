"""A content compiled for one channel, per locale variant, and rendered per recipient into what
the channel's provider sends (shared/channels/provider.py).

Compiled once per content version and channel (a worker caches it across jobs); a locale variant
is compiled the first time a recipient needs it. Email's HTML is prepared once per variant, not
per recipient: the button added, CSS inlined, the document wrapped around it with the preheader,
and a missing text part derived from it; what is left per recipient is the Liquid render.
"""
from __future__ import annotations

import html as html_module
from collections.abc import Callable, Mapping
from email.utils import formataddr
from typing import Any

import msgspec

from shared.channels.provider import (
    Content as Rendered,
)
from shared.channels.provider import (
    EmailContent,
    PushContent,
    SmsContent,
    TelegramContent,
    WebhookContent,
    WhatsappContent,
)
from shared.content.html import html_to_text, inline_css, wrap_document
from shared.content.locales import choose_locale
from shared.content.templates import Budget, CompiledContent, Template, compile_template
from shared.kernel.content import Content

# Fields of each channel that may have `_i18n` variants (the others are the same in every locale).
_LOCALIZED: dict[str, tuple[str, ...]] = {
    "email": ("subject", "html", "text", "preheader", "action_label"),
    "sms": ("body",),
    "telegram": ("text", "action_label"),
    "whatsapp": ("language",),
    "push": ("title", "body"),
    "webhook": (),
}


def _part(content: Content, channel: str) -> Any:
    return content if channel == "email" else getattr(content, channel)


def locales_of(content: Content, channel: str) -> tuple[str, ...]:
    """The locale variants the content has on `channel` (any field's), sorted."""
    part = _part(content, channel)
    if part is None:
        return ()
    keys: set[str] = set()
    for field in _LOCALIZED[channel]:
        keys.update(getattr(part, f"{field}_i18n"))
    return tuple(sorted(keys))


def _in(part: Any, field: str, locale: str | None) -> Any:
    """`field` of `part` in `locale`'s variant, falling back to the default."""
    value = getattr(part, field)
    if locale is not None and field in _LOCALIZED_FIELDS:
        return getattr(part, f"{field}_i18n").get(locale, value)
    return value


_LOCALIZED_FIELDS = frozenset(f for fields in _LOCALIZED.values() for f in fields)


def button_html(label: str, url: str) -> str:
    """A call-to-action link styled as a button (a table cell: the one layout every mail client
    renders). `label` and `url` are Liquid sources: their literal text is escaped here, the values
    they insert are escaped by the render."""
    label, url = html_module.escape(label, quote=False), url.replace('"', "&quot;")
    return ('<table role="presentation" border="0" cellpadding="0" cellspacing="0" style="margin:24px 0">'
            '<tr><td style="border-radius:6px;background:#1a73e8">'
            f'<a href="{url}" target="_blank" style="display:inline-block;padding:12px 24px;color:#ffffff;'
            f'text-decoration:none;font-weight:bold">{label}</a></td></tr></table>')


def _with_button(html: str, label: str, url: str) -> str:
    if not (label and url):
        return html
    button = button_html(label, url)
    at = html.lower().rfind("</body>")
    return html[:at] + button + html[at:] if at >= 0 else html + button


def email_html(content: Content, locale: str | None) -> str:
    """The HTML as sent (before the per-recipient render): the stored HTML with its button, CSS
    inlined, wrapped in a document with the preheader. Empty for a text-only email."""
    body = _in(content, "html", locale)
    if not body:
        return ""
    body = _with_button(body, _in(content, "action_label", locale), content.action_url)
    return wrap_document(inline_css(body), preheader=_in(content, "preheader", locale), lang=locale,
                         title=_in(content, "subject", locale))


def email_text(content: Content, locale: str | None) -> str:
    """The text part: the stored one, else derived from the HTML (with its button as `label (url)`)."""
    text = _in(content, "text", locale)
    if text or not content.html:
        return text
    body = _with_button(_in(content, "html", locale), _in(content, "action_label", locale), content.action_url)
    return html_to_text(body)


class _Email:
    def __init__(self, content: Content, locale: str | None, from_email: str) -> None:
        self.compiled = CompiledContent.compile(_in(content, "subject", locale), email_html(content, locale),
                                                email_text(content, locale))
        self.from_email = formataddr((content.from_name, from_email)) if content.from_name else from_email
        self.reply_to = content.reply_to

    def render(self, variables: Mapping[str, Any], budget: Budget | None) -> Rendered:
        subject, html, text = self.compiled.render(variables, budget)
        return EmailContent(subject=subject, html=html, text=text, from_email=self.from_email, reply_to=self.reply_to)


def _plain(source: str | None, field: str) -> Template | None:
    return compile_template(source, html=False, field=field) if source else None


def _out(template: Template | None, variables: Mapping[str, Any], budget: Budget) -> str | None:
    return template.render(variables, budget) if template is not None else None


class _Sms:
    def __init__(self, content: Content, locale: str | None, from_email: str) -> None:
        assert content.sms is not None
        self.body = compile_template(_in(content.sms, "body", locale), html=False, field="content.sms.body")

    def render(self, variables: Mapping[str, Any], budget: Budget | None) -> Rendered:
        return SmsContent(body=self.body.render(variables, budget or Budget()))


class _Telegram:
    def __init__(self, content: Content, locale: str | None, from_email: str) -> None:
        part = content.telegram
        assert part is not None
        self.text = compile_template(_in(part, "text", locale), html=False, markdown=True,
                                     field="content.telegram.text")
        self.media_url = _plain(part.media_url, "content.telegram.media_url")
        self.media_type = part.media_type
        label = _in(part, "action_label", locale)
        self.label = _plain(label if part.action_url else None, "content.telegram.action_label")
        self.url = _plain(part.action_url if label else None, "content.telegram.action_url")

    def render(self, variables: Mapping[str, Any], budget: Budget | None) -> Rendered:
        budget = budget or Budget()
        return TelegramContent(text=self.text.render(variables, budget),
                               media_url=_out(self.media_url, variables, budget), media_type=self.media_type,
                               button_label=_out(self.label, variables, budget),
                               button_url=_out(self.url, variables, budget))


class _Whatsapp:
    def __init__(self, content: Content, locale: str | None, from_email: str) -> None:
        part = content.whatsapp
        assert part is not None
        self.template_name, self.language = part.template_name, _in(part, "language", locale)
        self.parameters = {name: compile_template(source, html=False, field=f"content.whatsapp.parameters.{name}")
                           for name, source in part.parameters.items()}

    def render(self, variables: Mapping[str, Any], budget: Budget | None) -> Rendered:
        budget = budget or Budget()
        return WhatsappContent(template_name=self.template_name, language=self.language,
                               parameters={n: t.render(variables, budget) for n, t in self.parameters.items()})


class _Push:
    def __init__(self, content: Content, locale: str | None, from_email: str) -> None:
        part = content.push
        assert part is not None
        self.title = compile_template(_in(part, "title", locale), html=False, field="content.push.title")
        self.body = compile_template(_in(part, "body", locale), html=False, field="content.push.body")
        self.image_url = _plain(part.image_url, "content.push.image_url")
        self.url = _plain(part.url, "content.push.url")
        self.data = {k: compile_template(v, html=False, field=f"content.push.data.{k}") for k, v in part.data.items()}

    def render(self, variables: Mapping[str, Any], budget: Budget | None) -> Rendered:
        budget = budget or Budget()
        return PushContent(title=self.title.render(variables, budget), body=self.body.render(variables, budget),
                           image_url=_out(self.image_url, variables, budget), url=_out(self.url, variables, budget),
                           data={k: t.render(variables, budget) for k, t in self.data.items()})


def _compile_json(value: Any, field: str) -> Callable[[Mapping[str, Any], Budget], Any]:
    """A JSON document whose strings are Liquid: a function rendering it (numbers, booleans and
    nulls as they are; keys as they are)."""
    if isinstance(value, str):
        template = compile_template(value, html=False, field=field)
        return template.render
    if isinstance(value, list):
        items = [_compile_json(v, f"{field}[{i}]") for i, v in enumerate(value)]
        return lambda variables, budget: [item(variables, budget) for item in items]
    if isinstance(value, dict):
        members = {k: _compile_json(v, f"{field}.{k}") for k, v in value.items()}
        return lambda variables, budget: {k: m(variables, budget) for k, m in members.items()}
    return lambda variables, budget: value


class _Webhook:
    def __init__(self, content: Content, locale: str | None, from_email: str) -> None:
        assert content.webhook is not None
        self.payload = _compile_json(content.webhook.payload, "content.webhook.payload")

    def render(self, variables: Mapping[str, Any], budget: Budget | None) -> Rendered:
        return WebhookContent(payload=self.payload(variables, budget or Budget()))


_KINDS = {"email": _Email, "sms": _Sms, "telegram": _Telegram, "whatsapp": _Whatsapp, "push": _Push,
          "webhook": _Webhook}


class ChannelRenderer:
    """`content` on `channel`: each recipient gets the variant of its locale (`de-AT` -> `de` -> the
    default), compiled the first time one needs it. Raises TemplateError (compiling or rendering)
    naming the field; KeyError-free for a content without that channel only if `has(channel)`."""

    def __init__(self, content: Content, channel: str, *, from_email: str = "crier@localhost") -> None:
        if not content.has(channel):
            raise ValueError(f"the content has nothing for {channel}")
        self.content, self.channel, self.from_email = content, channel, from_email
        self.locales = locales_of(content, channel)
        self._kind = _KINDS[channel]
        self._variants: dict[str | None, Any] = {None: self._kind(content, None, from_email)}
        self._chosen: dict[str | None, str | None] = {}
        self.uses_unsubscribe_url = "unsubscribe_url" in _sources(content, channel)

    def locale_for(self, locale: str | None) -> str | None:
        """The variant a recipient with `locale` gets (None: the default)."""
        try:
            return self._chosen[locale]
        except KeyError:
            if len(self._chosen) > 1000:  # locales are a short list in practice; bound the cache anyway
                self._chosen.clear()
            chosen = self._chosen[locale] = choose_locale(locale, self.locales) if self.locales else None
            return chosen

    def render(self, variables: Mapping[str, Any], locale: str | None, budget: Budget | None = None) -> Rendered:
        """The message for a recipient whose locale is `locale` (budget: see CompiledContent.render)."""
        key = self.locale_for(locale) if self.locales else None
        variant = self._variants.get(key)
        if variant is None:
            variant = self._variants[key] = self._kind(self.content, key, self.from_email)
        return variant.render(variables, budget)

    def check(self) -> None:
        """Compile every variant now (raises TemplateError): a save-time check."""
        for key in self.locales:
            if key not in self._variants:
                self._variants[key] = self._kind(self.content, key, self.from_email)


def _sources(content: Content, channel: str) -> str:
    """Every Liquid source the channel renders, joined (to find the variables it names)."""
    part = _part(content, channel)
    if channel == "email":
        fields = {f: getattr(content, f) for f in ("subject", "html", "text", "preheader", "action_label",
                                                    "action_url")}
        fields.update({f"{f}_i18n": getattr(content, f"{f}_i18n") for f in _LOCALIZED["email"]})
        return msgspec.json.encode(fields).decode()
    return msgspec.json.encode(part).decode()
