"""The wall clock, in one place so that tests and services pass it in as a function."""
from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
