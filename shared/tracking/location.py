"""A stored URL as the `Location` of a redirect: only ever that URL, made safe to send as a header.

Links are stored as the content had them, which may hold characters a header cannot carry (a
non-ASCII path, a space) or must not (CR, LF: a header of one's own). Those are percent-encoded
as UTF-8 (RFC 3986, as a browser does when it follows the link itself); every character a URL may
hold, an existing %XX escape included, stays as it is, so the destination receives the same URL.
"""
from __future__ import annotations

from urllib.parse import quote

# RFC 3986's reserved and unreserved characters, and % (escapes already there): kept as they are.
_KEPT = "!#$%&'()*+,/:;=?@[]~-._"


def as_location(url: str) -> str:
    return quote(url, safe=_KEPT)
