"""Which links of a message are tracked, and how they are put in: pure functions over the content's
Liquid sources, applied once when a channel's content is compiled (not per recipient).

A tracked link is a literal http(s) URL: in HTML an `href` (quoted) whose value holds no Liquid,
in plain text (`text_links`) a bare URL. Each distinct URL gets a number, in the order first met
across the channel's fields and locale variants (compiled in a fixed order, so every sender
process numbers alike), and its place in the source becomes a variable that the render fills per
recipient with that recipient's signed redirect (`/r/{code}`), or with the URL itself where
nothing is tracked (a preview, a test send). A URL made with Liquid (`https://x.test/{{ id }}`)
differs per recipient and is left as it is: only a stored URL may ever be a redirect target.

The open pixel is an image at the end of the email's body; a preview's is an inline transparent
GIF, so showing it fetches nothing.
"""
from __future__ import annotations

import html
import re

MAX_TRACKED_LINKS = 500  # per content and channel; links past it are left untracked
MAX_URL_CHARS = 2048
LINK_VARIABLE = "crier_link_{}"  # set after the contact's variables: an attribute of that name changes nothing
OPEN_VARIABLE = "crier_open_url"
_HREF = re.compile(r"""(\bhref\s*=\s*)(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)
_TEXT_URL = re.compile(r"""https?://[^\s<>"'`{}|\\^\[\]]+""", re.IGNORECASE)
_TRAILING = ".,;:!?)"  # punctuation that ends a sentence rather than the URL ("see https://x.test.")
# Outputs only, no tag: a `{% if %}` here would take the whole document off the templates' fast
# path (shared/content/templates.py; measured 1.4 -> 37 µs a message). Without a tracker (a
# preview, a test send) the image is a transparent GIF in a data URL, so nothing is fetched.
_PIXEL = ('<img src="{{ ' + OPEN_VARIABLE + ' }}" width="1" height="1" alt="" '
          'style="display:block;width:1px;height:1px;border:0">')
UNTRACKED_PIXEL = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"


class LinkTable:
    """The tracked URLs of one content on one channel, numbered from 1 in the order first met."""

    def __init__(self) -> None:
        self.urls: dict[str, int] = {}
        self.touched: set[int] = set()  # the numbers handed out since the caller last cleared it

    def number(self, url: str) -> int | None:
        """The URL's number (a new one if unseen), None when it is not trackable or the table is full."""
        found = self.urls.get(url)
        if found is None:
            if not trackable(url) or len(self.urls) >= MAX_TRACKED_LINKS:
                return None
            found = self.urls[url] = len(self.urls) + 1
        self.touched.add(found)
        return found

    @property
    def by_number(self) -> dict[int, str]:
        return {n: url for url, n in self.urls.items()}


def trackable(url: str) -> bool:
    """A literal absolute http(s) URL: no Liquid in it, no whitespace, not too long."""
    lowered = url[:8].lower()
    return ((lowered.startswith("http://") or lowered.startswith("https://")) and len(url) <= MAX_URL_CHARS
            and "{{" not in url and "{%" not in url and not any(c.isspace() for c in url))


def _variable(number: int) -> str:
    return "{{ " + LINK_VARIABLE.format(number) + " }}"


def track_html(source: str, table: LinkTable) -> str:
    """`source` with each trackable href's URL replaced by its link variable (HTML entities in the
    attribute decoded first: the stored URL is what the browser would have followed)."""

    def replace(match: re.Match[str]) -> str:
        quoted = match.group(2) if match.group(2) is not None else match.group(3)
        number = table.number(html.unescape(quoted))
        if number is None:
            return match.group(0)
        return f'{match.group(1)}"{_variable(number)}"'

    return _HREF.sub(replace, source)


def track_text(source: str, table: LinkTable) -> str:
    """`source` with each trackable bare URL replaced by its link variable (outside Liquid tags)."""
    out, at = [], 0
    for liquid in re.finditer(r"\{\{.*?\}\}|\{%.*?%\}", source, re.DOTALL):
        out.append(_track_plain(source[at:liquid.start()], table))
        out.append(liquid.group(0))
        at = liquid.end()
    out.append(_track_plain(source[at:], table))
    return "".join(out)


def _track_plain(text: str, table: LinkTable) -> str:
    def replace(match: re.Match[str]) -> str:
        url = match.group(0)
        trimmed = url.rstrip(_TRAILING)
        if trimmed.endswith("(") or (url.endswith(")") and "(" in trimmed):  # a URL with parentheses keeps its ")"
            trimmed = url
        number = table.number(trimmed)
        return match.group(0) if number is None else _variable(number) + url[len(trimmed):]

    return _TEXT_URL.sub(replace, text)


def with_pixel(document: str) -> str:
    """The email document with the open pixel at the end of its body."""
    at = document.lower().rfind("</body>")
    return document[:at] + _PIXEL + document[at:] if at >= 0 else document + _PIXEL
