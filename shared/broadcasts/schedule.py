"""Cron occurrences in a time zone, exactly once per local time, across DST changes.

croniter iterates naive local wall-clock times; each is then placed in the zone:
- a local time that occurs twice (fall back) is taken at its first occurrence only (fold=0), so
  it fires once;
- a local time that does not exist (spring forward) fires at the next valid minute.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

UTC = timezone.utc


def zone(name: str) -> ZoneInfo:
    """The IANA zone `name`; ValueError if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def check_cron(expression: str) -> None:
    """ValueError unless `expression` is a valid 5-field cron expression."""
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        raise ValueError("not a valid 5-field cron expression")


def _exists(local: datetime, tz: ZoneInfo) -> bool:
    aware = local.replace(tzinfo=tz, fold=0)
    return aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == local


def _place(local: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant of local wall time `local`; a time in a DST gap moves to the next valid minute."""
    while not _exists(local, tz):
        local += timedelta(minutes=1)
    return local.replace(tzinfo=tz, fold=0).astimezone(UTC)


def next_occurrence(expression: str, tz_name: str, after: datetime) -> datetime:
    """The first occurrence of `expression` in zone `tz_name` strictly after the instant `after` (UTC)."""
    tz = zone(tz_name)
    local_after = after.astimezone(tz).replace(tzinfo=None)
    # Start one hour back: after a fall back, wall time repeats, and an occurrence between the
    # repeated hour's two passes would otherwise be missed. Instants not after `after` are skipped.
    it = croniter(expression, local_after - timedelta(hours=1))
    while True:
        instant = _place(it.get_next(datetime), tz)
        if instant > after:
            return instant
