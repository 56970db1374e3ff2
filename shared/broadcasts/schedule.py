"""Cron occurrences in a time zone, exactly once per local time, across DST changes.

croniter iterates naive local wall-clock times; each is then placed in the zone:
- a local time that occurs twice (fall back) is taken at its first occurrence only (fold=0), so
  it fires once;
- a local time that does not exist (spring forward) fires at the next valid minute.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from shared.kernel.limits import MAX_CRON_GAP_YEARS

UTC = timezone.utc
_DAY_MINUTES = 24 * 60
_SAMPLE_FROM, _SAMPLE_UNTIL = datetime(2000, 1, 1), datetime(2004, 1, 1)  # see _shortest_day_gap


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
    """The first occurrence of `expression` in zone `tz_name` strictly after the instant `after` (UTC).
    ValueError if there is none within MAX_CRON_GAP_YEARS (`0 0 31 2 *` never fires)."""
    tz = zone(tz_name)
    local_after = after.astimezone(tz).replace(tzinfo=None)
    # Start one hour back: after a fall back, wall time repeats, and an occurrence between the
    # repeated hour's two passes would otherwise be missed. Instants not after `after` are skipped.
    it = croniter(expression, local_after - timedelta(hours=1), max_years_between_matches=MAX_CRON_GAP_YEARS)
    while True:
        try:
            local = it.get_next(datetime)
        except CroniterBadDateError:
            raise ValueError(f"never fires: no occurrence within {MAX_CRON_GAP_YEARS} years") from None
        instant = _place(local, tz)
        if instant > after:
            return instant


def check_interval(expression: str, minimum: timedelta) -> None:
    """ValueError if `expression` can fire twice within less than `minimum`, in wall-clock time:
    two of its times on one day, or the last time of one day and the first of the next day it fires."""
    floor = minimum / timedelta(minutes=1)
    if floor <= 0:
        return
    times = _times_of_day(expression)
    gaps = [b - a for a, b in zip(times, times[1:])]
    span = times[-1] - times[0]
    if _DAY_MINUTES - span < floor:  # only then can it matter how soon the next day it fires comes
        gaps.append(_shortest_day_gap(expression) * _DAY_MINUTES - span)
    if gaps and (shortest := min(gaps)) < floor:
        raise ValueError(f"fires {_minutes(shortest)} apart at the shortest; the minimum interval is {_minutes(int(floor))}")


def _times_of_day(expression: str) -> list[int]:
    """The minutes after midnight at which `expression` fires on a day it fires (the same every day)."""
    minutes, hours = croniter(expression, _SAMPLE_FROM).expanded[:2]
    minutes = range(60) if minutes == ["*"] else minutes
    hours = range(24) if hours == ["*"] else hours
    return sorted(h * 60 + m for h in hours for m in minutes)


def _shortest_day_gap(expression: str) -> int:
    """The fewest days between two days `expression` fires on, over the four years from a fixed date
    (a leap cycle; fixed, so that whether a schedule is valid does not depend on when it is checked)."""
    days = " ".join(expression.split()[2:])
    it = croniter(f"0 0 {days}", _SAMPLE_FROM, max_years_between_matches=MAX_CRON_GAP_YEARS)
    previous, gaps = it.get_next(datetime), []
    while previous < _SAMPLE_UNTIL and 1 not in gaps:
        day = it.get_next(datetime)
        gaps.append((day - previous).days)
        previous = day
    return min(gaps)


def _minutes(n: int) -> str:
    if n % 60:
        return f"{n} minute{'s' if n != 1 else ''}"
    hours = n // 60
    return f"{hours} hour{'s' if hours != 1 else ''}"
