"""The checks every content passes when it is saved (a template, a broadcast), so that nothing fails
at send time for a typo: each Liquid source parses and renders within one message's limits, locale
keys are tags, URLs and addresses are what they claim, and the whole fits in one event.

HTML is repaired here (shared.content.html), so what is stored is what is sent and what a preview
shows. A failure is Invalid naming the exact field (`content.sms.body`, `content.subject_i18n.de`,
`content.webhook.payload.items[2].name`); a Liquid error's reason carries the line.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from email.utils import parseaddr
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import msgspec
from email_validator import EmailNotValidError, validate_email
from liquid.exceptions import LiquidError, ResourceLimitError

from shared.content.html import repair_html
from shared.content.templates import (
    LOOP_LIMIT,
    OUTPUT_LIMIT,
    STEP_LIMIT,
    WORK_LIMIT,
    Budget,
    Template,
    TemplateError,
    compile_template,
)
from shared.kernel import limits as lim
from shared.kernel.content import (
    Content,
    PushPart,
    TelegramPart,
    WebhookPart,
    WhatsappPart,
)
from shared.kernel.errors import Invalid

__all__ = ["address_problem", "check_content"]

PLAIN, HTML, MARKDOWN, URL = "plain", "html", "markdown", "url"
_NUL = lim.PATTERN_REASONS[lim.NO_NUL_PATTERN]
_ONE_LINE = lim.PATTERN_REASONS[lim.ONE_LINE_PATTERN]
_LOCALE = re.compile(lim.LOCALE_PATTERN)
_WA_TEMPLATE = re.compile(lim.WHATSAPP_TEMPLATE_PATTERN)
_WA_LANGUAGE = re.compile(lim.WHATSAPP_LANGUAGE_PATTERN)
_WA_PARAMETER = re.compile(lim.WHATSAPP_PARAMETER_PATTERN)
_LIMITS = (OUTPUT_LIMIT, LOOP_LIMIT, STEP_LIMIT, WORK_LIMIT)
# What each of those limits says when a message's fields together go past it.
_OVER = (
    str(Budget.output_error().message), str(Budget.loop_error().message),
    str(Budget.step_error().message), str(Budget.work_error().message),
)
Usage = tuple[int, int, int, int]  # output bytes, loop iterations, steps, work: what a render took


class _Field(NamedTuple):
    name: str
    kind: str
    max_chars: int
    i18n: bool = False  # has `<name>_i18n` variants
    one_line: bool = False  # a header value


# The Liquid fields of each part of a content, in the order a message renders them.
_EMAIL = (
    _Field("subject", PLAIN, lim.MAX_SUBJECT_CHARS, i18n=True, one_line=True),
    _Field("from_name", PLAIN, lim.MAX_FROM_NAME_CHARS, one_line=True),
    _Field("preheader", PLAIN, lim.MAX_PREHEADER_CHARS, i18n=True),
    _Field("html", HTML, lim.MAX_HTML_CHARS, i18n=True),
    _Field("text", PLAIN, lim.MAX_TEXT_CHARS, i18n=True),
    _Field("action_label", PLAIN, lim.MAX_LABEL_CHARS, i18n=True),
    _Field("action_url", URL, lim.MAX_URL_CHARS),
)
_SECTIONS: dict[str, tuple[_Field, ...]] = {
    "sms": (_Field("body", PLAIN, lim.MAX_SMS_CHARS, i18n=True),),
    "telegram": (
        _Field("text", MARKDOWN, lim.MAX_TELEGRAM_CHARS, i18n=True),
        _Field("media_url", URL, lim.MAX_URL_CHARS),
        _Field("action_label", PLAIN, lim.MAX_LABEL_CHARS, i18n=True),
        _Field("action_url", URL, lim.MAX_URL_CHARS),
    ),
    "whatsapp": (),  # its parameters, below
    "push": (
        _Field("title", PLAIN, lim.MAX_PUSH_TITLE_CHARS, i18n=True),
        _Field("body", PLAIN, lim.MAX_PUSH_BODY_CHARS, i18n=True),
        _Field("image_url", URL, lim.MAX_URL_CHARS),
        _Field("url", URL, lim.MAX_URL_CHARS),
    ),
    "webhook": (),  # the strings of its payload, below
}


def check_content(content: Content, prefix: str = "content", *, stored: Content | None = None) -> Content:
    """The content as it is to be stored (HTML repaired), or Invalid naming the first bad field.
    `prefix` is where the content sits in the request (`content`, `channels[1].content`). `stored`:
    the content this one edits, whose HTML was repaired when it was saved; HTML still equal to it is
    kept as it is, so that an edit of other fields never changes the HTML."""
    # First, the size: it bounds the work of everything after (20 locales of HTML to repair and parse).
    _check_size(content, prefix)
    original, content = content, _repaired(content, stored)
    if content is not original:  # closing tags and entities add a little
        _check_size(content, prefix)
    for field in ("from_email", "reply_to"):
        if (value := getattr(content, field)) is not None and (problem := address_problem(value)):
            raise Invalid(f"{prefix}.{field}", problem)
    _check_part(content, original, _EMAIL, prefix)
    for name, fields in _SECTIONS.items():
        if (part := getattr(content, name)) is not None:
            _check_part(part, getattr(original, name), fields, f"{prefix}.{name}")
    return content


def address_problem(value: str) -> str | None:
    """Why `value` is not an address ("news@example.com" or "News <news@example.com>"), or None."""
    _, address = parseaddr(value)
    if not address or "@" not in address:
        return "not an email address"
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        return str(exc)
    return None


def _check_size(content: Content, prefix: str) -> None:
    if len(msgspec.json.encode(content)) > lim.MAX_CONTENT_BYTES:
        raise Invalid(prefix, f"at most {lim.MAX_CONTENT_BYTES:,} bytes as JSON, all fields together")


def _repaired(content: Content, stored: Content | None) -> Content:
    def repair(source: str, before: str | None) -> str:
        return source if not source or source == before else repair_html(source)

    html = repair(content.html, stored and stored.html)
    variants = {locale: repair(v, stored and stored.html_i18n.get(locale)) for locale, v in content.html_i18n.items()}
    if html == content.html and variants == content.html_i18n:
        return content
    return msgspec.structs.replace(content, html=html, html_i18n=variants)


def _check_part(part: Any, original: Any, fields: tuple[_Field, ...], path: str) -> None:
    """One channel's fields, then what one recipient's message of it renders together, per locale."""
    message = _Message()
    for field in fields:
        variants = getattr(part, f"{field.name}_i18n") if field.i18n else {}
        _check_locales(f"{path}.{field.name}_i18n", variants)
        sources = [(f"{path}.{field.name}", None, getattr(part, field.name))]
        sources += [(f"{path}.{field.name}_i18n.{locale}", locale, v) for locale, v in variants.items()]
        for where, locale, source in sources:
            if source is None:
                continue
            _check_text(where, source, field.max_chars, field.one_line)
            if field.kind == URL and source and not _is_url(source):
                raise Invalid(where, "must be an http(s) URL, or Liquid starting with {{")
            before = _source(original, field.name, locale)
            message.add(field.name, locale, where, _usage(where, source, field.kind, before))
    for where, source, max_chars in _extra_sources(part, path):
        _check_text(where, source, max_chars)
        message.add(where, None, where, _usage(where, source, PLAIN, source))
    message.check()


def _source(part: Any, name: str, locale: str | None) -> str | None:
    return getattr(part, name) if locale is None else getattr(part, f"{name}_i18n").get(locale)


def _extra_sources(part: Any, path: str) -> Iterator[tuple[str, str, int]]:
    """The Liquid sources of a part beyond its fields: WhatsApp's parameters, push data, a webhook's
    payload strings (each checked for the shape of its part on the way)."""
    if isinstance(part, WhatsappPart):
        yield from _whatsapp(part, path)
    elif isinstance(part, PushPart):
        if len(part.data) > lim.MAX_PUSH_DATA_KEYS:
            raise Invalid(f"{path}.data", f"at most {lim.MAX_PUSH_DATA_KEYS} keys")
        for key, value in part.data.items():
            if not key or len(key) > lim.MAX_PUSH_DATA_KEY_CHARS or "\x00" in key:
                raise Invalid(f"{path}.data.{_shown(key)}", f"a key of 1 to {lim.MAX_PUSH_DATA_KEY_CHARS} characters, "
                                                             "without U+0000")
            yield f"{path}.data.{key}", value, lim.MAX_PUSH_BODY_CHARS
    elif isinstance(part, TelegramPart):
        if part.media_url and part.media_type is None:
            raise Invalid(f"{path}.media_type", "required when media_url is set (photo or video)")
        if part.media_type is not None and not part.media_url:
            raise Invalid(f"{path}.media_url", "required when media_type is set")
    elif isinstance(part, WebhookPart):
        where = f"{path}.payload"
        if len(msgspec.json.encode(part.payload)) > lim.MAX_WEBHOOK_PAYLOAD_BYTES:
            raise Invalid(where, f"at most {lim.MAX_WEBHOOK_PAYLOAD_BYTES:,} bytes as JSON")
        for leaf, value in _strings(part.payload, where, 0):
            yield leaf, value, lim.MAX_WEBHOOK_PAYLOAD_BYTES


def _whatsapp(part: WhatsappPart, path: str) -> Iterator[tuple[str, str, int]]:
    if not _WA_TEMPLATE.fullmatch(part.template_name):
        raise Invalid(f"{path}.template_name", "1 to 512 lowercase letters, digits and underscores")
    _check_locales(f"{path}.language_i18n", part.language_i18n)
    codes = [(f"{path}.language", part.language)]
    codes += [(f"{path}.language_i18n.{locale}", code) for locale, code in part.language_i18n.items()]
    for where, code in codes:
        if len(code) > lim.MAX_WHATSAPP_LANGUAGE_CHARS or not _WA_LANGUAGE.fullmatch(code):
            raise Invalid(where, "a WhatsApp language code such as en, en_US or pt_BR")
    if len(part.parameters) > lim.MAX_WHATSAPP_PARAMETERS:
        raise Invalid(f"{path}.parameters", f"at most {lim.MAX_WHATSAPP_PARAMETERS} parameters")
    for key, value in part.parameters.items():
        if not _WA_PARAMETER.fullmatch(key):
            raise Invalid(f"{path}.parameters.{_shown(key)}", "a parameter's name: 1 to 64 letters, digits and "
                                                              "underscores (1, 2, ... for positional ones)")
        yield f"{path}.parameters.{key}", value, lim.MAX_WHATSAPP_PARAMETER_CHARS


def _strings(value: Any, path: str, depth: int) -> Iterator[tuple[str, str]]:
    """The string leaves of a JSON value with their paths; Invalid past MAX_WEBHOOK_DEPTH (checked
    before going deeper, so the recursion is bounded too) or for a key Postgres cannot store."""
    if isinstance(value, (dict, list)) and depth >= lim.MAX_WEBHOOK_DEPTH:
        raise Invalid(path, f"nested more than {lim.MAX_WEBHOOK_DEPTH} levels deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                raise Invalid(f"{path}.{_shown(key)}", f"a key {_NUL}")
            yield from _strings(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]", depth + 1)
    elif isinstance(value, str):
        yield path, value


def _check_locales(path: str, variants: dict[str, str]) -> None:
    if len(variants) > lim.MAX_I18N_VARIANTS:
        raise Invalid(path, f"at most {lim.MAX_I18N_VARIANTS} locales")
    seen: dict[str, str] = {}
    for locale in variants:
        if len(locale) > lim.MAX_LOCALE_CHARS or not _LOCALE.fullmatch(locale):
            raise Invalid(f"{path}.{_shown(locale)}", "not a locale tag such as de, pt-BR or zh-Hant-TW")
        # Tags are case-insensitive (RFC 5646): `de` and `DE` would compete for the same recipients.
        if (other := seen.setdefault(locale.lower(), locale)) != locale:
            raise Invalid(f"{path}.{locale}", f"the same locale as {other}")


def _check_text(path: str, source: str, max_chars: int, one_line: bool = False) -> None:
    # The API's schemas say the same; repeated here for content that reaches a save another way
    # (and for the HTML, which the repair may have lengthened).
    if len(source) > max_chars:
        raise Invalid(path, f"at most {max_chars:,} characters")
    if "\x00" in source:
        raise Invalid(path, _NUL)
    if one_line and ("\n" in source or "\r" in source):
        raise Invalid(path, _ONE_LINE)


def _is_url(value: str) -> bool:
    if value.startswith("{{"):  # the whole URL comes from the recipient's data
        return True
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unclosed `[` of an IPv6 host
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def _shown(key: str) -> str:
    """A key as a field path shows it: a U+0000 escaped, readable in the problem's text."""
    return key.replace("\x00", "\\u0000")


def _compile(path: str, source: str, kind: str) -> Template:
    # Compiled as the sender will (MarkdownV2 escapes what Liquid inserts into Telegram's text).
    return compile_template(source, html=kind == HTML, markdown=kind == MARKDOWN, field=path)


def _usage(path: str, source: str, kind: str, original: str | None) -> Usage:
    """What rendering `source` for a recipient with no data takes; Invalid if it does not parse or
    goes past a message's limits (it would for every recipient: the data cannot shorten it)."""
    if "{" not in source:  # no Liquid at all: the text as it is
        return len(source.encode("utf-8", "surrogatepass")), 0, 0, 0
    try:
        template = _compile(path, source, kind)
    except TemplateError as exc:
        raise Invalid(path, _parse_reason(path, exc, kind, original, source)) from None
    budget = Budget()
    try:
        template.render({}, budget)
    except TemplateError as exc:
        cause = exc.__cause__
        # A Liquid error other than a limit (`divided_by: 0` on a missing value) depends on the data:
        # the recipient's, at send time.
        if not isinstance(cause, LiquidError) or isinstance(cause, ResourceLimitError):
            raise Invalid(path, exc.reason) from None
    return OUTPUT_LIMIT - budget.output, LOOP_LIMIT - budget.loops, STEP_LIMIT - budget.steps, WORK_LIMIT - budget.work


def _parse_reason(path: str, exc: TemplateError, kind: str, original: str | None, source: str) -> str:
    """The reason of a parse error, on the line of what was sent: the HTML as given rather than as
    repaired, unless only the repair broke it."""
    if kind != HTML or original is None or original == source:
        return exc.reason
    try:
        _compile(path, original, kind)
    except TemplateError as given:
        return given.reason
    return f"{exc.reason} (in the HTML as repaired)"


class _Message:
    """The usage of a part's sources: what one recipient's message takes is its fields' in the
    recipient's locale (`de-AT`, else `de`, else the field itself), added up."""

    def __init__(self) -> None:
        self.fields: dict[str, dict[str | None, tuple[str, Usage]]] = {}

    def add(self, field: str, locale: str | None, path: str, usage: Usage) -> None:
        self.fields.setdefault(field, {})[locale.lower() if locale else None] = (path, usage)

    def check(self) -> None:
        locales = {locale for variants in self.fields.values() for locale in variants}
        for locale in sorted(locales, key=lambda x: x or ""):
            total = [0, 0, 0, 0]
            for variants in self.fields.values():
                if (chosen := _pick(variants, locale)) is None:
                    continue
                path, usage = chosen
                for i, used in enumerate(usage):
                    total[i] += used
                    if total[i] > _LIMITS[i]:
                        raise Invalid(path, f"{_OVER[i]}, with the message's other fields")


def _pick(variants: dict[str | None, tuple[str, Usage]], locale: str | None) -> tuple[str, Usage] | None:
    while locale:
        if locale in variants:
            return variants[locale]
        locale = locale.rpartition("-")[0] or None
    return variants.get(None)
