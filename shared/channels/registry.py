"""Builds a provider session from a stored provider row's kind and config."""
from __future__ import annotations

from typing import Any

from shared.channels.null import NullProvider
from shared.channels.provider import Provider
from shared.channels.smtp import SmtpProvider

KINDS: dict[str, Any] = {"smtp": SmtpProvider, "null": NullProvider}


def build_provider(kind: str, config: dict[str, Any]) -> Provider:
    """A fresh, unopened provider: build one per job, it holds that job's connection."""
    try:
        cls = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown provider kind {kind!r}; known: {', '.join(sorted(KINDS))}") from None
    return cls(config)
