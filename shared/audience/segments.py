"""Segments (pure): a rule over a tenant's contacts compiled to parameterised SQL, and evaluated in
Python with the same semantics (the language and its parsing: segment_rules.py).

Two choices make the SQL and the Python agree exactly (tests/test_segments.py checks it with hypothesis):
- every condition is two-valued: a field that is missing, null or of another type than the rule's value
  fails every comparison, `ne` and `not_in` too (`{"not": ...}` is how to include the missing), and
  the SQL of each condition is `(...) IS TRUE`, so that SQL's NULL never reaches a `NOT`;
- only what both sides read alike is compared: strings by equality, prefix and substring (never by
  collation order), numbers as decimals, and a string is a time only in the ISO 8601 form both read
  (segment_rules.iso_instant; Postgres' timestamptz input alone would take `now` or `yesterday`).

No text of a rule ever becomes SQL: columns come from a fixed table, a path's parts are checked
against PATH_PART and sent as a text[] parameter like every value. The SQL stays bounded once the
segments a rule uses are inlined: MAX_SEGMENT_NESTING deep, MAX_EXPANDED_CONDITIONS in all.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Final, Literal, Union

import msgspec

from shared.audience.segment_rules import (
    ARRAY_COLUMNS,
    All,
    AnyElement,
    Column,
    Condition,
    JsonPath,
    MemberOf,
    Moment,
    Not,
    Rule,
    Some,
    instant,
    iso_instant,
    parse_rules,
    referenced,
)
from shared.kernel.errors import Invalid

__all__ = ["LIST", "SqlArgs", "Resolve", "Rule", "parse_rules", "compile_rule", "evaluate", "check_references",
           "referenced", "MAX_SEGMENT_NESTING", "MAX_EXPANDED_CONDITIONS"]

MAX_SEGMENT_NESTING = 3  # a segment using a segment using a segment using a segment
MAX_EXPANDED_CONDITIONS = 500  # conditions once every segment used is inlined
LIST: Final = "list"
# What an id of `member_of` names: a list of the tenant's (LIST), a segment of the tenant's (its rule),
# or nothing (None: another tenant's, or deleted), which matches nobody.
Resolve = Callable[[uuid.UUID], Union[Rule, Literal["list"], None]]

_SQL_OPS = {"eq": "=", "ne": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_CASTS = {"text": "text", "number": "numeric", "bool": "bool", "time": "timestamptz"}
_ALIAS = re.compile(r"[a-z_][a-z0-9_]{0,30}")
_CAST = re.compile(r"[a-z]+(\[\])?")
_JSON = msgspec.json.Encoder(decimal_format="number")
# A time in a string is within a day of its date part whatever its offset (±15:59) or rollover (24:00);
# two days of margin make the date part a safe and cheap first test before the string is parsed.
_MARGIN = timedelta(days=2)


class SqlArgs:
    """The positional parameters of a statement: `add` appends one and returns its placeholder."""

    def __init__(self, existing: list[Any] | None = None) -> None:
        self.values: list[Any] = existing if existing is not None else []

    def add(self, value: Any, cast: str) -> str:
        assert _CAST.fullmatch(cast), cast
        self.values.append(value)
        return f"${len(self.values)}::{cast}"


class _Nesting:
    """Inlining the segments a rule uses, bounded: the segments being inlined (after the one the rule
    is, if known), and the conditions counted. A fault inside an inlined segment is reported at the
    member_of of the rule being compiled that led there (`at`): that is what its author can change."""

    def __init__(self, resolve: Resolve, segment_id: uuid.UUID | None) -> None:
        self.resolve, self.conditions = resolve, 0
        self.root = segment_id
        self.chain: tuple[uuid.UUID, ...] = ()

    def count(self, at: str | None) -> None:
        self.conditions += 1
        if self.conditions > MAX_EXPANDED_CONDITIONS:
            raise Invalid(at or "rules", f"more than {MAX_EXPANDED_CONDITIONS} conditions with the segments it uses inlined")

    def enter(self, m: MemberOf, at: str | None) -> Rule | Literal["list"] | None:
        seen = ((self.root,) if self.root else ()) + self.chain
        if m.id in seen:
            cycle = " uses ".join(str(s) for s in (*seen[seen.index(m.id):], m.id))
            raise Invalid(at or m.at, f"segments may not use each other in a cycle: {cycle}")
        target = self.resolve(m.id)
        if target is None or target == LIST:
            return target
        if len(self.chain) >= MAX_SEGMENT_NESTING:
            raise Invalid(at or m.at, f"segments may use segments at most {MAX_SEGMENT_NESTING} levels deep")
        self.chain = (*self.chain, m.id)
        return target

    def leave(self) -> None:
        self.chain = self.chain[:-1]


def check_references(rule: Rule, resolve: Resolve, segment_id: uuid.UUID | None = None) -> None:
    """Invalid unless every member_of names a list or segment `resolve` knows, and the rule compiles
    with the segments it uses inlined (no cycle back to `segment_id`, the nesting and size bounds)."""
    for m in referenced(rule):
        if resolve(m.id) is None:
            raise Invalid(m.at, "names no list or segment of this tenant")
    compile_rule(rule, "c", SqlArgs(), datetime(2000, 1, 1, tzinfo=timezone.utc), resolve, segment_id=segment_id)


# -- SQL -------------------------------------------------------------------------------------------
def compile_rule(
    rule: Rule, contact_alias: str, args: SqlArgs, now: datetime, resolve: Resolve, *,
    segment_id: uuid.UUID | None = None, fenced: bool = True,
) -> str:
    """A boolean SQL expression (never NULL) over the contacts row `contact_alias`; values go into `args`.

    A member_of of a list is an EXISTS on list_members; of a segment, that segment's rule inlined
    (Invalid for a cycle, nesting past MAX_SEGMENT_NESTING or more than MAX_EXPANDED_CONDITIONS
    conditions); of anything else, false. `segment_id` is the segment the rule is, if any (so that a
    use of itself is a cycle).

    `fenced` (the default) keeps each list's EXISTS a probe of list_members' primary key per contact
    (`OFFSET 0`, as sending.audience.reached_sql does): a few conditions multiply into a row estimate
    near 1, and Postgres then turned a `not member_of` into a nested loop re-reading the whole list
    for every contact (over 30 s for 1M contacts and a 100,000-member list, measured; fenced: 1 to 2
    µs a contact). Unfenced, Postgres may join instead (0.15 s for the same count): only for a
    statement run with enable_nestloop off (segment_store.count_and_preview)."""
    assert _ALIAS.fullmatch(contact_alias), contact_alias
    assert now.tzinfo is not None, "now must be aware"
    compiler = _Sql(contact_alias, args, now, _Nesting(resolve, segment_id), " OFFSET 0" if fenced else "")
    return compiler.rule(rule, f"{contact_alias}.attributes", None)


class _Sql:
    def __init__(self, alias: str, args: SqlArgs, now: datetime, nesting: _Nesting, fence: str) -> None:
        self.alias, self.args, self.now, self.nesting, self.fence = alias, args, now, nesting, fence
        self.elements = 0

    def rule(self, rule: Rule, root: str, at: str | None) -> str:
        match rule:
            case All(rules):
                return "(" + " AND ".join(self.rule(r, root, at) for r in rules) + ")" if rules else "true"
            case Some(rules):
                return "(" + " OR ".join(self.rule(r, root, at) for r in rules) + ")" if rules else "false"
            case Not(inner):
                return f"(NOT {self.rule(inner, root, at)})"
            case MemberOf():
                return self.member_of(rule, root, at)
            case AnyElement(path, where):
                self.nesting.count(at)
                return self.any_element(path, where, root, at)
            case Condition():
                self.nesting.count(at)
                return self.condition(rule, root)
        raise TypeError(rule)

    def member_of(self, m: MemberOf, root: str, at: str | None) -> str:
        self.nesting.count(at)
        target = self.nesting.enter(m, at)
        if target is None:
            return "false"
        if target == LIST:
            return (f"EXISTS (SELECT 1 FROM list_members lm WHERE lm.list_id = {self.args.add(m.id, 'uuid')}"
                    f" AND lm.contact_id = {self.alias}.id{self.fence})")
        try:
            return self.rule(target, root, at or m.at)  # type: ignore[arg-type]
        finally:
            self.nesting.leave()

    def any_element(self, path: JsonPath, where: Rule, root: str, at: str | None) -> str:
        x = f"({root} #> {self.args.add(list(path.parts), 'text[]')})"
        self.elements += 1
        e = f"_e{self.elements}"
        exists = (f"EXISTS (SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof({x}) = 'array' THEN {x} END)"
                  f" AS {e}(v) WHERE {self.rule(where, f'{e}.v', at)})")
        # An element matching `where` holds its `eq` conditions, so the array contains an object of
        # them: one containment test per contact spares the per-element subquery of most of them.
        if required := _required(where):
            return f"(({x} @> {self.args.add(_JSON.encode([required]).decode(), 'text')}::jsonb AND {exists}) IS TRUE)"
        return exists

    def param(self, kind: str, value: Any) -> str:
        many = isinstance(value, tuple)
        values = [v.resolve(self.now) if isinstance(v, Moment) else v for v in (value if many else (value,))]
        return self.args.add(values if many else values[0], _CASTS[kind] + ("[]" if many else ""))

    def condition(self, c: Condition, root: str) -> str:
        if isinstance(c.field, Column):
            x = f"{self.alias}.{c.field.name}"
            if c.op == "exists":
                sql = f"cardinality({x}) > 0" if c.field.name in ARRAY_COLUMNS else f"{x} IS NOT NULL"
            elif c.op == "contains":
                p = self.param(c.kind, c.value)
                sql = f"{p} = ANY({x})" if c.field.name in ARRAY_COLUMNS else f"strpos({x}, {p}) > 0"
            else:
                sql = self.compare(c, x)
        else:
            path = self.args.add(list(c.field.parts), "text[]")
            x = f"({root} #> {path})"
            if c.op == "exists":
                sql = f"jsonb_typeof({x}) <> 'null'"
            elif c.op == "contains":
                p = self.param(c.kind, c.value)
                text = f"WHEN 'string' THEN strpos({x} #>> '{{}}', {p}) > 0 " if c.kind == "text" else ""
                sql = f"CASE jsonb_typeof({x}) {text}WHEN 'array' THEN {x} @> to_jsonb({p}) ELSE false END"
            elif c.kind == "time":
                sql = self.json_time(c, f"({root} #>> {path})")
            else:
                sql = self.compare(c, _typed(x, c.kind))
        if c.op == "exists" and not c.value:
            return f"NOT (({sql}) IS TRUE)"
        return f"(({sql}) IS TRUE)"

    def compare(self, c: Condition, typed: str) -> str:
        if c.op in _SQL_OPS:
            return f"{typed} {_SQL_OPS[c.op]} {self.param(c.kind, c.value)}"
        if c.op == "in":
            return f"{typed} = ANY({self.param(c.kind, c.value)})"
        if c.op == "not_in":
            return f"{typed} <> ALL({self.param(c.kind, c.value)})"
        if c.op == "between":
            low, high = c.value
            return f"{typed} BETWEEN {self.param(c.kind, low)} AND {self.param(c.kind, high)}"
        assert c.op == "starts_with", c.op
        return f"starts_with({typed}, {self.param(c.kind, c.value)})"

    def json_time(self, c: Condition, text: str) -> str:
        """A time in a string compared: its date part first (a text comparison), then, for the few
        left, the string read as a time (segment_timestamp(): a few times dearer)."""
        low, high = c.value if c.op == "between" else (c.value, c.value)
        guards = []
        if c.op in ("gt", "gte", "between"):
            guards.append(f"left({text}, 10) COLLATE \"C\" >= {self.args.add(_day(low.resolve(self.now), -_MARGIN), 'text')}")
        if c.op in ("lt", "lte", "between"):
            guards.append(f"left({text}, 10) COLLATE \"C\" <= {self.args.add(_day(high.resolve(self.now), _MARGIN), 'text')}")
        return " AND ".join([*guards, self.compare(c, f"segment_timestamp({text})")])


def _typed(x: str, kind: str) -> str:
    """The JSON value `x` as the SQL type of `kind`, or NULL when it is of another type. A CASE, since
    only a CASE orders evaluation: a cast of the wrong JSON type would raise."""
    json_type, sql = {"text": ("string", f"{x} #>> '{{}}'"), "number": ("number", f"({x})::numeric"),
                      "bool": ("boolean", f"({x})::boolean")}[kind]
    return f"CASE WHEN jsonb_typeof({x}) = '{json_type}' THEN {sql} END"


def _day(at: datetime, margin: timedelta) -> str:
    """The UTC date `margin` from `at` as YYYY-MM-DD (past the calendar's ends: below or above every date)."""
    try:
        d = (at + margin).astimezone(timezone.utc)
    except OverflowError:
        return "" if margin < timedelta(0) else "~"
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}"


def _required(where: Rule) -> dict[str, Any] | None:
    """The object every element matching `where` contains: its top-level `eq` conditions of JSON values."""
    conditions = where.rules if isinstance(where, All) else (where,)
    required: dict[str, Any] = {}
    for c in conditions:
        if isinstance(c, Condition) and c.op == "eq" and isinstance(c.field, JsonPath) and c.kind != "time":
            at = required
            for part in c.field.parts[:-1]:
                at = at.setdefault(part, {})
                if not isinstance(at, dict):
                    break
            else:
                at.setdefault(c.field.parts[-1], c.value)
    return required or None


# -- Python ---------------------------------------------------------------------------------------
def evaluate(
    rule: Rule, contact: Mapping[str, Any], now: datetime, memberships: Collection[uuid.UUID],
    segments: Mapping[uuid.UUID, Rule] | None = None,
) -> bool:
    """Whether `contact` (a dict of the contacts columns, `attributes` decoded) matches, with the SQL's
    semantics. `memberships`: the ids of the lists it is a member of; `segments`: the rules of the
    segments a member_of may name (any other id matches nobody)."""
    known = segments or {}

    def resolve(id_: uuid.UUID) -> Rule | Literal["list"] | None:
        if id_ in known:
            return known[id_]
        return LIST if id_ in memberships else None  # a list it is not in, or an unknown id: no match

    return _Python(contact, now, _Nesting(resolve, None)).rule(rule, contact.get("attributes"), None)


class _Python:
    """The SQL's semantics on one contact. Bounded by the nesting of segments (a cycle is Invalid, as
    in SQL); conditions are not counted: the bound on their number is about the SQL's size."""

    def __init__(self, contact: Mapping[str, Any], now: datetime, nesting: _Nesting) -> None:
        self.contact, self.now, self.nesting = contact, now, nesting

    def rule(self, rule: Rule, root: Any, at: str | None) -> bool:
        match rule:
            case All(rules):
                return all([self.rule(r, root, at) for r in rules])  # a list: every bound is checked, as in SQL
            case Some(rules):
                return any([self.rule(r, root, at) for r in rules])
            case Not(inner):
                return not self.rule(inner, root, at)
            case MemberOf():
                target = self.nesting.enter(rule, at)
                if target is None or target == LIST:
                    return target == LIST
                try:
                    return self.rule(target, root, at or rule.at)  # type: ignore[arg-type]
                finally:
                    self.nesting.leave()
            case AnyElement(path, where):
                array = _get(root, path.parts)
                return any([self.rule(where, e, at) for e in array]) if isinstance(array, list) else False
            case Condition():
                return self.condition(rule, root)
        raise TypeError(rule)

    def value(self, value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(self.value(v) for v in value)
        return instant(value.resolve(self.now)) if isinstance(value, Moment) else value

    def condition(self, c: Condition, root: Any) -> bool:
        if isinstance(c.field, Column):
            raw = self.contact.get(c.field.name)
            if c.field.name in ARRAY_COLUMNS:
                tokens = raw or []
                return bool(tokens) == c.value if c.op == "exists" else c.value in tokens
            if c.op == "exists":
                return (raw is not None) == c.value
            typed = instant(raw) if isinstance(raw, datetime) else raw
        else:
            raw = _get(root, c.field.parts)
            if c.op == "exists":
                return (raw is not None) == c.value
            if c.op == "contains":
                if isinstance(raw, list):
                    return any(_as(e, c.kind) == c.value for e in raw)
                return c.kind == "text" and isinstance(raw, str) and c.value in raw
            typed = _as(raw, c.kind)
        if typed is None:
            return False
        value = self.value(c.value)
        match c.op:
            case "eq":
                return typed == value
            case "ne":
                return typed != value
            case "gt":
                return typed > value
            case "gte":
                return typed >= value
            case "lt":
                return typed < value
            case "lte":
                return typed <= value
            case "in":
                return typed in value
            case "not_in":
                return typed not in value
            case "between":
                return value[0] <= typed <= value[1]
            case "contains":
                return value in typed
            case "starts_with":
                return typed.startswith(value)
        raise ValueError(c.op)


def _get(root: Any, parts: tuple[str, ...]) -> Any:
    """The value at `parts` under `root` (Postgres' #>: objects only, since a part is never an array index)."""
    for part in parts:
        if not isinstance(root, dict):
            return None
        root = root.get(part)
    return root


def _as(value: Any, kind: str) -> Any:
    """A JSON value as `kind`, or None when it is of another type (the SQL's _typed and segment_timestamp)."""
    if kind == "text":
        return value if isinstance(value, str) else None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)  # as Postgres' numeric holds it
    assert kind == "time", kind
    return iso_instant(value) if isinstance(value, str) else None
