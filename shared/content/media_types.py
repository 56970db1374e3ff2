"""What a file is, from its first bytes (magic numbers): pure functions, no I/O.

The Content-Type a client sends and the file name are never trusted: a file is served back with the
type found here (and `nosniff`), so a page or a script renamed `.png` cannot be served as anything
a browser would run, and Telegram is only ever handed the formats it takes (sendPhoto: JPEG, PNG,
GIF, WEBP; sendVideo: MP4, QuickTime, WebM).

Each check reads a few bytes more than the bare signature (PNG's IHDR, WEBP's first chunk, the
brand of an ISO BMFF `ftyp` box, WebM's DocType) so that a text file starting by chance with a
signature is still refused. It is no full parse: a file that is broken further in is accepted and
fails where it is used.
"""
from __future__ import annotations

from typing import NamedTuple

# Bytes enough for every check below: an `ftyp` box's brand is at bytes 8 to 12 and an EBML header
# (WebM) is some 40 bytes; the rest of a larger head is not looked at.
SNIFF_BYTES = 4096

# ISO BMFF (`ftyp` major brand) -> content type: what MP4 writers (ffmpeg: isom; phones: mp42, iso*;
# DASH: dash, iso5/6; iTunes, HandBrake: M4V) and QuickTime (qt) put there. Audio-only (M4A, M4B)
# and still images (HEIC, AVIF) have brands of their own and are refused.
MP4_BRANDS = frozenset({
    b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6", b"iso7", b"iso8", b"iso9", b"mp41", b"mp42",
    b"avc1", b"av01", b"dash", b"M4V ", b"M4VH", b"M4VP", b"mmp4", b"MSNV", b"f4v ", b"XAVC",
})
QUICKTIME_BRANDS = frozenset({b"qt  "})

PHOTO_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
VIDEO_TYPES = ("video/mp4", "video/quicktime", "video/webm")
ACCEPTED = "a JPEG, PNG, GIF or WEBP photo, or an MP4, QuickTime or WebM video"


class MediaType(NamedTuple):
    kind: str  # photo | video: the Telegram method that sends it (sendPhoto, sendVideo)
    content_type: str


class NotMedia(ValueError):
    """The bytes are none of the accepted formats; the message says what was found, for a person."""


def sniff(head: bytes) -> MediaType:
    """The media type of a file whose first bytes (at least SNIFF_BYTES of them, or all) are `head`."""
    if not head:
        raise NotMedia("the file is empty")
    for check in (_jpeg, _png, _gif, _webp, _iso_bmff, _webm):
        if (found := check(head)) is not None:
            return found
    raise NotMedia(f"the bytes are not {ACCEPTED} (the Content-Type and the file name are not used)")


def _jpeg(head: bytes) -> MediaType | None:
    # SOI, then the first marker's 0xFF (APP0 JFIF, APP1 Exif, DQT ... all follow it)
    return MediaType("photo", "image/jpeg") if head[:3] == b"\xff\xd8\xff" else None


def _png(head: bytes) -> MediaType | None:
    # The signature, then the first chunk, which must be IHDR (length 13)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[8:16] == b"\x00\x00\x00\x0dIHDR":
        return MediaType("photo", "image/png")
    return None


def _gif(head: bytes) -> MediaType | None:
    return MediaType("photo", "image/gif") if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 13 else None


def _webp(head: bytes) -> MediaType | None:
    # RIFF container of form WEBP whose first chunk is a lossy, lossless or extended bitstream
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and head[12:16] in (b"VP8 ", b"VP8L", b"VP8X"):
        return MediaType("photo", "image/webp")
    return None


def _iso_bmff(head: bytes) -> MediaType | None:
    """MP4 and QuickTime: the file starts with an `ftyp` box naming its major brand."""
    if head[4:8] != b"ftyp":
        return None
    size = int.from_bytes(head[:4], "big")
    # size, type, major brand, minor version, then compatible brands of 4 bytes each
    if size < 16 or (size - 16) % 4 or len(head) < 16:
        raise NotMedia("an `ftyp` box of an impossible size: not a valid MP4 or QuickTime file")
    brand = head[8:12]
    if brand in MP4_BRANDS:
        return MediaType("video", "video/mp4")
    if brand in QUICKTIME_BRANDS:
        return MediaType("video", "video/quicktime")
    shown = brand.decode("latin-1").strip() or repr(brand)
    raise NotMedia(f"an ISO BMFF file of brand {shown!r}, which is not an MP4 or QuickTime video "
                   "(audio and HEIC/AVIF images are refused)")


_EBML = b"\x1a\x45\xdf\xa3"
_DOC_TYPE = b"\x42\x82"


def _webm(head: bytes) -> MediaType | None:
    """WebM: an EBML header whose DocType is `webm` (Matroska's, `matroska`, is refused)."""
    if head[:4] != _EBML:
        return None
    doc_type = _ebml_doc_type(head)
    if doc_type == b"webm":
        return MediaType("video", "video/webm")
    if doc_type is None:
        raise NotMedia("an EBML file whose header could not be read: not a valid WebM video")
    raise NotMedia(f"an EBML file of DocType {doc_type.decode('latin-1')!r}: only WebM videos are taken")


def _vint(data: bytes, at: int) -> tuple[int, int] | None:
    """An EBML variable-size integer at `at`: (its length in bytes, its value without the marker)."""
    if at >= len(data) or data[at] == 0:
        return None
    length = 9 - data[at].bit_length()  # 1 leading zero bit per extra byte
    if at + length > len(data):
        return None
    value = data[at] & (0xFF >> length)
    for byte in data[at + 1: at + length]:
        value = value << 8 | byte
    return length, value


def _ebml_doc_type(head: bytes) -> bytes | None:
    """The DocType element among the EBML header's children, or None when it cannot be read."""
    header = _vint(head, 4)
    if header is None:
        return None
    at = 4 + header[0]
    end = min(at + header[1], len(head))
    while at < end:
        id_ = _vint(head, at)  # an element id is a vint too, read with its marker kept
        if id_ is None:
            return None
        element = head[at: at + id_[0]]
        size = _vint(head, at + id_[0])
        if size is None:
            return None
        start = at + id_[0] + size[0]
        if element == _DOC_TYPE:
            return head[start: start + size[1]].rstrip(b"\x00") if start + size[1] <= len(head) else None
        at = start + size[1]
    return None
