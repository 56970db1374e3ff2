"""Contact import files read incrementally (pure): CSV or NDJSON bytes in, in pieces of any size;
chunks of checked rows out (shared/audience/import_checks.py).

Bytes are cut into blocks of whole lines (import_lines: a line over 1 MiB is rejected unread), parsed
(import_csv, import_ndjson), and checked column by column (import_checks). Rejections name the line
a row starts on; a CSV's header is line 1.

CSV columns: the header names them. `external_id, email, phone, phone_region, locale, timezone,
whatsapp, telegram_chat_id, push_tokens` (any case) are the contact's fields; `phone_region` is the
region of national phone and WhatsApp numbers (`DE`), not stored; `push_tokens` is a list
separated by spaces or semicolons. Every other column is an attribute, a string; `attributes.NAME`
names an attribute explicitly (also one called like a field), and a suffix types it:
`NAME:number` (a JSON number), `NAME:boolean` (true/false, yes/no, 1/0), `NAME:json` (any JSON
value), `NAME:string`. A column with an empty name is ignored. An empty cell is "not given": the
stored value is kept (to clear a field, import NDJSON with null).
"""
from __future__ import annotations

from shared.audience.import_csv import CsvParser, HeaderError
from shared.audience.import_ndjson import NdjsonParser

__all__ = ["CHUNK_ROWS", "HeaderError", "Parser", "parser_for"]

CHUNK_ROWS = 50_000  # rows merged together: two transactions at once (shared/audience/imports.py)

Parser = CsvParser | NdjsonParser


def parser_for(format: str, chunk_rows: int | None = None) -> Parser:
    chunk_rows = chunk_rows or CHUNK_ROWS  # read now: tests make chunks smaller
    return CsvParser(chunk_rows) if format == "csv" else NdjsonParser(chunk_rows)
