"""HTML email bodies as Liquid templates: repaired on save, CSS inlined once per content version,
wrapped into a full document, and turned into a plain-text part.

Everything here works on the template SOURCE, before any recipient's data: each Liquid span
(`{{ ... }}`, `{% ... %}`, a `{% raw %}` block, the seeds' `{first_name}`) must come out exactly
as it went in, wherever it stands (text, attribute values, between table rows, in a tag). HTML
parsers would otherwise escape it (`{% if a > b %}` -> `a &gt; b`), drop it (an attribute name),
move it (text between `<tr>`s is put before the table) or break on it (`href="{{ x | default: "y" }}"`
ends the attribute at the inner quote). So each span is swapped for a placeholder the parser
leaves alone, and put back afterwards (`_protect` / `_restore`).
"""
from __future__ import annotations

import html as stdlib_html
import re
from functools import lru_cache
from html.parser import HTMLParser
from typing import NamedTuple

import css_inline
import nh3

__all__ = ["html_to_text", "inline_css", "repair_html", "wrap_document"]


# --- Liquid spans kept out of the HTML parsers' hands -------------------------------------------

# What Liquid itself takes as one unit (its lexer, too, ends a span at the first closing
# delimiter), the same spans templates.py skips; then the seeds' single-brace `{first_name}`.
_LIQUID_SPAN = (
    r"\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}"
    r"|\{\{.*?\}\}"
    r"|\{%.*?%\}"
    r"|(?<!\{)\{[A-Za-z_][A-Za-z0-9_]*\}(?!\})"
)


def _scanner(*html: str) -> re.Pattern[str]:
    """The next Liquid span, or the next piece of HTML syntax that changes where we are."""
    return re.compile(rf"(?P<liquid>{_LIQUID_SPAN})|" + "|".join(html), re.DOTALL)


# Where a span stands decides which placeholder the parsers leave in place. A tiny HTML tokenizer,
# just enough to tell text from tags, quoted attribute values, comments and raw text.
_IN_TEXT = _scanner(r"(?P<comment><!--)", r"(?P<declaration><[!?])", r"(?P<tag></?(?P<name>[A-Za-z][^\s/>]*))")
_IN_TAG = _scanner(r"(?P<quote>[\"'])", r"(?P<end>>)")
_IN_QUOTES = {quote: _scanner(rf"(?P<end>{quote})") for quote in "\"'"}
_IN_COMMENT = _scanner(r"(?P<end>-->)")
_IN_DECLARATION = _scanner(r"(?P<end>>)")
# Elements whose content the HTML tokenizer reads as plain text up to their end tag: a comment in
# there would be text (and escaped, in a title), so spans in them get the bare placeholder.
_RAW_TEXT = {
    name: _scanner(rf"(?P<end>(?i:</{name})(?=[\s/>]))")
    for name in ("style", "script", "title", "textarea", "xmp", "iframe", "noembed", "noframes")
}

# Placeholders are `<prefix><n>z`: lowercase letters and digits, so that no parser escapes, encodes
# or lowercases them. The prefix is one the source does not contain (in any case), so the source
# cannot forge one; it has no border (no proper prefix of it is also a suffix), so no match can
# start in the text before a placeholder, and `z` ends the number.
_PREFIX = "liquidspan"


class _AttributeRun(NamedTuple):
    """Liquid standing where attributes go (`<td {% if a %}bgcolor="red"{% else %}bgcolor="blue"{% endif %}>`),
    from its first span to its last in that tag. Parsers would keep only one of two attributes of a
    name and may reorder attributes (css-inline puts `class` first), moving one into or out of an
    `{% if %}`: so the whole run is one placeholder, an attribute no parser looks into."""

    tag: str
    pieces: list[str]  # Liquid spans at even indices, the attribute text between them at odd ones


class _Protected(NamedTuple):
    text: str  # the source with each span replaced by a placeholder
    spans: list[str]  # the spans (or runs of attributes and spans), by placeholder number
    prefix: str
    runs: dict[int, _AttributeRun]  # the placeholders standing for an attribute run


def _attribute_run(source: str, start: int) -> list[str]:
    """The pieces of the attribute run starting with the Liquid span at `start` (see _AttributeRun)."""
    pieces, scanner, position, end = [], _IN_TAG, start, start
    while (match := scanner.search(source, position)) is not None:
        if match["liquid"] is not None:
            if scanner is _IN_TAG:
                pieces += [source[end:match.start()], match[0]]
                end = match.end()
        elif scanner is not _IN_TAG:
            scanner = _IN_TAG  # a quoted value ends
        elif match["quote"]:
            scanner = _IN_QUOTES[match["quote"]]
        else:
            break  # the end of the tag
        position = match.end()
    return pieces[1:]  # without the empty text before the first span


def _protect(source: str) -> _Protected:
    """`source` with each Liquid span swapped for a placeholder the HTML parsers keep in place.

    In text, the placeholder is a comment (`<!--liquidspan0z-->`): a comment stays where it is, also
    between table rows, where text would be moved before the table. In attribute values, comments
    and raw text it is the bare word, which parsers pass through; where attributes go, a bare word
    with spaces around it stands for a whole attribute run (see _AttributeRun)."""
    if "{" not in source:
        return _Protected(source, [], _PREFIX, {})
    prefix, lowered = _PREFIX, source.lower()
    while prefix in lowered:
        prefix += "x"
    pieces: list[str] = []
    spans: list[str] = []
    runs: dict[int, _AttributeRun] = {}
    scanner, tag, raw_text, position = _IN_TEXT, "", None, 0
    while (match := scanner.search(source, position)) is not None:
        pieces.append(source[position:match.start()])
        position = match.end()
        if match["liquid"] is not None:
            placeholder = f"{prefix}{len(spans)}z"
            span = match[0]
            if scanner is _IN_TEXT:
                placeholder = f"<!--{placeholder}-->"
            elif scanner is _IN_TAG:
                run = _attribute_run(source, match.start())
                runs[len(spans)] = _AttributeRun(tag, run)
                span = "".join(run)
                position = match.start() + len(span)
                placeholder = f" {placeholder} "  # not glued to the attributes around it
            spans.append(span)
            pieces.append(placeholder)
            continue
        pieces.append(match[0])
        if scanner is _IN_TEXT:
            if match["comment"]:
                scanner = _IN_COMMENT
            elif match["declaration"]:
                scanner = _IN_DECLARATION
            else:
                scanner, tag = _IN_TAG, match["name"].lower()
                raw_text = _RAW_TEXT.get(tag) if not match["tag"].startswith("</") else None
        elif scanner is _IN_TAG:
            if match["quote"]:
                scanner = _IN_QUOTES[match["quote"]]
            else:
                scanner, raw_text = raw_text or _IN_TEXT, None
        elif scanner in _IN_QUOTES.values():
            scanner = _IN_TAG
        elif scanner in _RAW_TEXT.values():
            scanner = _IN_TAG  # the raw text element's end tag
        else:  # the end of a comment or a declaration
            scanner = _IN_TEXT
    pieces.append(source[position:])
    return _Protected("".join(pieces), spans, prefix, runs)


def _placeholders(protected: _Protected) -> re.Pattern[str]:
    p = protected.prefix
    return re.compile(rf'<!--{p}(\d+)z-->|{p}(\d+)z(="")?')


def _restore(text: str, protected: _Protected, spans: list[str] | None = None) -> str:
    """`text` with each placeholder replaced by its Liquid span (or by `spans[n]`) again."""
    if not protected.spans:
        return text
    spans = protected.spans if spans is None else spans

    def put_back(match: re.Match[str]) -> str:
        index = int(match[1] or match[2])
        # An attribute run's placeholder is serialised as an attribute, `name=""`; anywhere else
        # `=""` is text.
        return spans[index] + match[3] if match[3] and index not in protected.runs else spans[index]

    return _placeholders(protected).sub(put_back, text)


def _in_order(text: str, protected: _Protected) -> bool:
    """Every placeholder is in `text` once, in the order of the source: the Liquid is intact."""
    found = [int(m[1] or m[2]) for m in _placeholders(protected).finditer(text)] if protected.spans else []
    return found == list(range(len(protected.spans)))


# --- documents and fragments ---------------------------------------------------------------------

# Searched in protected text, so nothing inside a Liquid span can look like a tag. Attribute
# values may hold `>`, hence the quoted alternatives.
_ATTRIBUTES = r"((?:[^>\"']|\"[^\"]*\"|'[^']*')*)"
_DOCUMENT = re.compile(r"<(?:!doctype|html|head|body)[\s>/]", re.IGNORECASE)
_DOCTYPE = re.compile(r"<!doctype\s+html\b[^<>]*>", re.IGNORECASE)
_HTML_OPEN = re.compile(rf"<html\b{_ATTRIBUTES}>", re.IGNORECASE)
_HEAD_CLOSE = re.compile(r"</head\s*>", re.IGNORECASE)
_BODY_OPEN = re.compile(rf"<body\b{_ATTRIBUTES}>", re.IGNORECASE)
_BODY_CLOSE = re.compile(r"</body\s*>|</html\s*>", re.IGNORECASE)


def _is_document(text: str) -> bool:
    return _DOCUMENT.search(text) is not None


# --- repair on save ----------------------------------------------------------------------------

# What an email body may hold: nh3's defaults (formatting, lists, tables, images, links), plus
# what email layouts are built from: <style> blocks (media queries, dark mode, client fixes), the
# old presentational elements and attributes Outlook still needs, inline styles, class and id.
# Scripts, forms, frames, embedded objects and event handler attributes (on*) are not on the lists,
# so nh3 drops them; javascript: and other schemes not listed drop the URL.
_BODY_TAGS = nh3.ALLOWED_TAGS | {
    "style", "font", "center", "big", "tfoot", "section", "main", "address", "u",
}
# Their content goes too: script source, or a frame's fallback text, is no reading for a person.
_DROPPED_WITH_CONTENT = {"script", "iframe", "object", "embed", "applet", "frame", "frameset", "noembed", "noframes"}
_PRESENTATION = {"style", "class", "id", "title", "dir", "lang", "align", "valign", "width", "height", "bgcolor"}
_BODY_ATTRIBUTES = {
    "*": _PRESENTATION | {"role"},
    "a": {"href", "target", "name", "rel"},
    "img": {"src", "alt", "border", "hspace", "vspace", "usemap"},
    "table": {"border", "cellpadding", "cellspacing", "background", "summary", "frame", "rules"},
    "td": {"colspan", "rowspan", "nowrap", "background", "headers", "scope", "abbr"},
    "th": {"colspan", "rowspan", "nowrap", "background", "headers", "scope", "abbr"},
    "col": {"span"},
    "colgroup": {"span"},
    "font": {"color", "face", "size"},
    "hr": {"size", "noshade", "color"},
    "ol": {"start", "type", "reversed"},
    "ul": {"type"},
    "li": {"value", "type"},
    "map": {"name"},
    "area": {"href", "shape", "coords", "alt", "target"},
    "style": {"type", "media"},
    "blockquote": {"cite"},
    "q": {"cite"},
    "del": {"cite", "datetime"},
    "ins": {"cite", "datetime"},
    "time": {"datetime"},
    "data": {"value"},
}
# nh3's default schemes (http, https, mailto, tel, sms, ...) plus cid:, the images a message
# carries as MIME parts.
_URL_SCHEMES = nh3.ALLOWED_URL_SCHEMES | {"cid"}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_URL_NOISE = re.compile(r"[\x00-\x20]+")  # what browsers ignore in a URL (`java\tscript:`)


def _check_background(tag: str, attribute: str, value: str) -> str | None:
    """nh3 checks the scheme of href and src, not of the old `background` attribute (a table's
    or cell's image, which Outlook needs): the same check for it."""
    if attribute == "background":
        scheme = _SCHEME.match(_URL_NOISE.sub("", value))
        if scheme and scheme[1].lower() not in _URL_SCHEMES:
            return None
    return value


_COMMON = {
    "attribute_filter": _check_background,
    # Kept: Outlook's conditional comments (`<!--[if mso]>`) carry whole layouts, and our
    # placeholders are comments. A comment runs nothing in any client.
    "strip_comments": False,
    # No rel="noopener noreferrer" added to every link: this is an email, not a page.
    "link_rel": None,
    "url_schemes": _URL_SCHEMES,
    # data-* and aria-* are inert; `liquidspan` lets attribute-name placeholders through (every
    # prefix _protect picks starts with it; an author's own `liquidspan…` attribute is as inert).
    "generic_attribute_prefixes": {"data-", "aria-", _PREFIX},
}
_BODY = nh3.Cleaner(
    tags=_BODY_TAGS, clean_content_tags=_DROPPED_WITH_CONTENT, attributes=_BODY_ATTRIBUTES, **_COMMON
)
_HEAD_ATTRIBUTES = {"meta": {"charset", "name", "content"}, "style": {"type", "media"}}
# A document's head keeps what a mail client reads there (http-equiv is left out: `refresh`
# would redirect a browser showing the message).
_HEAD = nh3.Cleaner(
    tags={"meta", "title", "style"},
    clean_content_tags=_DROPPED_WITH_CONTENT,
    attributes=_HEAD_ATTRIBUTES,
    **_COMMON,
)
# The <html> and <body> tags' own attributes, cleaned as a <div>'s (nh3 parses a fragment, where
# html/head/body tags are ignored).
_HTML_ATTRIBUTES = {"lang", "dir", "xmlns", "xmlns:v", "xmlns:o"}
_BODY_TAG_ATTRIBUTES = _PRESENTATION | {
    "background", "text", "link", "vlink", "alink", "leftmargin", "topmargin", "marginwidth", "marginheight",
}
_CLEANED_DIV = re.compile(r"<div(.*)></div>", re.DOTALL)


@lru_cache(maxsize=64)
def _attribute_cleaner(tag: str) -> nh3.Cleaner:
    """Cleans the attributes `tag` may have, written on a <div>."""
    if tag == "html":
        allowed = _HTML_ATTRIBUTES
    elif tag == "body":
        allowed = _BODY_TAG_ATTRIBUTES
    elif tag in _HEAD_ATTRIBUTES:
        allowed = _HEAD_ATTRIBUTES[tag]
    else:
        allowed = _BODY_ATTRIBUTES["*"] | _BODY_ATTRIBUTES.get(tag, set())
    return nh3.Cleaner(tags={"div"}, attributes={"div": allowed}, **_COMMON)


def _clean_attributes(attributes: str, tag: str) -> str:
    """The allowed ones of a tag's `attributes` (as written after its name), re-serialised, each
    after a space. Liquid in their values stays (the text of an attribute run may hold some)."""
    if not attributes.strip():
        return ""
    protected = _protect(f"<div {attributes}></div>")
    match = _CLEANED_DIV.fullmatch(_attribute_cleaner(tag).clean(protected.text))
    return _restore(match[1], protected) if match else ""


def _clean_run(run: _AttributeRun) -> str:
    """An attribute run with the attributes between its Liquid spans cleaned: whatever the
    condition, the tag gets allowed attributes only."""
    return "".join(piece if i % 2 == 0 else _clean_attributes(piece, run.tag) for i, piece in enumerate(run.pieces))


def _repair_document(text: str) -> str:
    """A full document, rebuilt: its doctype (an HTML one, else `<!DOCTYPE html>`), <html> with
    lang/dir/xmlns, the head's meta/title/style (and comments), <body> with its presentation
    attributes, the body cleaned like a fragment."""
    doctype = _DOCTYPE.search(text)
    html_open = _HTML_OPEN.search(text)
    start = html_open.end() if html_open else doctype.end() if doctype else 0
    body_open = _BODY_OPEN.search(text, start)
    if body_open:
        head, body, body_attributes = text[start:body_open.start()], text[body_open.end():], body_open[1]
    else:  # no <body>: what follows </head> is the body
        head_close = _HEAD_CLOSE.search(text, start)
        split = head_close.end() if head_close else start
        head, body, body_attributes = text[start:split], text[split:], ""
    body = _BODY_CLOSE.split(body, maxsplit=1)[0]
    html_attributes = _clean_attributes(html_open[1], "html") if html_open else ""
    return (
        f"{doctype[0] if doctype else '<!DOCTYPE html>'}\n<html{html_attributes}>\n"
        f"<head>{_HEAD.clean(head).strip()}</head>\n"  # stripped: a repair of a repair changes nothing
        f"<body{_clean_attributes(body_attributes, 'body')}>{_BODY.clean(body)}</body>\n</html>"
    )


def repair_html(source: str) -> str:
    """An HTML email body (Liquid source) made well-formed and harmless, for saving: unclosed tags
    closed, scripts, event handler attributes and javascript: URLs removed, what an email needs
    kept (see _BODY_TAGS / _BODY_ATTRIBUTES), every Liquid span unchanged.

    A fragment comes back a fragment. A full document (a doctype, <html>, <head> or <body>) comes
    back a full document, rebuilt from its parts (see _repair_document), so its head's <style>
    blocks stay in the head.

    A span inside something removed (an `onclick`, a <script>) goes with it; if that leaves an
    `{% if %}` without its `{% endif %}`, compiling the template on save says so."""
    protected = _protect(source)
    text = protected.text
    repaired = _repair_document(text) if _is_document(text) else _BODY.clean(text)
    spans = [_clean_run(protected.runs[i]) if i in protected.runs else span for i, span in enumerate(protected.spans)]
    return _restore(repaired, protected, spans)


# --- CSS inlined once per content version --------------------------------------------------------

# <style> blocks are kept after inlining (media queries and :hover cannot be inlined), <link>ed
# stylesheets are neither fetched (no network I/O while saving) nor removed.
_INLINER = css_inline.CSSInliner(keep_style_tags=True, keep_link_tags=True, load_remote_stylesheets=False)


def inline_css(html: str) -> str:
    """The rules of `html`'s <style> blocks copied into the style attributes of the elements they
    match, for the clients that ignore <style> (some webmail, old Outlook). Meant for a template
    source, once per content version: each recipient's render then costs nothing extra.

    Liquid spans stay as they are; a rule cannot match through one (`class="{{ c }}"` matches no
    `.x`). When inlining would lose or reorder a span (css-inline rewrites a style attribute that
    holds Liquid, or moves an attribute-name span), or the CSS does not parse, the input comes back
    unchanged: an email without inlined CSS still renders in most clients, a broken template in none.
    """
    if "<style" not in html.lower():
        return html  # nothing to inline
    protected = _protect(html)
    text = protected.text
    try:
        inlined = _INLINER.inline(text) if _is_document(text) else _INLINER.inline_fragment(text, "")
    except (css_inline.InlineError, ValueError):
        return html
    if not _in_order(inlined, protected):
        return html
    return _restore(inlined, protected)


# --- a full email document -----------------------------------------------------------------------

# After the preheader, invisible characters fill the rest of the inbox preview line: without them
# clients show the first words of the body after it. &zwnj;&nbsp; pairs are the usual filler (a
# zero-width non-joiner keeps the no-break spaces from being collapsed); 100 of them cover the
# longest previews (~140 characters) and cost 1.2 KB.
_PREVIEW_FILLER = "&zwnj;&nbsp;" * 100
# The usual hidden-preheader styles: display:none for most clients, mso-hide:all for Outlook,
# max-height/overflow for those that ignore display:none.
_PREHEADER_OPEN = '<div style="display:none;max-height:0;overflow:hidden;mso-hide:all;" aria-hidden="true">'
_LIQUID = re.compile(_LIQUID_SPAN, re.DOTALL)


def _escape_outside_liquid(text: str) -> str:
    """`text` escaped for HTML, its Liquid spans left as they are (they are escaped when rendered)."""
    pieces = _LIQUID.split(text)  # no groups in the pattern: spans are dropped, so put them back
    spans = _LIQUID.findall(text)
    escaped = [stdlib_html.escape(piece, quote=False) for piece in pieces]
    return "".join(piece + span for piece, span in zip(escaped, spans + [""]))


def _preheader(preheader: str) -> str:
    # On one line (its line breaks as spaces): the body's lines keep their numbers (see wrap_document).
    flat = " ".join(preheader.splitlines())
    return f"{_PREHEADER_OPEN}{flat}{_PREVIEW_FILLER}</div>" if preheader else ""


def wrap_document(html: str, *, preheader: str = "", lang: str | None = None, title: str = "") -> str:
    """`html` as a full HTML email document.

    A body fragment gets the doctype, <html lang>, a head with the meta tags mail clients expect
    (charset, viewport, x-apple-disable-message-reformatting: Apple Mail would otherwise resize the
    text) and <title> (`title` escaped, Liquid in it kept), then the preheader as hidden preview
    text at the top of the body. A full document is left as it is, with the preheader inserted
    after its <body> tag (or, lacking one, after </head> or <html>).

    `preheader` is Liquid source, inserted verbatim: rendered with the body, autoescaped."""
    protected = _protect(html)  # so that no `<body` inside a Liquid span is taken for the tag
    text = protected.text
    if _is_document(text):
        if not preheader:
            return html
        anchor = _BODY_OPEN.search(text) or _HEAD_CLOSE.search(text) or _HTML_OPEN.search(text) or _DOCTYPE.search(text)
        if anchor is None:  # only a stray <head>: nowhere better than the start
            return _preheader(preheader) + html
        # Placeholders are whole words or comments, never cut by a tag's end: each side restores.
        before, after = _restore(text[:anchor.end()], protected), _restore(text[anchor.end():], protected)
        return before + _preheader(preheader) + after
    lang_attribute = f' lang="{stdlib_html.escape(lang)}"' if lang else ""
    # All before the body on its first line, so that a line number in a render error is the line of
    # the HTML as the author wrote it.
    return (
        f"<!DOCTYPE html><html{lang_attribute}><head>"
        '<meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="x-apple-disable-message-reformatting">'
        f"<title>{_escape_outside_liquid(title)}</title>"
        f"</head><body>{_preheader(preheader)}{html}\n</body>\n</html>\n"
    )


# --- the plain-text part -------------------------------------------------------------------------

# Blocks that stand apart with a blank line, and those that only start a new line.
_PARAGRAPHS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "pre", "hr", "dl", "ul", "ol"})
_LINES = frozenset({
    "div", "tr", "dt", "dd", "center", "section", "article", "header", "footer", "main", "nav", "aside",
    "address", "caption", "figure", "figcaption", "li",
})
_CELLS = frozenset({"td", "th"})
# Content no reader should see: the head (title included), CSS, scripts.
_UNREAD = frozenset({"head", "title", "style", "script", "template", "noembed", "noframes", "iframe", "object"})
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
                   "track", "wbr"})
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none", re.IGNORECASE)
# Zero-width characters (preheader fillers, soft hyphens) that would only confuse a text reader.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u034f\u00ad"))
_WHITESPACE = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")


_RAW_BLOCK = re.compile(r"\{%-?\s*raw\b")


def _is_liquid_tag(span: str) -> bool:
    """`{% ... %}`, which writes nothing itself (a raw block writes its content)."""
    return span.startswith("{%") and _RAW_BLOCK.match(span) is None


class _TextWriter(HTMLParser):
    """Collects readable text; Liquid arrives as placeholders, which it copies as they are."""

    def __init__(self, protected: _Protected) -> None:
        super().__init__(convert_charrefs=True)
        self.protected = protected
        # Without spans _protect picked no prefix the source lacks: then nothing is a placeholder.
        self.placeholder = re.compile(rf"{protected.prefix}(\d+)z" if protected.spans else r"(?!)")
        self.pieces: list[str] = []
        self.pending = 0  # newlines the blocks around want before the next text: 1 a line, 2 a blank line
        self.line_start = True  # spaces here are the collapsed whitespace between tags: dropped
        self.started = False  # whether any text was written yet
        self.open: list[tuple[str, bool]] = []  # open elements, and whether each hides its content
        self.hidden = 0  # open elements hiding their content
        self.links: list[tuple[str, int]] = []  # open links' href and where their text starts
        self.lists = 0

    def write(self, text: str, *, indent: bool = False) -> None:
        if not indent and text.startswith(" ") and self.pieces and self.pieces[-1].endswith(" "):
            text = text.lstrip(" ")  # one space between words, whichever element brought it
            if not text:
                return
        if self.pending or self.line_start:
            if not indent:
                text = text.lstrip(" ")
                if not text:
                    return
            if self.pending:
                if self.started:  # no blank lines before the first text
                    self.pieces.append("\n" * self.pending)
                self.pending = 0
        self.pieces.append(text)
        self.started = True
        self.line_start = text.endswith("\n") or indent

    def write_liquid_tag(self, placeholder: str) -> None:
        """A Liquid tag writes nothing itself: it sticks to the text before it, and the breaks
        before the next block go after it, inside an `{% if %}` that shows that block. So a
        condition that is false leaves no empty lines behind."""
        self.pieces.append(placeholder)

    def write_liquid(self, placeholder: str) -> None:
        index = int(self.placeholder.fullmatch(placeholder)[1])  # type: ignore[index]
        if index in self.protected.runs or _is_liquid_tag(self.protected.spans[index]):
            self.write_liquid_tag(placeholder)
        else:
            self.write(placeholder)

    def block(self, newlines: int) -> None:
        """A block starts or ends: the next text goes on a new line (or after a blank line). Blocks
        that meet share their breaks, so a list's items are not a blank line apart."""
        self.pending = max(self.pending, newlines)

    # Liquid tags (`{% if %}`) are never dropped, even from content no reader sees: dropping one of
    # an if/endif pair would break the text template. Outputs there (`{{ x }}`) go with the content.
    def keep_liquid_tags(self, text: str) -> None:
        for match in self.placeholder.finditer(text):
            index = int(match[1])
            if index in self.protected.runs or _is_liquid_tag(self.protected.spans[index]):
                self.write_liquid_tag(match[0])

    def breaks(self, tag: str) -> int:
        if tag in ("ul", "ol") and self.lists:  # a list in a list item is part of it
            return 1
        return 2 if tag in _PARAGRAPHS else 1 if tag in _LINES else 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "body":  # a head left open ends here
            self.open = [entry for entry in self.open if entry[0] != "head"]
            self.hidden = sum(hides for _, hides in self.open)
        if tag not in _VOID:
            hides = tag in _UNREAD or _HIDDEN_STYLE.search(values.get("style") or "") is not None
            self.open.append((tag, hides))
            self.hidden += hides
        shown = {"href"} if tag == "a" else {"alt"} if tag == "img" else set()
        for name, value in attrs:  # attribute-name placeholders, and spans in attributes not shown
            if self.hidden or name not in shown:
                self.keep_liquid_tags(f"{name} {value or ''}")
        if self.hidden:
            return
        if tag == "br":
            self.write("\n")
        elif tag in _CELLS:
            self.write(" ")
        else:
            self.block(self.breaks(tag))
        if tag in ("ul", "ol"):
            self.lists += 1
        elif tag == "li":
            self.write("  " * max(self.lists - 1, 0) + "- ", indent=True)
        elif tag == "a":
            self.links.append((values.get("href") or "", len(self.pieces)))
        elif tag == "img" and values.get("alt"):
            self.write(_WHITESPACE.sub(" ", values["alt"] or ""))

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or all(name != tag for name, _ in self.open):
            return
        was_hidden = self.hidden
        while self.open:  # close it and whatever was left open inside it
            name, hides = self.open.pop()
            self.hidden -= hides
            if name == tag:
                break
        if was_hidden:
            return
        if tag in ("ul", "ol"):
            self.lists -= 1
        if tag == "a" and self.links:
            href, start = self.links.pop()
            self.end_link(href, "".join(self.pieces[start:]).strip())
        self.block(self.breaks(tag))

    def end_link(self, href: str, text: str) -> None:
        """`text (url)`, unless the text already says the URL."""
        href = href.strip()
        shown, url = _restore(text, self.protected), _restore(href, self.protected)
        if not href or href.startswith("#") or shown in (url, url.removeprefix("mailto:")):
            self.keep_liquid_tags(href)
        else:
            self.write(f" ({href})" if shown else href)

    def handle_data(self, data: str) -> None:
        if self.hidden:
            self.keep_liquid_tags(data)
        else:
            self.write(_WHITESPACE.sub(" ", data.translate(_INVISIBLE)))

    def handle_comment(self, data: str) -> None:
        # A Liquid span in text (see _protect); any other comment (Outlook's conditionals) is no text.
        if self.placeholder.fullmatch(data) and not self.hidden:
            self.write_liquid(data)
        else:
            self.keep_liquid_tags(data)

    def text(self) -> str:
        lines = (line.rstrip(" ") for line in "".join(self.pieces).split("\n"))
        return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


def html_to_text(html: str) -> str:
    """A plain-text part for `html` (Liquid source): blocks on their own lines with at most one
    blank line between them, list items as `- ` bullets, links as `text (url)`, images as their alt
    text, entities decoded, whitespace collapsed; the head, <style>, <script> and hidden elements
    (the preheader) left out. Liquid spans come through unchanged; a Liquid tag stays next to the
    text before it, so that a false `{% if %}` around a paragraph leaves no blank lines, and stays
    even in content left out, so that the text template is as balanced as the HTML one."""
    protected = _protect(html)
    writer = _TextWriter(protected)
    writer.feed(protected.text)
    writer.close()
    # An attribute run leaves its Liquid tags in the text, not its attributes.
    spans = [
        "".join(piece for piece in protected.runs[i].pieces[::2] if piece.startswith("{%")) if i in protected.runs
        else span
        for i, span in enumerate(protected.spans)
    ]
    return _restore(writer.text(), protected, spans)
