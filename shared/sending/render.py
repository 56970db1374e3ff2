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
from typing import Any, Protocol

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
from shared.tracking.links import (
    LINK_VARIABLE,
    OPEN_VARIABLE,
    UNTRACKED_PIXEL,
    LinkTable,
    track_html,
    track_text,
    with_pixel,
)

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


class LinkTracking:
    """What a channel renderer tracks (shared/tracking/links.py), and (in the renderer's own copy)
    the links of its fields, numbered in `links` as its variants compile (all at once and in order
    when anything is tracked, so every process numbers them alike)."""

    def __init__(self, *, opens: bool = False, clicks: bool = False, text_links: bool = False) -> None:
        self.opens, self.clicks, self.text_links = opens, clicks, text_links
        self.any = opens or clicks  # read per message: an attribute, not a property
        self.links = LinkTable()

    def html(self, source: str) -> str:
        return track_html(source, self.links) if self.clicks else source

    def text(self, source: str) -> str:
        return track_text(source, self.links) if self.clicks and self.text_links else source

    def url(self, source: str | None) -> str | None:
        """A field that is a link (a button's, a push's tap target): its variable if trackable."""
        if source is None or not (self.clicks and self.text_links):
            return source
        number = self.links.number(source)
        return source if number is None else "{{ " + LINK_VARIABLE.format(number) + " }}"


class _Email:
    def __init__(self, content: Content, locale: str | None, from_email: str, tracking: LinkTracking) -> None:
        html = email_html(content, locale)
        if html:
            html = tracking.html(html)
            html = with_pixel(html) if tracking.opens else html
        self.compiled = CompiledContent.compile(_in(content, "subject", locale), html,
                                                tracking.text(email_text(content, locale)))
        self.from_email = formataddr((content.from_name, from_email)) if content.from_name else from_email
        self.reply_to = content.reply_to

    def render(self, variables: Mapping[str, Any], budget: Budget | None) -> Rendered:
        subject, html, text = self.compiled.render(variables, budget)
        return EmailContent(subject=subject, html=html, text=text, from_email=self.from_email, reply_to=self.reply_to)

    def render_given(self, variables: dict[str, Any], names: tuple[str, ...], urls: tuple[str, ...],
                     budget: Budget | None) -> Rendered:
        """render() with the tracked URLs (nothing in them to escape) as the variables `names`."""
        subject, html, text = self.compiled.render_given(variables, names, urls, budget)
        return EmailContent(subject=subject, html=html, text=text, from_email=self.from_email, reply_to=self.reply_to)


def _plain(source: str | None, field: str) -> Template | None:
    return compile_template(source, html=False, field=field) if source else None


def _out(template: Template | None, variables: Mapping[str, Any], budget: Budget) -> str | None:
    return template.render(variables, budget) if template is not None else None


class _Sms:
    def __init__(self, content: Content, locale: str | None, from_email: str, tracking: LinkTracking) -> None:
        assert content.sms is not None
        self.body = compile_template(tracking.text(_in(content.sms, "body", locale)), html=False,
                                     field="content.sms.body")

    def render(self, variables: Mapping[str, Any], budget: Budget | None) -> Rendered:
        return SmsContent(body=self.body.render(variables, budget or Budget()))


class _Telegram:
    def __init__(self, content: Content, locale: str | None, from_email: str, tracking: LinkTracking) -> None:
        part = content.telegram
        assert part is not None
        # The seeds' {click} macro and {{ click_url }}: the button's link, tracked like it.
        click = tracking.url(part.action_url) or ""
        text = _in(part, "text", locale).replace("{click}", "{{ click_url }}").replace("{{ click_url }}", click)
        self.text = compile_template(tracking.text(text), html=False, markdown=True, field="content.telegram.text")
        self.media_url = _plain(part.media_url, "content.telegram.media_url")
        self.media_type = part.media_type
        label = _in(part, "action_label", locale)
        self.label = _plain(label if part.action_url else None, "content.telegram.action_label")
        self.url = _plain(tracking.url(part.action_url) if label else None, "content.telegram.action_url")

    def render(self, variables: Mapping[str, Any], budget: Budget | None) -> Rendered:
        budget = budget or Budget()
        return TelegramContent(text=self.text.render(variables, budget),
                               media_url=_out(self.media_url, variables, budget), media_type=self.media_type,
                               button_label=_out(self.label, variables, budget),
                               button_url=_out(self.url, variables, budget))


class _Whatsapp:
    def __init__(self, content: Content, locale: str | None, from_email: str, tracking: LinkTracking) -> None:
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
    def __init__(self, content: Content, locale: str | None, from_email: str, tracking: LinkTracking) -> None:
        part = content.push
        assert part is not None
        self.title = compile_template(_in(part, "title", locale), html=False, field="content.push.title")
        self.body = compile_template(tracking.text(_in(part, "body", locale)), html=False, field="content.push.body")
        self.image_url = _plain(part.image_url, "content.push.image_url")
        self.url = _plain(tracking.url(part.url), "content.push.url")
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
    def __init__(self, content: Content, locale: str | None, from_email: str, tracking: LinkTracking) -> None:
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

    def __init__(self, content: Content, channel: str, *, from_email: str = "crier@localhost",
                 tracking: LinkTracking | None = None) -> None:
        if not content.has(channel):
            raise ValueError(f"the content has nothing for {channel}")
        self.content, self.channel, self.from_email = content, channel, from_email
        given = tracking or LinkTracking()  # copied: the link table it fills is this renderer's own
        self.tracking = LinkTracking(opens=given.opens, clicks=given.clicks, text_links=given.text_links)
        self.locales = locales_of(content, channel)
        self._kind = _KINDS[channel]
        self._variants: dict[str | None, Any] = {}
        # Per variant: its link variables with their URLs (for a render without a tracker), and the
        # numbers a tracker signs for it, in the variables' order (0: the open pixel).
        self._links: dict[str | None, tuple[tuple[str, str], ...]] = {}
        self._signed: dict[str | None, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        # Per variant, the tracker last used, its maker of the variant's URLs, and their variables' names.
        self._made: dict[str | None, tuple[Tracker, Callable[[int], tuple[str, ...]], tuple[str, ...]]] = {}
        self._variant(None)
        if self.tracking.any:  # every variant now, in order: the link numbers must not depend on who came first
            self.check()
        self._chosen: dict[str | None, str | None] = {}
        self.uses_unsubscribe_url = "unsubscribe_url" in _sources(content, channel)

    def _variant(self, key: str | None) -> Any:
        table = self.tracking.links
        table.touched.clear()
        variant = self._variants[key] = self._kind(self.content, key, self.from_email, self.tracking)
        urls, numbers = table.by_number, sorted(table.touched)  # the links this variant uses, filled per recipient
        self._links[key] = tuple((LINK_VARIABLE.format(n), urls[n]) for n in numbers)
        if self.tracking.opens and self.channel == "email":
            numbers.insert(0, 0)
        self._signed[key] = (tuple(numbers), tuple(OPEN_VARIABLE if n == 0 else LINK_VARIABLE.format(n)
                                                   for n in numbers))
        return variant

    @property
    def links(self) -> dict[int, str]:
        """The tracked links, by number (empty when clicks are not tracked)."""
        return self.tracking.links.by_number

    def locale_for(self, locale: str | None) -> str | None:
        """The variant a recipient with `locale` gets (None: the default)."""
        try:
            return self._chosen[locale]
        except KeyError:
            if len(self._chosen) > 1000:  # locales are a short list in practice; bound the cache anyway
                self._chosen.clear()
            chosen = self._chosen[locale] = choose_locale(locale, self.locales) if self.locales else None
            return chosen

    def render(self, variables: dict[str, Any], locale: str | None, budget: Budget | None = None,
               tracker: Tracker | None = None) -> Rendered:
        """The message for a recipient whose locale is `locale` (budget: see CompiledContent.render).
        With tracking, `variables` gets the recipient's link and pixel URLs from `tracker` (the
        links as they are without one: a preview, a test send)."""
        key = self.locale_for(locale) if self.locales else None
        variant = self._variants.get(key)
        if variant is None:
            variant = self._variant(key)
        if self.tracking.any:
            if tracker is None:
                variables.update(self._links[key])
                variables[OPEN_VARIABLE] = UNTRACKED_PIXEL
            else:
                made = self._made.get(key)
                if made is None or made[0] is not tracker:  # a new run's tracker (this renderer outlives jobs)
                    numbers, names = self._signed[key]
                    made = self._made[key] = (tracker, tracker.maker(numbers), names)
                urls = made[1](variables["contact_id"])
                if tracker.html_safe and type(variant) is _Email:
                    return variant.render_given(variables, made[2], urls, budget)
                variables.update(zip(made[2], urls))
        return variant.render(variables, budget)

    def check(self) -> None:
        """Compile every variant now (raises TemplateError): a save-time check."""
        for key in self.locales:
            if key not in self._variants:
                self._variant(key)


class Tracker(Protocol):
    """A run's signed tracking URLs for its recipients (signing.Signer.tracking_links(urls=True))."""

    html_safe: bool  # its URLs hold no character HTML escapes

    def maker(self, links: tuple[int, ...]) -> Callable[[int], tuple[str, ...]]:
        """A function of a contact id: the URLs of `links` (0: the open pixel) in the message to
        that contact, in that order."""
        ...


def _sources(content: Content, channel: str) -> str:
    """Every Liquid source the channel renders, joined (to find the variables it names)."""
    part = _part(content, channel)
    if channel == "email":
        fields = {f: getattr(content, f) for f in ("subject", "html", "text", "preheader", "action_label",
                                                    "action_url")}
        fields.update({f"{f}_i18n": getattr(content, f"{f}_i18n") for f in _LOCALIZED["email"]})
        return msgspec.json.encode(fields).decode()
    return msgspec.json.encode(part).decode()
