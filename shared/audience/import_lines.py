"""Contact import files as lines (pure): bytes in pieces of any size, out in blocks of whole lines.

A line ends with LF (or CRLF; the CR stays with it). One over MAX_LINE_BYTES is rejected unread: a
body of any size is read with bounded memory. A UTF-8 byte order mark at the start is dropped.
"""
from __future__ import annotations

import re

MiB = 1024 * 1024
MAX_LINE_BYTES = MiB
CHUNK_BYTES = 16 * MiB  # of the file per chunk at most: fewer rows per chunk when they are large
BLOCK_BYTES = 256 * 1024  # bytes gathered before they are parsed
LONG_REASON = f"the line is longer than {MAX_LINE_BYTES:,} bytes"
_BOM = b"\xef\xbb\xbf"
_LONG_LINE = re.compile(rb"[^\n]{%d,}\n?" % (MAX_LINE_BYTES + 1))


class Blocks:
    """Bytes in pieces of any size out as blocks of whole lines; None stands for a line over
    MAX_LINE_BYTES, dropped unread."""

    def __init__(self) -> None:
        self.pending = bytearray()
        self.skipping = False  # inside a line that is too long
        self.started = False
        self.bytes_in = 0

    def push(self, data: bytes, final: bool = False) -> list[bytes | None]:
        self.bytes_in += len(data)
        buf = self.pending
        buf += data
        if not self.started and (len(buf) >= 3 or final):
            self.started = True
            if buf.startswith(_BOM):
                del buf[:3]
        out: list[bytes | None] = []
        while buf:
            if self.skipping:
                nl = buf.find(b"\n")
                if nl < 0:
                    buf.clear()
                    break
                del buf[: nl + 1]
                self.skipping = False
                out.append(None)
                continue
            if len(buf) < BLOCK_BYTES and not final:
                if len(buf) > MAX_LINE_BYTES and buf.rfind(b"\n") < 0:
                    self.skipping = True
                    continue
                break
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                if len(buf) > MAX_LINE_BYTES:
                    self.skipping = True
                    continue
                if not final:
                    break
                buf += b"\n"  # the last line, without its newline
                cut = len(buf)
            block = bytes(buf[:cut])
            del buf[:cut]
            out.extend(_long_lines_apart(block))
        if final and self.skipping:
            self.skipping = False
            out.append(None)
        return out


def _long_lines_apart(block: bytes) -> list[bytes | None]:
    if len(block) <= MAX_LINE_BYTES:
        return [block]
    out: list[bytes | None] = []
    at = 0
    for m in _LONG_LINE.finditer(block):
        if m.start() > at:
            out.append(block[at : m.start()])
        out.append(None)
        at = m.end()
    if at < len(block):
        out.append(block[at:])
    return out
