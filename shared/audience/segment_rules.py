"""The rule language of segments (pure): its parsed form, its bounds, and how a string is a time.

A rule is `{"all": [...]}`, `{"any": [...]}`, `{"not": rule}`, a condition `{"field", "op", "value"}`,
`{"member_of": "<list or segment id>"}` or `{"any_of": "attributes.<path>", "where": rule}` (a rule over
the fields of the array's elements). README.md, "Segments", is the user's description; segments.py
compiles and evaluates it. Every input is bounded (the MAX_* below): a rule cannot make a query run away.
"""
from __future__ import annotations

import calendar
import math
import re
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Union

import msgspec

from shared.kernel.errors import Invalid
from shared.kernel.limits import MAX_ATTRIBUTE_DEPTH

MAX_RULES_BYTES = 64 * 1024  # the rules as JSON
MAX_DEPTH = 8  # levels of all / any / not / any_of
MAX_CONDITIONS = 100  # conditions (field, member_of, any_of) in one segment's rules
MAX_IN_VALUES = 1000  # values of one `in` / `not_in`
MAX_VALUE_CHARS = 1000  # a string value
MAX_FIELD_CHARS = 300
MAX_PATH_PARTS = MAX_ATTRIBUTE_DEPTH  # attributes are at most this deep
MAX_RELATIVE = timedelta(days=36_600)  # "-100000d" is a typo

PATH_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
TEXT_COLUMNS = ("external_id", "email", "phone", "locale", "timezone", "whatsapp", "telegram_chat_id")
TIME_COLUMNS = ("created_at", "updated_at")
ARRAY_COLUMNS = ("push_tokens",)
COLUMNS = (*TEXT_COLUMNS, *TIME_COLUMNS, *ARRAY_COLUMNS)
OPS = ("eq", "ne", "in", "not_in", "contains", "starts_with", "exists", "gt", "gte", "lt", "lte", "between")
ORDER_OPS = ("gt", "gte", "lt", "lte", "between")
# What each kind of field takes: op -> the kinds of value it compares. Strings are compared by
# equality, prefix and substring only (an order would depend on a collation).
_TEXT_OPS = {op: ("text",) for op in ("eq", "ne", "in", "not_in", "contains", "starts_with")}
_TIME_OPS = {op: ("time",) for op in ORDER_OPS}
_ARRAY_OPS = {"contains": ("text",)}
_JSON_OPS = {
    **{op: ("text", "number", "bool") for op in ("eq", "ne", "in", "not_in", "contains")},
    "starts_with": ("text",),
    **{op: ("number", "time") for op in ORDER_OPS},
}


# -- the parsed rule -------------------------------------------------------------------------------
class Column(msgspec.Struct, frozen=True):
    name: str  # one of COLUMNS


class JsonPath(msgspec.Struct, frozen=True):
    parts: tuple[str, ...]  # from the attributes, or inside `any_of`'s `where` from the element


class Moment(msgspec.Struct, frozen=True):
    """A time: fixed (`at`, UTC), or `offset` from the `now` of a compile or an evaluation."""

    at: datetime | None = None
    offset: timedelta | None = None

    def resolve(self, now: datetime) -> datetime:
        return self.at if self.at is not None else now + self.offset  # type: ignore[operator]


class Condition(msgspec.Struct, frozen=True):
    field: Column | JsonPath
    op: str
    kind: str  # of the value: "text", "number" (a Decimal), "bool", "time" (a Moment); "exists": "none"
    value: Any  # one of that kind; a tuple for in, not_in and between; for exists a bool (False: absent)


class All(msgspec.Struct, frozen=True):
    rules: tuple[Rule, ...]


class Some(msgspec.Struct, frozen=True):
    rules: tuple[Rule, ...]


class Not(msgspec.Struct, frozen=True):
    rule: Rule


class MemberOf(msgspec.Struct, frozen=True):
    id: uuid.UUID
    at: str  # where in the rules it stands (`rules.all[2].member_of`), for faults found when resolved


class AnyElement(msgspec.Struct, frozen=True):
    path: JsonPath
    where: Rule


Rule = Union[All, Some, Not, Condition, MemberOf, AnyElement]


# -- times: Postgres' reading of an ISO 8601 string ------------------------------------------------
# The one form of a time in a string that both sides read: `date[(T| )hh:mm[:ss[.ffffff]][offset]]`.
# segment_timestamp() (017_segments.sql) accepts exactly these shapes and leaves the values to
# Postgres' timestamptz input; iso_instant() follows that input where Python's fromisoformat does
# not (24:00, a 60th second, offsets up to ±15:59 only). A time without an offset is UTC.
ISO_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"(?:[T ]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,6}))?)?(Z|([+-])([0-9]{2})(?::?([0-9]{2}))?)?)?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_DAY = date(1970, 1, 1).toordinal()


def iso_instant(text: str) -> timedelta | None:
    """The time `text` says, as its distance from the epoch (no datetime, which ends in year 9999),
    read as Postgres reads it into a timestamptz; None when it is not of the ISO form or Postgres
    refuses it."""
    m = ISO_TIME.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction, zone, sign, zone_h, zone_m = m.groups()
    y, mo, d = int(year), int(month), int(day)
    if y < 1 or not 1 <= mo <= 12 or not 1 <= d <= calendar.monthrange(y, mo)[1]:
        return None
    h, mi, s = int(hour or 0), int(minute or 0), int(second or 0)
    micro = int((fraction or "").ljust(6, "0"))
    # Postgres' time_overflows(): each field in range, and the time of day at most 24:00:00 in all
    # (so 24:00 is the next midnight, 10:30:60.5 is 10:31:00.5, but 23:59:60.5 is refused)
    if h > 24 or mi > 59 or s > 60 or ((h * 60 + mi) * 60 + s) * 1_000_000 + micro > 86_400_000_000:
        return None
    offset = 0
    if sign:
        oh, om = int(zone_h), int(zone_m or 0)
        if oh > 15 or om > 59:
            return None
        offset = (oh * 60 + om) * (1 if sign == "+" else -1)
    return timedelta(days=date(y, mo, d).toordinal() - _EPOCH_DAY, hours=h, minutes=mi - offset, seconds=s,
                     microseconds=micro)


def instant(at: datetime) -> timedelta:
    """An aware datetime as its distance from the epoch."""
    return at - _EPOCH


_RELATIVE = re.compile(r"([+-])([0-9]{1,6})([mhdw])")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def _moment(raw: str, at: str) -> Moment:
    if raw == "now":
        return Moment(offset=timedelta(0))
    if m := _RELATIVE.fullmatch(raw):
        offset = int(m.group(2)) * _UNITS[m.group(3)] * (-1 if m.group(1) == "-" else 1)
        if abs(offset) > MAX_RELATIVE:
            raise Invalid(at, f"a relative time may reach at most {MAX_RELATIVE.days} days away")
        return Moment(offset=offset)
    if ISO_TIME.fullmatch(raw):
        distance = iso_instant(raw)
        try:
            if distance is not None:
                return Moment(at=_EPOCH + distance)
        except OverflowError:
            pass
        raise Invalid(at, "is not a valid date and time")
    raise Invalid(at, "must be a time: ISO 8601 (2026-04-01, 2026-04-01T09:00:00+02:00) or relative "
                      "(now, or a sign, a number and m, h, d or w: -30d, +2h)")


# -- parsing ---------------------------------------------------------------------------------------
_SHAPES = {"all": {"all"}, "any": {"any"}, "not": {"not"}, "field": {"field", "op", "value"},
           "member_of": {"member_of"}, "any_of": {"any_of", "where"}}
_SHAPE_LIST = "all, any, not, field (with op and value), member_of, any_of (with where)"


def parse_rules(raw: Any, at: str = "rules") -> Rule:
    """The rules of a segment, checked; Invalid(field, reason) names the first fault by its path in
    the request (`rules.any[2].op`)."""
    try:
        size = len(msgspec.json.encode(raw))
    except (TypeError, RecursionError, msgspec.EncodeError):
        raise Invalid(at, "must be JSON") from None
    if size > MAX_RULES_BYTES:
        raise Invalid(at, f"must be at most {MAX_RULES_BYTES:,} bytes as JSON, not {size:,}")
    return _Parser().rule(raw, at, 1, element=False)


class _Parser:
    def __init__(self) -> None:
        self.conditions = 0

    def rule(self, raw: Any, at: str, depth: int, element: bool) -> Rule:
        if depth > MAX_DEPTH:
            raise Invalid(at, f"rules may be nested at most {MAX_DEPTH} levels deep")
        if not isinstance(raw, dict):
            raise Invalid(at, f"must be an object with one of {_SHAPE_LIST}")
        shapes = [s for s in _SHAPES if s in raw]
        if len(shapes) != 1:
            raise Invalid(at, f"must have exactly one of {_SHAPE_LIST}")
        shape = shapes[0]
        for key in raw:
            if key not in _SHAPES[shape]:
                raise Invalid(f"{at}.{str(key)[:64]}", "unknown field")
        if shape in ("all", "any"):
            items = raw[shape]
            if not isinstance(items, list):
                raise Invalid(f"{at}.{shape}", "must be an array of rules")
            rules = tuple(self.rule(r, f"{at}.{shape}[{i}]", depth + 1, element) for i, r in enumerate(items))
            return All(rules) if shape == "all" else Some(rules)
        if shape == "not":
            return Not(self.rule(raw["not"], f"{at}.not", depth + 1, element))
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise Invalid(at, f"rules may have at most {MAX_CONDITIONS} conditions")
        if shape == "member_of":
            if element:
                raise Invalid(f"{at}.member_of", "is about a contact: not allowed inside any_of's where")
            return MemberOf(_uuid(raw["member_of"], f"{at}.member_of"), f"{at}.member_of")
        if shape == "any_of":
            path = _field(raw["any_of"], f"{at}.any_of", element, json_only=True)
            if "where" not in raw:
                raise Invalid(f"{at}.where", "required field missing")
            return AnyElement(path, self.rule(raw["where"], f"{at}.where", depth + 1, element=True))  # type: ignore[arg-type]
        return _condition(raw, at, element)


def _uuid(raw: Any, at: str) -> uuid.UUID:
    if isinstance(raw, str) and len(raw) <= 36:
        try:
            return uuid.UUID(raw)
        except ValueError:
            pass
    raise Invalid(at, "must be the id (a UUID) of a list or a segment")


def _field(raw: Any, at: str, element: bool, json_only: bool = False) -> Column | JsonPath:
    if not isinstance(raw, str) or not raw or len(raw) > MAX_FIELD_CHARS:
        raise Invalid(at, "must be a field name such as `email` or `attributes.plan`")
    parts = raw.split(".")
    if not element:
        if raw in COLUMNS and not json_only:
            return Column(raw)
        if parts[0] != "attributes" or len(parts) == 1:
            fields = "" if json_only else ", ".join(COLUMNS) + " or "
            raise Invalid(at, f"must be {fields}attributes.<path>")
        parts = parts[1:]
    if len(parts) > MAX_PATH_PARTS:
        raise Invalid(at, f"a path may have at most {MAX_PATH_PARTS} parts")
    for part in parts:
        if not PATH_PART.fullmatch(part):
            raise Invalid(at, f"each part of a path must match ^{PATH_PART.pattern}$")
    return JsonPath(tuple(parts))


def _condition(raw: dict[str, Any], at: str, element: bool) -> Condition:
    field = _field(raw["field"], f"{at}.field", element)
    op = raw.get("op")
    if op not in OPS:
        raise Invalid(f"{at}.op", f"must be one of {', '.join(OPS)}")
    if op == "exists":
        want = raw.get("value", True)
        if not isinstance(want, bool):
            raise Invalid(f"{at}.value", "exists takes no value, or true or false")
        return Condition(field, op, "none", want)
    if isinstance(field, Column):
        name = field.name
        ops = _TEXT_OPS if name in TEXT_COLUMNS else _TIME_OPS if name in TIME_COLUMNS else _ARRAY_OPS
        if op not in ops:
            raise Invalid(f"{at}.op", f"{name} takes {', '.join(['exists', *ops])}")
        kinds = ops[op]
    else:
        kinds = _JSON_OPS[op]
    if "value" not in raw:
        raise Invalid(f"{at}.value", "required field missing")
    value = raw["value"]
    if op in ("in", "not_in"):
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_IN_VALUES:
            raise Invalid(f"{at}.value", f"{op} takes an array of 1 to {MAX_IN_VALUES} values")
        typed = [_value(v, kinds, op, f"{at}.value[{i}]") for i, v in enumerate(value)]
        if len({k for k, _ in typed}) > 1:
            raise Invalid(f"{at}.value", f"the values of {op} must all be of one type")
        return Condition(field, op, typed[0][0], tuple(v for _, v in typed))
    if op == "between":
        if not isinstance(value, list) or len(value) != 2:
            raise Invalid(f"{at}.value", "between takes [low, high] (both included)")
        (k1, low), (k2, high) = (_value(v, kinds, op, f"{at}.value[{i}]") for i, v in enumerate(value))
        if k1 != k2:
            raise Invalid(f"{at}.value", "between takes two numbers or two times")
        return Condition(field, op, k1, (low, high))
    kind, typed_value = _value(value, kinds, op, f"{at}.value")
    return Condition(field, op, kind, typed_value)


_KIND_NAMES = {"text": "a string", "number": "a number", "bool": "true or false",
               "time": "a time (ISO 8601 such as 2026-04-01 or 2026-04-01T09:00:00Z, or relative: now, -30d, +2h)"}


def _value(raw: Any, kinds: tuple[str, ...], op: str, at: str) -> tuple[str, Any]:
    """(kind, value) of one value of a condition; `kinds` are those the field and op take."""
    if "time" in kinds and isinstance(raw, str):
        return "time", _moment(raw, at)
    if isinstance(raw, bool):
        if "bool" in kinds:
            return "bool", raw
    elif isinstance(raw, (int, float)):
        if "number" in kinds:
            if isinstance(raw, float) and not math.isfinite(raw):
                raise Invalid(at, "must be a finite number")
            return "number", Decimal(repr(raw)) if isinstance(raw, float) else Decimal(raw)
    elif isinstance(raw, str):
        if "text" in kinds:
            if len(raw) > MAX_VALUE_CHARS:
                raise Invalid(at, f"must be at most {MAX_VALUE_CHARS} characters")
            if "\x00" in raw:
                raise Invalid(at, "cannot contain the character U+0000")
            return "text", raw
    raise Invalid(at, f"{op} here takes {' or '.join(_KIND_NAMES[k] for k in kinds)}")


def referenced(rule: Rule) -> list[MemberOf]:
    """Every member_of in the rule, in order."""
    match rule:
        case All(rules) | Some(rules):
            return [m for r in rules for m in referenced(r)]
        case Not(inner):
            return referenced(inner)
        case MemberOf():
            return [rule]
    return []  # conditions; any_of's where has no member_of
