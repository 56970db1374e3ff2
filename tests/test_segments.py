"""Segments: the REST API on a real Postgres (CRUD, tenancy, 422s naming the rule's path, cycles,
preview), injection attempts, and a hypothesis property: the compiled SQL selects exactly the
contacts the Python evaluation selects."""
from __future__ import annotations

import asyncio
import re
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shared.audience import segment_rules
from shared.audience.segment_rules import ISO_TIME
from shared.audience.segments import LIST, SqlArgs, compile_rule, evaluate, parse_rules
from shared.kernel.errors import Invalid
from shared.platform import db
from shared.tenants import store as tenants
from tests.api_helpers import error_fields
from tests.tenant_env import Client, TenantEnv, tenant_env

SEGMENTS = "/v1/segments"


@pytest.fixture
async def env(settings):
    async with tenant_env(settings) as e:
        yield e


PRO = {"field": "attributes.plan", "op": "eq", "value": "pro"}


async def a_segment(env: TenantEnv, rules: dict[str, Any], name: str = "seg", client: Client | None = None) -> dict[str, Any]:
    return await (client or env.writer).call("POST", SEGMENTS, 201, json={"name": name, "rules": rules})


async def a_list(client: Client, name: str = "list") -> str:
    return (await client.call("POST", "/v1/lists", 201, json={"name": name}))["id"]


# -- CRUD and tenancy -------------------------------------------------------------------------------


async def test_create_list_get_patch_and_delete_a_segment(env):
    # Given a tenant without segments
    assert (await env.writer.call("GET", SEGMENTS, 200))["total"] == 0
    # When it creates two
    first = await a_segment(env, PRO, "Pro customers")
    second = await a_segment(env, {"field": "email", "op": "exists"}, "With email")
    # Then each comes back as given, and the list pages them newest first with the total
    assert first["name"] == "Pro customers" and first["rules"] == PRO
    assert first["created_at"] == first["updated_at"]
    assert await env.writer.call("GET", f"{SEGMENTS}/{first['id']}", 200) == first
    page = await env.reader.call("GET", SEGMENTS, 200, params={"limit": 1})
    assert page["total"] == 2 and page["limit"] == 1 and page["offset"] == 0
    assert [s["id"] for s in page["items"]] == [second["id"]]
    page = await env.reader.call("GET", SEGMENTS, 200, params={"limit": 1, "offset": 1})
    assert [s["id"] for s in page["items"]] == [first["id"]]

    # When it renames one, then changes its rules
    renamed = await env.writer.call("PATCH", f"{SEGMENTS}/{first['id']}", 200, json={"name": "Pros"})
    assert renamed["name"] == "Pros" and renamed["rules"] == PRO
    rules = {"any": [PRO, {"field": "attributes.plan", "op": "eq", "value": "team"}]}
    changed = await env.writer.call("PATCH", f"{SEGMENTS}/{first['id']}", 200, json={"rules": rules})
    # Then both changes are kept
    assert changed["name"] == "Pros" and changed["rules"] == rules and changed["updated_at"] > first["updated_at"]
    assert await env.writer.call("PATCH", f"{SEGMENTS}/{first['id']}", 200, json={}) == changed

    # When it deletes one, then it is gone
    await env.writer.call("DELETE", f"{SEGMENTS}/{first['id']}", 204)
    await env.writer.problem("GET", f"{SEGMENTS}/{first['id']}", 404)
    await env.writer.problem("DELETE", f"{SEGMENTS}/{first['id']}", 404)
    assert (await env.writer.call("GET", SEGMENTS, 200))["total"] == 1


async def test_another_tenants_segment_is_404_and_a_read_token_cannot_write(env):
    # Given a segment of tenant one
    segment = await a_segment(env, PRO)
    path = f"{SEGMENTS}/{segment['id']}"
    # Then, to tenant two, it does not exist
    await env.stranger.problem("GET", path, 404)
    await env.stranger.problem("GET", f"{path}/preview", 404)
    await env.stranger.problem("PATCH", path, 404, json={"name": "mine"})
    await env.stranger.problem("DELETE", path, 404)
    assert (await env.stranger.call("GET", SEGMENTS, 200))["total"] == 0
    # and a read token of tenant one reads it but may not change it
    assert (await env.reader.call("GET", path, 200))["id"] == segment["id"]
    await env.reader.problem("POST", SEGMENTS, 403, json={"name": "x", "rules": PRO})
    await env.reader.problem("PATCH", path, 403, json={"name": "x"})
    await env.reader.problem("DELETE", path, 403)
    assert (await env.writer.call("GET", path, 200)) == segment


async def test_idempotency_key_on_create(env):
    headers = {"Idempotency-Key": "seg-1"}
    first = await env.writer.call("POST", SEGMENTS, 201, json={"name": "s", "rules": PRO}, headers=headers)
    again = await env.writer.call("POST", SEGMENTS, 201, json={"name": "s", "rules": PRO}, headers=headers)
    assert again == first
    assert (await env.writer.call("GET", SEGMENTS, 200))["total"] == 1


# -- invalid rules: 422 naming the rule's path ----------------------------------------------------

BAD_RULES = [
    ({"any": [PRO, PRO, {"field": "email", "op": "like", "value": "x"}]}, "rules.any[2].op"),
    ({"all": [{"not": {"field": "attributes.plan", "op": "eq"}}]}, "rules.all[0].not.value"),
    ({"field": "attributes.plan", "op": "eq", "value": "pro", "extra": 1}, "rules.extra"),
    ({"field": "name", "op": "eq", "value": "x"}, "rules.field"),  # not a field of a contact
    ({"field": "attributes", "op": "exists"}, "rules.field"),
    ({"field": "attributes.a.b.c.d.e", "op": "exists"}, "rules.field"),  # deeper than attributes go
    ({"field": "email", "op": "gt", "value": "a"}, "rules.op"),  # strings are not ordered
    ({"field": "created_at", "op": "gte", "value": "last tuesday"}, "rules.value"),
    ({"field": "created_at", "op": "gte", "value": "2026-02-30"}, "rules.value"),
    ({"field": "created_at", "op": "gte", "value": "-999999d"}, "rules.value"),
    ({"field": "attributes.score", "op": "between", "value": [1]}, "rules.value"),
    ({"field": "attributes.score", "op": "between", "value": [1, "now"]}, "rules.value"),
    ({"field": "attributes.plan", "op": "in", "value": []}, "rules.value"),
    ({"field": "attributes.plan", "op": "in", "value": ["a", {"b": 1}]}, "rules.value[1]"),
    ({"field": "attributes.plan", "op": "in", "value": ["x"] * 1001}, "rules.value"),
    ({"field": "attributes.plan", "op": "eq", "value": "x" * 1001}, "rules.value"),
    ({"field": "attributes.plan", "op": "eq", "value": None}, "rules.value"),
    ({"field": "attributes.plan", "op": "exists", "value": "yes"}, "rules.value"),
    ({"field": "email", "op": "eq", "value": 3}, "rules.value"),
    ({"all": [{"any_of": "attributes.bookings", "where": {"member_of": str(uuid.uuid4())}}]}, "rules.all[0].where.member_of"),
    ({"any_of": "attributes.bookings"}, "rules.where"),
    ({"any_of": "email", "where": {"all": []}}, "rules.any_of"),
    ({"member_of": "not-a-uuid"}, "rules.member_of"),
    ({"member_of": str(uuid.uuid4())}, "rules.member_of"),  # nobody's
    ({"all": PRO}, "rules.all"),
    ({"all": [PRO], "any": [PRO]}, "rules"),
    ({}, "rules"),
    ({"all": [{"all": [{"all": [{"all": [{"all": [{"all": [{"all": [{"all": [PRO]}]}]}]}]}]}]}]},
     "rules.all[0].all[0].all[0].all[0].all[0].all[0].all[0].all[0]"),
    ({"any": [PRO] * 101}, "rules.any[100]"),
    ({"any": [{"field": "attributes.note", "op": "eq", "value": "x" * 999}] * 70}, "rules"),  # over 64 KiB
]


async def test_an_invalid_rule_is_a_422_naming_its_path(env):
    segment = await a_segment(env, PRO)
    for rules, field in BAD_RULES:
        body = await env.writer.problem("POST", SEGMENTS, 422, json={"name": "bad", "rules": rules})
        assert error_fields(body) == [field], (rules, body)
        # and a PATCH says the same, changing nothing
        body = await env.writer.problem("PATCH", f"{SEGMENTS}/{segment['id']}", 422, json={"rules": rules})
        assert error_fields(body) == [field], (rules, body)
    assert (await env.writer.call("GET", SEGMENTS, 200))["items"] == [segment]


async def test_a_list_or_segment_of_another_tenant_is_a_422_naming_the_field(env):
    theirs = await a_list(env.stranger)
    their_segment = await a_segment(env, PRO, client=env.stranger)
    for target in (theirs, their_segment["id"]):
        rules = {"all": [PRO, {"not": {"member_of": target}}]}
        body = await env.writer.problem("POST", SEGMENTS, 422, json={"name": "x", "rules": rules})
        assert error_fields(body) == ["rules.all[1].not.member_of"]


async def test_a_cycle_is_refused_and_so_is_nesting_too_deep(env):
    # Given a uses a list, b uses a, c uses b
    members = await a_list(env.writer)
    a = await a_segment(env, {"member_of": members}, "a")
    b = await a_segment(env, {"all": [PRO, {"member_of": a["id"]}]}, "b")
    c = await a_segment(env, {"member_of": b["id"]}, "c")
    # When a is changed to use c (a -> c -> b -> a), or itself
    body = await env.writer.problem("PATCH", f"{SEGMENTS}/{a['id']}", 422, json={"rules": {"any": [{"member_of": c["id"]}]}})
    # Then it is a 422 at the member_of that closes the cycle
    assert error_fields(body) == ["rules.any[0].member_of"] and "cycle" in body["errors"][0]["reason"]
    body = await env.writer.problem("PATCH", f"{SEGMENTS}/{a['id']}", 422, json={"rules": {"not": {"member_of": a["id"]}}})
    assert error_fields(body) == ["rules.not.member_of"] and "cycle" in body["errors"][0]["reason"]
    assert (await env.writer.call("GET", f"{SEGMENTS}/{a['id']}", 200))["rules"] == {"member_of": members}

    # Given d uses c (d -> c -> b -> a: three levels of segments below d)
    d = await a_segment(env, {"member_of": c["id"]}, "d")
    # Then nothing may go a level deeper: neither a segment using d, nor a using another segment
    body = await env.writer.problem("POST", SEGMENTS, 422, json={"name": "e", "rules": {"member_of": d["id"]}})
    assert error_fields(body) == ["rules.member_of"] and "levels deep" in body["errors"][0]["reason"]
    other = await a_segment(env, PRO, "other")
    body = await env.writer.problem("PATCH", f"{SEGMENTS}/{a['id']}", 422, json={"rules": {"member_of": other["id"]}})
    assert error_fields(body) == ["rules"] and d["id"] in body["errors"][0]["reason"]


async def test_a_segment_or_list_in_use_cannot_be_deleted(env):
    members = await a_list(env.writer)
    used = await a_segment(env, PRO, "used")
    user = await a_segment(env, {"all": [{"member_of": used["id"]}, {"not": {"member_of": members}}]}, "user")
    body = await env.writer.problem("DELETE", f"{SEGMENTS}/{used['id']}", 409, "segment_in_use")
    assert body["segments"] == [user["id"]]
    body = await env.writer.problem("DELETE", f"/v1/lists/{members}", 409, "list_in_use")
    assert body["segments"] == [user["id"]]
    # Once the user no longer names them, both go
    await env.writer.call("PATCH", f"{SEGMENTS}/{user['id']}", 200, json={"rules": PRO})
    await env.writer.call("DELETE", f"{SEGMENTS}/{used['id']}", 204)
    await env.writer.call("DELETE", f"/v1/lists/{members}", 204)


# -- preview ---------------------------------------------------------------------------------------


async def test_preview_counts_the_segment_and_shows_the_first_ten(env):
    # Given 15 pro contacts (3 of them joined 40 days ago), 5 free ones, and another tenant's pro contact
    people = [{"external_id": f"u{i:02}", "email": f"u{i}@example.com",
               "attributes": {"plan": "pro" if i < 15 else "free", "bookings": [{"status": "accepted", "date": f"2026-04-{i + 1:02}"}]}}
              for i in range(20)]
    ids = (await env.writer.call("POST", "/v1/contacts", 200, json=people))["ids"]
    await env.stranger.call("POST", "/v1/contacts", 201, json={"external_id": "x", "attributes": {"plan": "pro"}})
    await env.sql("execute", "UPDATE contacts SET created_at = now() - interval '40 days' WHERE id = ANY($1::bigint[])", ids[:3])
    vip = await a_list(env.writer)
    await env.writer.call("POST", f"/v1/lists/{vip}/members", 200, json={"contact_ids": ids[10:12]})

    # When the tenant previews "pro"
    segment = await a_segment(env, PRO)
    preview = await env.reader.call("GET", f"{SEGMENTS}/{segment['id']}/preview", 200)
    # Then it counts 15 and shows the first ten by id, as contacts
    assert preview["count"] == 15
    assert [m["id"] for m in preview["members"]] == ids[:10]
    assert preview["members"][0]["email"] == "u0@example.com" and preview["members"][0]["attributes"]["plan"] == "pro"

    # And relative dates, member_of and any_of narrow it as they say
    rules = {"all": [PRO, {"field": "created_at", "op": "between", "value": ["-30d", "now"]},
                     {"not": {"member_of": vip}},
                     {"any_of": "attributes.bookings", "where": {"all": [
                         {"field": "status", "op": "eq", "value": "accepted"},
                         {"field": "date", "op": "gte", "value": "2026-04-08"}]}}]}
    await env.writer.call("PATCH", f"{SEGMENTS}/{segment['id']}", 200, json={"rules": rules})
    preview = await env.reader.call("GET", f"{SEGMENTS}/{segment['id']}/preview", 200)
    expected = [ids[i] for i in range(7, 15) if i not in (10, 11)]
    assert preview["count"] == len(expected) and [m["id"] for m in preview["members"]] == expected


async def test_a_segment_using_a_segment_selects_through_it(env):
    ids = (await env.writer.call("POST", "/v1/contacts", 200, json=[
        {"external_id": f"u{i}", "attributes": {"plan": "pro" if i % 2 else "free", "score": i}} for i in range(10)
    ]))["ids"]
    pros = await a_segment(env, PRO, "pros")
    high = await a_segment(env, {"all": [{"member_of": pros["id"]}, {"field": "attributes.score", "op": "gte", "value": 5}]})
    preview = await env.writer.call("GET", f"{SEGMENTS}/{high['id']}/preview", 200)
    assert [m["id"] for m in preview["members"]] == [ids[5], ids[7], ids[9]]
    # A change to the segment used is seen at once (segments are evaluated, never stored)
    await env.writer.call("PATCH", f"{SEGMENTS}/{pros['id']}", 200, json={"rules": {"not": PRO}})
    preview = await env.writer.call("GET", f"{SEGMENTS}/{high['id']}/preview", 200)
    assert [m["id"] for m in preview["members"]] == [ids[6], ids[8]]


# -- injection -------------------------------------------------------------------------------------

HOSTILE_PATHS = ["attributes.a'b", 'attributes.a"b', "attributes.a;DROP TABLE contacts", "attributes.a--",
                 "attributes.$1", "attributes.é", "attributes.a\x00", "attributes.a b", "attributes.a)",
                 "email; DROP TABLE contacts; --", "attributes.", "attributes..a", "attributes.1a",
                 "attributes.a/*", "email'", "attributes.a.b'::text"]
HOSTILE_VALUES = ["'; DROP TABLE contacts; --", "$1", "a'b", 'a"b', "é'\"\\", "%", "_", "a\\", "'", "--", ") OR 1=1 --",
                  "{a,b}", "\u202e", "🙂"]


async def test_a_hostile_field_path_is_a_422(env):
    for path in HOSTILE_PATHS:
        for rules, field in (({"field": path, "op": "eq", "value": "x"}, "rules.field"),
                             ({"any_of": path, "where": {"all": []}}, "rules.any_of")):
            body = await env.writer.problem("POST", SEGMENTS, 422, json={"name": "x", "rules": rules})
            assert error_fields(body) == [field], (path, body)


async def test_hostile_values_match_literally_or_are_a_422(env):
    # Given a contact for each hostile value, with that value as its note, email prefix and tag
    ids = (await env.writer.call("POST", "/v1/contacts", 200, json=[
        {"external_id": v, "attributes": {"note": v, "tags": [v, "x"]}} for v in HOSTILE_VALUES
    ]))["ids"]
    for i, value in enumerate(HOSTILE_VALUES):
        for rules in ({"field": "attributes.note", "op": "eq", "value": value},
                      {"field": "external_id", "op": "in", "value": [value, "nobody"]},
                      {"field": "attributes.tags", "op": "contains", "value": value}):
            segment = await a_segment(env, rules)
            preview = await env.writer.call("GET", f"{SEGMENTS}/{segment['id']}/preview", 200)
            # Then each selects its own contact only
            assert [m["id"] for m in preview["members"]] == [ids[i]], (value, rules)
        starts = await a_segment(env, {"field": "attributes.note", "op": "starts_with", "value": value})
        preview = await env.writer.call("GET", f"{SEGMENTS}/{starts['id']}/preview", 200)
        assert ids[i] in [m["id"] for m in preview["members"]]
        assert all(m["attributes"]["note"].startswith(value) for m in preview["members"])
    # NUL cannot be stored by Postgres: a 422, not a driver error
    body = await env.writer.problem("POST", SEGMENTS, 422, json={"name": "x", "rules": {"field": "attributes.note", "op": "eq", "value": "a\x00"}})
    assert error_fields(body) == ["rules.value"]
    body = await env.writer.problem("POST", SEGMENTS, 422, json={"name": "x", "rules": {"member_of": "'; DROP TABLE lists; --"}})
    assert error_fields(body) == ["rules.member_of"]
    assert len(await env.sql("fetch", "SELECT 1 FROM contacts")) == len(HOSTILE_VALUES)


def test_no_text_of_a_rule_reaches_the_sql():
    rules = {"all": [{"field": "attributes.plan", "op": "eq", "value": "'; DROP TABLE contacts; --"},
                     {"field": "attributes.a_b.c", "op": "in", "value": ["$1", "x"]},
                     {"any_of": "attributes.bookings", "where": {"field": "status", "op": "starts_with", "value": "' OR 1=1"}}]}
    args = SqlArgs([uuid.uuid4()])
    sql = compile_rule(parse_rules(rules), "c", args, datetime.now(timezone.utc), lambda _: None)
    for text in ("DROP", "$1'", "OR 1=1", "plan", "a_b", "bookings", "status"):
        assert text not in sql
    assert args.values[1:] == [["plan"], "'; DROP TABLE contacts; --", ["a_b", "c"], ["$1", "x"], ["bookings"], ["status"], "' OR 1=1"]
    assert re.fullmatch(r"[^']*('[^']*'[^']*)*", sql)  # the only quoted literals are the compiler's own
    assert set(re.findall(r"'([^']*)'", sql)) <= {"string", "array", "{}", "null", "number", "boolean"}


async def test_the_sql_time_shapes_are_the_python_ones(db_url):
    # Given the shapes segment_timestamp() takes (a digit as 9), as the migration generated them
    con = await db.connect(db_url)
    try:
        definition = await con.fetchval("SELECT pg_get_functiondef('segment_timestamp(text)'::regprocedure)")
    finally:
        await con.close()
    shapes = {s.strip('"') for array in re.findall(r"'\{([^']*)\}'::text\[\]", definition) for s in array.split(",")}
    # Then they are exactly those of candidates (each part of the form, right or wrong) that Python takes
    times = ["99:99", "9:99", "99:99:99", "99:99:9", "99:99:99.", *(f"99:99:99.{'9' * n}" for n in range(1, 8)), "99:99:99,9"]
    clocks = ["", *(sep + t for sep in ("T", " ", "t", "") for t in times)]
    zones = ["", "Z", "z", "+99", "+99:99", "+9999", "-99", "-99:99", "-9999", "+9", "+99:9", "+999", " +99"]
    candidates = {d + c + z for d in ["9999-99-99", "999-99-99", "99999-99-99", "9999-9-99"] for c in clocks for z in zones}
    assert len(shapes) == 129
    assert shapes == {c for c in candidates if ISO_TIME.fullmatch(c.replace("9", "0"))}


# -- the compiled SQL selects what the Python evaluation selects ------------------------------------

NOW = datetime(2026, 5, 1, 12, 30, tzinfo=timezone.utc)
LIST_A, LIST_B, THEIR_LIST, NOBODYS = (uuid.UUID(int=i) for i in (1, 2, 3, 4))
SEGMENT_1, SEGMENT_2 = uuid.UUID(int=11), uuid.UUID(int=12)
TEXTS = ["pro", "free", "", "PRO", "pro ", "a'b", "$1", "é", "x;--", "accepted", "p"]
NUMBERS = [0, 1, -1, 2, 1.5, 2.0, 10**20, -0.25]
TIMES = ["2026-04-01", "2026-04-30T12:00:00Z", "2026-05-01T12:30", "2026-05-01 14:30:00+02:00", "2026-04-15T08:00:00.5-0300",
         "2026-02-30", "2026-13-01", "2026-05-01T24:00", "9999-12-31T23:00:00-05:00", "yesterday", "2026-04-01T10:00+14"]
RELATIVE = ["now", "-30d", "-1d", "+2h", "-90m", "-2w", "+1d"]
KEYS = ["plan", "score", "vip", "joined", "tags", "bookings", "nested"]

scalars = st.one_of(st.sampled_from(TEXTS), st.sampled_from(NUMBERS), st.booleans(), st.none(), st.sampled_from(TIMES))
booking = st.fixed_dictionaries({}, optional={"status": scalars, "date": st.one_of(st.sampled_from(TIMES), scalars),
                                              "amount": st.sampled_from(NUMBERS)})
attribute_values = st.one_of(
    scalars, st.lists(scalars, max_size=3), st.lists(booking, max_size=3),
    st.fixed_dictionaries({}, optional={"a": scalars, "b": st.fixed_dictionaries({}, optional={"c": scalars})}),
)
contacts = st.lists(st.fixed_dictionaries({
    "external_id": st.one_of(st.none(), st.sampled_from(TEXTS)),
    "email": st.one_of(st.none(), st.sampled_from(["a@x.com", "b@y.org", "pro@x.com"])),
    "phone": st.one_of(st.none(), st.just("+14155550100")),
    "locale": st.one_of(st.none(), st.sampled_from(["en", "pt-BR"])),
    "timezone": st.one_of(st.none(), st.sampled_from(["Europe/Berlin", "UTC"])),
    "whatsapp": st.one_of(st.none(), st.just("+14155550101")),
    "telegram_chat_id": st.one_of(st.none(), st.just("12345")),
    "push_tokens": st.lists(st.sampled_from(["t1", "t2"]), max_size=2, unique=True),
    "attributes": st.dictionaries(st.sampled_from(KEYS), attribute_values, max_size=5),
    "created_at": st.integers(-60 * 24 * 60, 24 * 60).map(lambda m: NOW + timedelta(minutes=m, microseconds=m % 7)),
    "updated_at": st.integers(-60 * 24 * 60, 24 * 60).map(lambda m: NOW + timedelta(minutes=m)),
    "lists": st.sets(st.sampled_from([LIST_A, LIST_B])),
}), min_size=2, max_size=8, unique_by=lambda p: p["external_id"] if p["external_id"] is not None else id(p))  # the upsert key


def conditions(element: bool) -> st.SearchStrategy[dict[str, Any]]:
    json_fields = (["status", "date", "amount", "x", "a.b"] if element else
                   [f"attributes.{k}" for k in KEYS] + ["attributes.nested.a", "attributes.nested.b.c", "attributes.missing"])
    text_columns = [] if element else list(segment_rules.TEXT_COLUMNS)
    time_columns = [] if element else list(segment_rules.TIME_COLUMNS)
    value = st.one_of(st.sampled_from(TEXTS), st.sampled_from(NUMBERS), st.booleans())
    time = st.one_of(st.sampled_from(RELATIVE), st.sampled_from([t for t in TIMES[:5]]))
    number_or_time = st.one_of(st.sampled_from(NUMBERS), time)
    one_kind = st.one_of(st.lists(st.sampled_from(TEXTS), min_size=1, max_size=4),
                         st.lists(st.sampled_from(NUMBERS), min_size=1, max_size=4), st.lists(st.booleans(), min_size=1, max_size=2))

    def cond(field: str, op: str, v: Any = ...) -> dict[str, Any]:
        return {"field": field, "op": op} | ({} if v is ... else {"value": v})

    options = [
        st.builds(cond, st.sampled_from(json_fields), st.sampled_from(["eq", "ne", "contains"]), value),
        st.builds(cond, st.sampled_from(json_fields), st.sampled_from(["in", "not_in"]), one_kind),
        st.builds(cond, st.sampled_from(json_fields), st.just("starts_with"), st.sampled_from(TEXTS)),
        st.builds(cond, st.sampled_from(json_fields), st.just("exists"), st.one_of(st.just(...), st.booleans())),
        st.builds(cond, st.sampled_from(json_fields), st.sampled_from(["gt", "gte", "lt", "lte"]), number_or_time),
        st.builds(cond, st.sampled_from(json_fields), st.just("between"),
                  st.one_of(st.lists(st.sampled_from(NUMBERS), min_size=2, max_size=2), st.lists(time, min_size=2, max_size=2))),
    ]
    if not element:
        options += [
            st.builds(cond, st.sampled_from(text_columns),
                      st.sampled_from(["eq", "ne", "contains", "starts_with"]), st.sampled_from(TEXTS + ["a@x.com", "en", "UTC"])),
            st.builds(cond, st.sampled_from(text_columns), st.sampled_from(["in", "not_in"]),
                      st.lists(st.sampled_from(TEXTS + ["a@x.com", "pt-BR"]), min_size=1, max_size=3)),
            st.builds(cond, st.sampled_from([*text_columns, *time_columns, "push_tokens"]), st.just("exists")),
            st.builds(cond, st.sampled_from(time_columns), st.sampled_from(["gt", "gte", "lt", "lte"]), time),
            st.builds(cond, st.sampled_from(time_columns), st.just("between"), st.lists(time, min_size=2, max_size=2)),
            st.builds(cond, st.just("push_tokens"), st.just("contains"), st.sampled_from(["t1", "t3"])),
            st.builds(lambda i: {"member_of": str(i)}, st.sampled_from([LIST_A, LIST_B, THEIR_LIST, NOBODYS, SEGMENT_1, SEGMENT_2])),
        ]
    return st.one_of(options)


def rules(element: bool = False, leaves: int = 6) -> st.SearchStrategy[dict[str, Any]]:
    def extend(inner: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        combined = [st.lists(inner, max_size=3).map(lambda r: {"all": r}), st.lists(inner, max_size=3).map(lambda r: {"any": r}),
                    inner.map(lambda r: {"not": r})]
        if not element:
            combined.append(st.builds(lambda path, where: {"any_of": path, "where": where},
                                      st.sampled_from(["attributes.bookings", "attributes.tags", "attributes.plan"]),
                                      rules(element=True, leaves=3)))
        return st.one_of(combined)

    return st.recursive(conditions(element), extend, max_leaves=leaves)


class PropertyDb:
    """One database connection on an event loop of its own, driven from hypothesis' sync examples."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.con = self.run(db.connect(url))
        self.tenant = self.run(tenants.create_tenant(self.con, "property")).id
        other = self.run(tenants.create_tenant(self.con, "other")).id
        for list_id, owner in ((LIST_A, self.tenant), (LIST_B, self.tenant), (THEIR_LIST, other)):
            self.run(self.con.execute("INSERT INTO lists (id, tenant_id, name) VALUES ($1, $2, 'l')", list_id, owner))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.con.close())
        self.loop.close()

    async def load(self, people: list[dict[str, Any]]) -> list[int]:
        await self.con.execute("DELETE FROM contacts WHERE tenant_id = $1", self.tenant)
        ids = []
        for p in people:
            ids.append(await self.con.fetchval(
                """INSERT INTO contacts (tenant_id, external_id, email, phone, locale, timezone, whatsapp, telegram_chat_id,
                                         push_tokens, attributes, created_at, updated_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::text::jsonb, $11, $12) RETURNING id""",
                self.tenant, p["external_id"], p["email"], p["phone"], p["locale"], p["timezone"], p["whatsapp"],
                p["telegram_chat_id"], p["push_tokens"], msgspec.json.encode(p["attributes"]).decode(),
                p["created_at"], p["updated_at"]))
            for list_id in p["lists"]:
                await self.con.execute("INSERT INTO list_members (list_id, contact_id) VALUES ($1, $2)", list_id, ids[-1])
        return ids

    async def select(self, condition: str, args: SqlArgs) -> set[int]:
        rows = await self.con.fetch(f"SELECT c.id FROM contacts c WHERE c.tenant_id = $1 AND {condition}", *args.values)
        return {r[0] for r in rows}


@pytest.fixture
def property_db(db_url):
    store = PropertyDb(db_url)
    yield store
    store.close()


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(people=contacts, raw_rules=st.lists(rules(), min_size=1, max_size=4), segment_1=rules(), segment_2=rules())
def test_the_compiled_sql_selects_what_evaluate_selects(property_db, people, raw_rules, segment_1, segment_2):
    # Segment 2 may use segment 1, segment 1 no segment (a cycle is refused at save)
    stored = {SEGMENT_1: parse_rules(_replaced(segment_1, {SEGMENT_1, SEGMENT_2})),
              SEGMENT_2: parse_rules(_replaced(segment_2, {SEGMENT_2}))}
    ids = property_db.run(property_db.load(people))

    def resolve(i: uuid.UUID) -> Any:
        return stored[i] if i in stored else LIST if i in (LIST_A, LIST_B) else None

    for n, raw in enumerate(raw_rules):
        rule = parse_rules(raw)
        args = SqlArgs([property_db.tenant])
        condition = compile_rule(rule, "c", args, NOW, resolve, fenced=n % 2 == 0)  # both SQL shapes of member_of
        selected = property_db.run(property_db.select(condition, args))
        expected = {i for i, p in zip(ids, people) if evaluate(rule, p, NOW, p["lists"], stored)}
        assert selected == expected, (raw, condition)


def test_every_time_string_reads_alike_in_sql_and_python(property_db):
    # Given a contact for each string that looks more or less like a time, and one for each number
    people = [{"external_id": f"t{i}", "email": None, "phone": None, "locale": None, "timezone": None, "whatsapp": None,
               "telegram_chat_id": None, "push_tokens": [], "attributes": {"when": v}, "created_at": NOW, "updated_at": NOW,
               "lists": set()}
              for i, v in enumerate([*TIMES, *NUMBERS, "2026-04-30T12:00:00+00", "2024-02-29", "2025-02-29", "2026-04-30t12:00Z",
                                     "2026-04-30T12:00:00.1234567Z", "2026-04-30T12:00:60Z", "2026-04-30T12:00+15:00",
                                     "2026-04-30T12:00:00Z\n", " 2026-04-30", "0999-01-01", "2026-04-30T12",
                                     # where Postgres' input and Python's fromisoformat differ: Postgres decides
                                     "2026-04-29T24:00", "2026-04-29T24:00:00.0", "2026-04-29T24:00:01", "2026-04-30T23:59:60",
                                     "2026-04-30T10:30:60.5", "2026-04-30T23:59:60.5", "2026-04-29T24:00:00.000001", "2026-04-30T10:00+15:59", "2026-04-30T10:00-1559",
                                     "2026-04-30T10:00+16", "2026-04-30T10:00+05:60", "0000-01-01", "0001-01-01T00:00+15",
                                     "9999-12-31T24:00", "1500-02-29", "1600-02-29"])]
    ids = property_db.run(property_db.load(people))
    # Then every comparison with every kind of time selects the same contacts in both
    for op in ("gt", "gte", "lt", "lte", "between"):
        for value in [*RELATIVE, *TIMES[:5], "9999-12-31", "1000-01-01T00:00Z"]:
            raw = {"field": "attributes.when", "op": op, "value": [value, "+1w"] if op == "between" else value}
            rule = parse_rules(raw)
            args = SqlArgs([property_db.tenant])
            selected = property_db.run(property_db.select(compile_rule(rule, "c", args, NOW, lambda _: None), args))
            assert selected == {i for i, p in zip(ids, people) if evaluate(rule, p, NOW, set())}, raw


def _replaced(raw: Any, segment_ids: set[uuid.UUID]) -> Any:
    """The rule with its uses of `segment_ids` turned into uses of list A."""
    if isinstance(raw, dict):
        if raw.get("member_of") in {str(i) for i in segment_ids}:
            return {"member_of": str(LIST_A)}
        return {k: _replaced(v, segment_ids) for k, v in raw.items()}
    return [_replaced(v, segment_ids) for v in raw] if isinstance(raw, list) else raw


# -- the pure parts, by example --------------------------------------------------------------------


def test_missing_and_mistyped_fields_fail_every_comparison_until_negated():
    contact = {"email": None, "attributes": {"score": "7", "n": 7, "flag": True, "when": "2026-04-30T12:00:00Z"}}

    def matches(rule: dict[str, Any]) -> bool:
        return evaluate(parse_rules(rule), contact, NOW, set())

    assert not matches({"field": "email", "op": "ne", "value": "a@x.com"})  # missing: no comparison holds
    assert matches({"not": {"field": "email", "op": "eq", "value": "a@x.com"}})
    assert not matches({"field": "attributes.score", "op": "gt", "value": 5})  # a string is not a number
    assert matches({"field": "attributes.n", "op": "gt", "value": 5})
    assert matches({"field": "attributes.n", "op": "eq", "value": 7.0})
    assert not matches({"field": "attributes.flag", "op": "eq", "value": 1})  # true is not 1
    assert matches({"field": "attributes.when", "op": "between", "value": ["-2d", "now"]})
    assert not matches({"field": "attributes.when", "op": "between", "value": ["-1d", "now"]})
    assert not matches({"field": "attributes.when", "op": "gt", "value": "-1h"})
    assert matches({"field": "attributes.when", "op": "eq", "value": "2026-04-30T12:00:00Z"})  # eq is literal
    assert not matches({"field": "attributes.when", "op": "eq", "value": "2026-04-30T12:00Z"})
    assert matches({"all": []}) and not matches({"any": []})


def test_a_stored_cycle_is_bounded_when_compiled():
    a, b = uuid.uuid4(), uuid.uuid4()
    stored = {a: parse_rules({"member_of": str(b)}), b: parse_rules({"not": {"member_of": str(a)}})}
    with pytest.raises(Invalid, match="cycle"):
        compile_rule(stored[a], "c", SqlArgs(), NOW, stored.get, segment_id=a)
    with pytest.raises(Invalid, match="cycle"):
        evaluate(stored[a], {"attributes": {}}, NOW, set(), stored)
