"""Stream names: `<category>-<id>`, built and taken apart here and nowhere else.

The category (the part before the first `-`) says which aggregate a stream belongs to; readers
filter on it and NATS subjects carry it. An id may itself contain `-` (a UUID does).
"""
from __future__ import annotations

SEPARATOR = "-"


def stream_name(category: str, stream_id: object) -> str:
    return f"{category}{SEPARATOR}{stream_id}"


def category_of(stream_name: str) -> str:
    return stream_name.split(SEPARATOR, 1)[0]


def id_of(stream_name: str) -> str:
    """The id part of `stream_name`; ValueError if it has none."""
    category, sep, stream_id = stream_name.partition(SEPARATOR)
    if not sep or not stream_id:
        raise ValueError(f"not a stream name: {stream_name!r}")
    return stream_id
