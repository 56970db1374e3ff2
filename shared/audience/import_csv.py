"""CSV contact imports read incrementally (pure): bytes in, chunks of checked rows out.

Each block of whole lines goes through the csv module (C) in one call. A record that a quoted field
carries past the block's end is told by a sentinel line after the block (it then ends inside the
record), and read again with the next block. Records are numbered by the file's lines: the header
is line 1, a record is reported at the line it starts on. The rows held for the next chunk are kept
as columns, so each row's list dies young (50,000 lists kept a while cost a full garbage collection
after another: 15% of the parsing time, measured).

The header's names: see shared/audience/import_formats.py.
"""
from __future__ import annotations

import csv
import io
import itertools
import re
from typing import Any

import msgspec
from msgspec import UNSET

from shared.audience.import_checks import (
    ATTRIBUTE_VALUE,
    FIELDS,
    Chunk,
    Rows,
    checked,
    decode_reason,
)
from shared.audience.import_lines import CHUNK_BYTES, LONG_REASON, Blocks
from shared.kernel import limits as lim

MAX_COLUMNS = 200
KINDS = ("string", "number", "boolean", "json")


class HeaderError(Exception):
    """The CSV header cannot be read: nothing is imported."""

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


_SENTINEL = "\x00crier:end\x00"  # a record no file gives (rows with U+0000 are rejected)
_SURROGATE = re.compile("[\udc80-\udcff]")
_JSON_UNSAFE = re.compile(r'["\\\x00-\x1f]')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_BOOLEANS = {"true": "true", "false": "false", "yes": "true", "no": "false", "1": "true", "0": "false"}


class _Layout:
    """What the header says: the column of each field, and the attribute columns."""

    def __init__(self, names: list[str]) -> None:
        if len(names) > MAX_COLUMNS:
            raise HeaderError("header", f"at most {MAX_COLUMNS} columns, not {len(names)}")
        self.width = len(names)
        self.fields: dict[str, int] = {}
        self.attributes: list[tuple[int, str, str]] = []  # (column, key, kind)
        keys: set[str] = set()
        for i, raw in enumerate(names):
            name = raw.strip()
            if not name:
                continue
            if "\x00" in name or _SURROGATE.search(name):
                raise HeaderError("header", f"column {i + 1}: not a name (U+0000 or not UTF-8)")
            if name.lower() in FIELDS:
                if name.lower() in self.fields:
                    raise HeaderError(f"header.{name}", "the column appears twice")
                self.fields[name.lower()] = i
                continue
            key, kind = name.removeprefix("attributes."), "string"
            base, colon, suffix = key.rpartition(":")
            if colon and suffix.lower() in KINDS:
                key, kind = base, suffix.lower()
            if not key or len(key) > lim.MAX_ATTRIBUTE_KEY_CHARS:
                raise HeaderError(f"header.{name}", f"an attribute name has 1 to {lim.MAX_ATTRIBUTE_KEY_CHARS} characters")
            if key in keys:
                raise HeaderError(f"header.{name}", f"the attribute {key!r} appears twice")
            keys.add(key)
            self.attributes.append((i, key, kind))
        if len(self.attributes) > lim.MAX_ATTRIBUTE_KEYS:
            raise HeaderError("header", f"at most {lim.MAX_ATTRIBUTE_KEYS} attribute columns, not {len(self.attributes)}")
        if "external_id" not in self.fields and "email" not in self.fields:
            raise HeaderError("header", "needs an external_id or an email column: rows are matched to contacts by them")


class CsvParser:
    """CSV bytes in, chunks out. Rows of a chunk are held as the csv module gives them (lists of str)."""

    format = "csv"

    def __init__(self, chunk_rows: int) -> None:
        self.chunk_rows = chunk_rows
        self.blocks = Blocks()
        self.layout: _Layout | None = None
        self.line = 0  # lines read, up to the last whole record
        self.carry, self.carry_lines = "", 0  # the lines of a record a quoted field carries on
        # The rows held for the next chunk, as columns: a row's list dies young, which spares the
        # garbage collector (50,000 lists held a while cost a full collection after another).
        self.cells: list[list[str]] = []
        self.lines: list[int] = []
        self.bad: dict[int, tuple[str, str]] = {}  # index in the held rows -> (field, reason)
        self.size = 0  # bytes of the records held
        self.rows_read = 0

    @property
    def header_read(self) -> bool:
        return self.layout is not None

    def feed(self, data: bytes) -> list[Chunk]:
        return self._take(self.blocks.push(data))

    def finish(self) -> list[Chunk]:
        chunks = self._take(self.blocks.push(b"", final=True), final=True)
        if self.carry:  # a quoted field never closed
            self._reject_record(self.line + 1, "row", "a quoted field is not closed before the end of the file")
            self.carry, self.carry_lines = "", 0
        if self.layout is None:
            raise HeaderError("header", "the file is empty: a CSV import needs a header row")
        if self.lines:
            chunks.append(self._chunk(len(self.lines)))
        return chunks

    def _take(self, blocks: list[bytes | None], final: bool = False) -> list[Chunk]:
        chunks = []
        for k, block in enumerate(blocks):
            if block is None:
                first = self.line + 1
                self.line += self.carry_lines + 1
                self.carry, self.carry_lines = "", 0
                self._reject_record(first, "row", LONG_REASON)
            else:
                self._parse(block, final and k == len(blocks) - 1)
            while len(self.lines) >= self.chunk_rows or (self.lines and self.size >= CHUNK_BYTES):
                chunks.append(self._chunk(min(len(self.lines), self.chunk_rows)))
        return chunks

    def _parse(self, block: bytes, last: bool) -> None:
        try:
            text, bad_utf8 = block.decode(), False
        except UnicodeDecodeError:
            text, bad_utf8 = block.decode(errors="surrogateescape"), True
        source, first = self.carry + text, self.line + 1
        records, starts, read = _records(source, first)
        starts_given = starts is not None  # the slow path: a record over lines, or one the csv module refused
        if starts is None:
            starts = list(range(first, first + len(records)))
        complete = records[-1] == [_SENTINEL]
        records.pop()  # the sentinel, or the record still open at the end
        begin = starts.pop()
        self.carry, self.carry_lines, self.line = "", 0, first - 1 + read
        if not complete and last:
            records.append(("row", "a quoted field is not closed before the end of the file"))
            starts.append(begin)
        elif not complete:  # a quoted field goes on past the block: read its record again with the next block
            lines = io.StringIO(source, newline="").readlines()
            self.carry, self.carry_lines = "".join(lines[begin - first :]), first + read - begin
            self.line = begin - 1
        self.size += len(block)
        self._hold(records, starts, bad_utf8, "\x00" in text, refused=not complete or starts_given)

    def _hold(self, records: list[Any], starts: list[int], bad_utf8: bool, nul: bool, refused: bool) -> None:
        if [] in records:  # blank lines
            kept = [i for i, r in enumerate(records) if r]
            records, starts = [records[i] for i in kept], [starts[i] for i in kept]
        if not records:
            return
        if self.layout is None:
            header = records[0]
            if header.__class__ is not list:
                raise HeaderError("header", header[1])
            self.layout = _Layout(header)
            self.cells = [[] for _ in range(self.layout.width)]
            records, starts = records[1:], starts[1:]
            if not records:
                return
        width = self.layout.width
        problems: dict[int, tuple[str, str]] = {}
        if nul or bad_utf8 or refused or set(map(len, records)) != {width}:
            for i, record in enumerate(records):
                if record.__class__ is not list:  # a csv.Error: (field, reason)
                    problems[i] = record
                elif len(record) > width:
                    problems[i] = ("row", f"has {len(record)} fields, the header {width}")
                elif (nul or bad_utf8) and (problem := _text_problem(record, bad_utf8)):
                    problems[i] = problem
                elif len(record) < width:
                    record.extend([""] * (width - len(record)))  # cells left out are not given
        blank = [""] * width
        if blank in records:  # rows of empty cells only (a spreadsheet's last rows), like blank lines
            kept = [i for i, r in enumerate(records) if r != blank or i in problems]
            problems = {k: problems[i] for k, i in enumerate(kept) if i in problems}
            records, starts = [records[i] for i in kept], [starts[i] for i in kept]
        at = len(self.lines)
        for i, problem in problems.items():
            self.bad[at + i] = problem
            records[i] = blank
        for column, cells in zip(self.cells, zip(*records)):
            column.extend(cells)
        self.lines.extend(starts)
        self.rows_read += len(records)

    def _reject_record(self, line: int, field: str, reason: str) -> None:
        if self.layout is None:
            raise HeaderError("header", reason)
        self.bad[len(self.lines)] = (field, reason)
        for column in self.cells:
            column.append("")
        self.lines.append(line)
        self.rows_read += 1

    def _chunk(self, n: int) -> Chunk:
        assert self.layout is not None
        cells, lines = [column[:n] for column in self.cells], self.lines[:n]
        bad = {i: v for i, v in self.bad.items() if i < n}
        self.bad = {i - n: v for i, v in self.bad.items() if i >= n}
        for column in self.cells:
            del column[:n]
        del self.lines[:n]
        self.size = self.size * len(self.lines) // (len(self.lines) + n)
        rows = _csv_rows(self.layout, cells, lines, bad)
        return checked(rows, rows_read=n, bytes_read=self.blocks.bytes_in - len(self.blocks.pending))


def _records(text: str, first: int) -> tuple[list[Any], list[int] | None, int]:
    """The records of whole lines of text, the last one the sentinel record unless a quoted field is
    still open at the end; the line each starts on (None: each takes one line, from `first`); and the
    lines read. A record the csv module refuses (a field over its limit) is a (field, reason)."""
    reader = csv.reader(itertools.chain(io.StringIO(text, newline=""), (_SENTINEL + "\n",)))
    try:
        records: list[Any] | None = list(reader)
    except csv.Error:
        records = None
    if records is not None and reader.line_num == len(records):
        return records, None, len(records) - 1  # one line a record: line numbers need no bookkeeping
    reader = csv.reader(itertools.chain(io.StringIO(text, newline=""), (_SENTINEL + "\n",)))
    records, starts, before = [], [], 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            record = ("row", str(e))
        records.append(record)
        starts.append(first + before)
        before = reader.line_num
    return records, starts, reader.line_num - 1


def _edge_spaces(column: list[str]) -> bool:
    """Whether a cell starts or ends with a space or tab (str methods: a regex took ten times longer)."""
    joined = "\n".join(column)
    if " " not in joined and "\t" not in joined:
        return False
    return joined[:1] in (" ", "\t") or joined[-1:] in (" ", "\t") or any(
        pair in joined for pair in (" \n", "\n ", "\t\n", "\n\t"))


def _json_safe(text: str) -> bool:
    """Whether the text goes into a JSON string as it is: no quote, backslash or control character."""
    if '"' in text or "\\" in text:
        return False
    return text.isprintable() or not _JSON_UNSAFE.search(text)


def _text_problem(record: list[str], bad_utf8: bool) -> tuple[str, str] | None:
    joined = "".join(record)
    if "\x00" in joined:
        return "row", "cannot contain the character U+0000"
    if bad_utf8 and _SURROGATE.search(joined):
        return "row", "not valid UTF-8"
    return None


def _csv_rows(layout: _Layout, cells: list[list[str]], lines: list[int], bad: dict[int, tuple[str, str]]) -> Rows:
    """The cells as the fields' columns: an empty cell is not given; edge spaces are trimmed off."""
    n = len(lines)
    columns: dict[str, list[Any]] = {}
    for field, at in layout.fields.items():
        column: Any = cells[at]
        if _edge_spaces(column):
            column = [v.strip() for v in column]
        missing = None if field == "external_id" else UNSET
        columns[field] = [v or missing for v in column] if "" in column else list(column)
    return Rows(lines, columns, _attribute_objects(layout, cells, n, bad), bad)


def _attribute_objects(layout: _Layout, cells: list[Any], n: int, bad: dict[int, tuple[str, str]]) -> list[str | None]:
    """Each row's attributes as a JSON object (None: no attribute given), written from a template
    where the values need no escaping, which is almost always."""
    if not layout.attributes:
        return [None] * n
    slots, values, sparse = [], [], set()
    for at, key, kind in layout.attributes:
        column = cells[at]
        if kind == "string" and _json_safe("".join(column)):
            slot, rendered = '"%s"', column
        elif kind == "string":
            slot, rendered = "%s", [msgspec.json.encode(v).decode() if v else "" for v in column]
        else:
            slot, rendered = "%s", _typed(kind, key, column, bad)
        if "" in rendered:
            sparse.update(i for i, v in enumerate(rendered) if not v)
        slots.append((msgspec.json.encode(key).decode(), slot))
        values.append(rendered)
    template = "{" + ",".join(k.replace("%", "%%") + ":" + slot for k, slot in slots) + "}"
    objects: list[str | None] = [template % row for row in zip(*values)]
    for i in sparse:  # rows with empty cells: only the attributes given
        given = [f"{k}:{slot % v}" for (k, slot), v in zip(slots, (column[i] for column in values)) if v]
        objects[i] = "{" + ",".join(given) + "}" if given else None
    return objects


def _typed(kind: str, key: str, column: Any, bad: dict[int, tuple[str, str]]) -> list[str]:
    """A typed column's cells as JSON values ("" where empty or wrong; a wrong cell rejects its row)."""
    out = []
    field = f"attributes.{key}"
    for i, cell in enumerate(column):
        value = cell.strip()
        if not value:
            out.append("")
        elif kind == "number" and _NUMBER.fullmatch(value):
            out.append(value)
        elif kind == "boolean" and value.lower() in _BOOLEANS:
            out.append(_BOOLEANS[value.lower()])
        elif kind == "json":
            try:
                out.append(msgspec.json.encode(ATTRIBUTE_VALUE.decode(value)).decode())
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                bad.setdefault(i, (field, f"not a JSON value within the attribute limits: {decode_reason(str(e))}"))
                out.append("")
        else:
            bad.setdefault(i, (field, f"not a {kind}" + (" (true/false, yes/no, 1/0)" if kind == "boolean" else "")))
            out.append("")
    return out
