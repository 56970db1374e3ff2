"""NDJSON contact imports read incrementally (pure): one contact object per line, the shape of a
POST /v1/contacts item (a field left out keeps the stored value, null clears it); blank lines are
skipped. A block's lines are decoded by msgspec in one call as an array, and one by one only when
that fails, to tell which line is wrong and why.
"""
from __future__ import annotations

import operator
import re
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from shared.audience.fields import MAX_PUSH_TOKEN_CHARS, MAX_PUSH_TOKENS
from shared.audience.import_checks import (
    AT_PATH,
    FIELDS,
    MAX_EXTERNAL_ID_CHARS,
    Attributes,
    Chunk,
    Rows,
    checked,
    decode_reason,
)
from shared.audience.import_lines import CHUNK_BYTES, LONG_REASON, Blocks
from shared.kernel import limits as lim


def _text(max_length: int) -> Any:
    return Annotated[str, Meta(max_length=max_length)]


class ImportContact(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, gc=False):
    """One NDJSON line: the shape of a POST /v1/contacts item. A field left out keeps the stored
    value, null clears it."""

    external_id: Annotated[str, Meta(min_length=1, max_length=MAX_EXTERNAL_ID_CHARS)] | None = None
    email: _text(254) | None | UnsetType = UNSET  # type: ignore[valid-type]
    phone: _text(64) | None | UnsetType = UNSET  # type: ignore[valid-type]
    phone_region: _text(2) | None | UnsetType = UNSET  # type: ignore[valid-type]
    locale: _text(35) | None | UnsetType = UNSET  # type: ignore[valid-type]
    timezone: _text(64) | None | UnsetType = UNSET  # type: ignore[valid-type]
    whatsapp: _text(64) | None | UnsetType = UNSET  # type: ignore[valid-type]
    telegram_chat_id: _text(64) | None | UnsetType = UNSET  # type: ignore[valid-type]
    push_tokens: Annotated[list[_text(MAX_PUSH_TOKEN_CHARS)], Meta(max_length=MAX_PUSH_TOKENS)] | None | UnsetType = UNSET  # type: ignore[valid-type]
    attributes: Attributes | UnsetType = UNSET  # type: ignore[valid-type]


_ONE = msgspec.json.Decoder(ImportContact)
_MANY = msgspec.json.Decoder(list[ImportContact])
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_BLANK_LINE = re.compile(rb"(?:^|\n)[ \t\r]*\n")
_FIELDS_OF = operator.attrgetter(*FIELDS)


_TOO_DEEP = re.compile(r"Expected `bool \| int \| float \| str \| null`, got `(?:array|object)`")
_KEY = re.compile(r"Expected `str` of length <= (\d+) - at `key`")


def _line_problem(message: str) -> tuple[str, str]:
    """(field, reason) from msgspec's message about one line (inside attributes, it names no key:
    msgspec writes `[...]` for them)."""
    if m := _UNKNOWN.search(message):
        return m.group(1), "unknown field"
    m = AT_PATH.search(message)
    field = m.group(1) if m and m.group(1) else "row"
    if field.startswith("attributes"):
        field = "attributes"
        if _TOO_DEEP.search(message):
            return field, f"nested deeper than {lim.MAX_ATTRIBUTE_DEPTH} levels of objects and arrays"
        if k := _KEY.search(message):
            return field, f"a key is longer than {k.group(1)} characters"
    return field, decode_reason(message)


class NdjsonParser:
    """NDJSON bytes in (one contact object per line, blank lines skipped), chunks out."""

    format = "ndjson"
    header_read = True

    def __init__(self, chunk_rows: int) -> None:
        self.chunk_rows = chunk_rows
        self.blocks = Blocks()
        self.line = 0
        self.items: list[ImportContact | None] = []
        self.lines: list[int] = []
        self.bad: dict[int, tuple[str, str]] = {}
        self.size = 0

    def feed(self, data: bytes) -> list[Chunk]:
        return self._take(self.blocks.push(data))

    def finish(self) -> list[Chunk]:
        chunks = self._take(self.blocks.push(b"", final=True))
        if self.items:
            chunks.append(self._chunk(len(self.items)))
        return chunks

    def _take(self, blocks: list[bytes | None]) -> list[Chunk]:
        chunks = []
        for block in blocks:
            if block is None:
                self.line += 1
                self._hold([None], [self.line], {0: ("row", LONG_REASON)})
            else:
                self._parse(block)
            while len(self.items) >= self.chunk_rows or (self.items and self.size >= CHUNK_BYTES):
                chunks.append(self._chunk(min(len(self.items), self.chunk_rows)))
        return chunks

    def _parse(self, block: bytes) -> None:
        lines = block.split(b"\n")
        lines.pop()  # after the block's last newline
        numbers = range(self.line + 1, self.line + 1 + len(lines))
        self.line += len(lines)
        self.size += len(block)
        if b"\r" in block:
            lines = [line.rstrip(b"\r") for line in lines]
        numbers = list(numbers)
        if _BLANK_LINE.search(block):
            kept = [i for i, line in enumerate(lines) if line.strip()]
            lines, numbers = [lines[i] for i in kept], [numbers[i] for i in kept]
        bad: dict[int, tuple[str, str]] = {}
        if b"\\u0000" in block:
            for i, line in enumerate(lines):
                if _NUL_ESCAPE.search(line):
                    bad[i] = ("row", "cannot contain the character U+0000")
                    lines[i] = b"{}"
        try:
            items: list[ImportContact | None] = _MANY.decode(b"[" + b",".join(lines) + b"]")
            if len(items) != len(lines):
                raise msgspec.DecodeError("a line holds more than one value")
        except (msgspec.ValidationError, msgspec.DecodeError):
            items = []
            for i, line in enumerate(lines):
                try:
                    items.append(_ONE.decode(line))
                except (msgspec.ValidationError, msgspec.DecodeError) as e:
                    bad.setdefault(i, _line_problem(str(e)) if isinstance(e, msgspec.ValidationError)
                                   else ("row", f"not a JSON object: {e}"))
                    items.append(None)
        for i in bad:
            items[i] = None
        self._hold(items, numbers, bad)

    def _hold(self, items: list[ImportContact | None], lines: list[int], bad: dict[int, tuple[str, str]]) -> None:
        at = len(self.items)
        self.bad.update((at + i, v) for i, v in bad.items())
        self.items.extend(items)
        self.lines.extend(lines)

    def _chunk(self, n: int) -> Chunk:
        items, lines = self.items[:n], self.lines[:n]
        bad = {i: v for i, v in self.bad.items() if i < n}
        self.bad = {i - n: v for i, v in self.bad.items() if i >= n}
        del self.items[:n], self.lines[:n]
        self.size = self.size * len(self.items) // (len(self.items) + n)
        blank = ImportContact()
        contacts = [c if c is not None else blank for c in items]
        columns = dict(zip(FIELDS, map(list, zip(*map(_FIELDS_OF, contacts))))) if contacts else {}
        encode = msgspec.json.encode
        attributes = [None if c.attributes is UNSET else encode(c.attributes).decode() for c in contacts]
        return checked(Rows(lines, columns, attributes, bad), rows_read=n,
                       bytes_read=self.blocks.bytes_in - len(self.blocks.pending))
