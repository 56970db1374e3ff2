"""Tenant isolation by size: no input can make an event or a job that NATS refuses (which held up every
tenant's sends behind it), the limits are in the OpenAPI document, and /readyz says when the relay or
the projector falls behind. Real app, Postgres and nats-server."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api_service.app import create_app
from shared.background import async_projections
from shared.kernel import limits
from shared.platform import bus, db, projections, relay
from shared.platform.settings import Settings
from shared.tenants import store as tenants
from tests.api_helpers import BROADCASTS, assert_problem, bearer, error_fields

KIB = 1024


class Env(msgspec.Struct):
    http: AsyncTestClient
    headers: dict[str, str]
    settings: Settings

    async def call(self, method: str, path: str, expect: int | None = None, **kw: Any) -> Any:
        r = await self.http.request(method, path, headers=self.headers, **kw)
        if expect is not None:
            assert r.status_code == expect, f"{method} {path} -> {r.status_code}: {r.text[:500]}"
        return r

    async def fetchval(self, sql: str, *args: Any) -> Any:
        con = await db.connect(self.settings.database_url)
        try:
            return await con.fetchval(sql, *args)
        finally:
            await con.close()

    async def events(self) -> int:
        return await self.fetchval("SELECT count(*) FROM events")


async def _env(settings: Settings) -> AsyncIterator[Env]:
    con = await db.connect(settings.database_url)
    tenant = await tenants.create_tenant(con, "limits")
    token = await tenants.create_token(con, tenant.id, "write")
    await con.close()
    async with AsyncTestClient(app=create_app(settings)) as http:
        yield Env(http, bearer(token), settings)


@pytest.fixture
async def env(settings) -> AsyncIterator[Env]:
    async for e in _env(settings):
        yield e


async def list_and_provider(env: Env) -> tuple[str, str]:
    lst = (await env.call("POST", "/v1/lists", 201, json={"name": "everyone"})).json()
    provider = (await env.call("POST", "/v1/providers", 201, json={"kind": "null", "name": "dry run"})).json()
    return lst["id"], provider["id"]


# ---- the repro: content that would make an event over NATS's 1 MiB ----


async def test_a_broadcast_with_1_1_mb_of_html_is_a_422_naming_content_html_and_appends_nothing(env):
    list_id, provider_id = await list_and_provider(env)
    before = await env.events()
    body = {"name": "x", "list_id": list_id, "provider_id": provider_id,
            "content": {"subject": "s", "html": "x" * 1_100_000}}
    problem = assert_problem(await env.call("POST", BROADCASTS, json=body), 422, "validation_error")
    assert error_fields(problem) == ["content.html"]
    assert f"{limits.MAX_HTML_CHARS}" in problem["errors"][0]["reason"]
    assert await env.events() == before
    assert (await env.call("GET", BROADCASTS, 200)).json()["total"] == 0

    # every field at its limit is fine: together they stay under MAX_CONTENT_BYTES
    body["content"] = {"subject": "s" * limits.MAX_SUBJECT_CHARS, "html": "h" * limits.MAX_HTML_CHARS,
                       "text": "t" * limits.MAX_TEXT_CHARS}
    created = (await env.call("POST", BROADCASTS, 201, json=body)).json()
    assert len(created["content"]["html"]) == limits.MAX_HTML_CHARS


async def test_content_within_each_field_but_too_many_bytes_together_is_a_422_naming_content(env):
    # 400 Ki characters of "é" are 800 KiB of UTF-8: each field is within its limit, the event is not.
    before = await env.events()
    body = {"name": "x", "content": {"subject": "s", "html": "é" * (400 * KIB)}}
    problem = assert_problem(await env.call("POST", BROADCASTS, json=body), 422)
    assert error_fields(problem) == ["content"]
    assert f"{limits.MAX_CONTENT_BYTES:,} bytes" in problem["detail"]
    assert await env.events() == before


async def test_an_edit_is_held_to_the_same_limits_and_changes_nothing(env):
    created = (await env.call("POST", BROADCASTS, 201, json={"name": "x", "content": {"subject": "s", "text": "t"}})).json()
    path = f"{BROADCASTS}/{created['id']}"
    before = await env.events()

    too_long = assert_problem(await env.call("PATCH", path, json={"content": {"html": "x" * 1_100_000}}), 422)
    assert error_fields(too_long) == ["content.html"]
    # html within its limit, but merged with the stored text the content passes MAX_CONTENT_BYTES
    await env.call("PATCH", path, 200, json={"content": {"text": "€" * (100 * KIB)}})  # 300 KiB of UTF-8
    before = await env.events()
    merged = assert_problem(await env.call("PATCH", path, json={"content": {"html": "é" * (250 * KIB)}}), 422)
    assert error_fields(merged) == ["content"]
    assert await env.events() == before
    assert "html" not in (await env.call("GET", path, 200)).json()["content"]  # still empty


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"content": {"subject": "s", "text": "x" * (limits.MAX_TEXT_CHARS + 1)}}, "content.text"),
        # a valid address, with a display name of 400 characters
        ({"content": {"subject": "s", "from_email": "N" * 400 + " <news@example.com>"}}, "content.from_email"),
        ({"content": {"subject": "s", "reply_to": "N" * 400 + " <news@example.com>"}}, "content.reply_to"),
        ({"recurring": True, "cron": "0 9 * * 1" + " " * 300, "timezone": "UTC"}, "cron"),
        ({"recurring": True, "cron": "0 9 * * 1", "max_lateness_s": 10**15}, "max_lateness_s"),
    ],
)
async def test_every_broadcast_field_that_reaches_an_event_is_bounded(env, overrides, field):
    body = {"name": "x", "content": {"subject": "s"}, **overrides}
    before = await env.events()
    problem = assert_problem(await env.call("POST", BROADCASTS, json=body), 422)
    assert error_fields(problem) == [field]
    assert await env.events() == before


# ---- contacts: what every job carries per recipient ----


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize(
    "attributes, reason",
    [
        ({f"k{i}": i for i in range(limits.MAX_ATTRIBUTE_KEYS + 1)}, "more keys than"),
        ({"a": {f"k{i}": i for i in range(limits.MAX_ATTRIBUTE_KEYS + 1)}}, "more keys than"),
        ({"k" * (limits.MAX_ATTRIBUTE_KEY_CHARS + 1): 1}, "longer than"),
        (nested(limits.MAX_ATTRIBUTE_DEPTH + 1), "nested deeper than"),  # 5 levels of objects
        ({"list": [[[[1]]]]}, "nested deeper than"),
    ],
)
async def test_contact_attributes_are_bounded_in_keys_key_length_and_depth(env, attributes, reason):
    body = [{"external_id": "ok", "attributes": {"a": 1}}, {"external_id": "bad", "attributes": attributes}]
    problem = assert_problem(await env.call("POST", "/v1/contacts", json=body), 422)
    [field] = error_fields(problem)
    assert field.startswith("[1].attributes"), problem
    assert reason in problem["errors"][0]["reason"], problem
    assert await env.fetchval("SELECT count(*) FROM contacts") == 0

    # and right at the limits it is accepted
    edge = {f"k{i}": i for i in range(limits.MAX_ATTRIBUTE_KEYS - 1)}
    edge["k" * limits.MAX_ATTRIBUTE_KEY_CHARS] = nested(limits.MAX_ATTRIBUTE_DEPTH - 1)  # 4 levels in all
    r = await env.call("POST", "/v1/contacts", 201, json={"external_id": "edge", "attributes": edge})
    assert r.json()["attributes"] == edge


async def test_attributes_merged_past_the_stored_limit_are_refused_and_nothing_changes(env):
    """Each request is within 64 KiB, but merging key by key would grow the stored attributes without
    bound, and a recipient that does not fit in a job could never be sent to."""
    chunk = "x" * (60 * KIB)
    await env.call("POST", "/v1/contacts", 201, json={"external_id": "m", "attributes": {"a": chunk}})
    await env.call("POST", "/v1/contacts", 200, json={"external_id": "m", "attributes": {"b": chunk}})
    r = await env.call("POST", "/v1/contacts", json=[{"external_id": "other"}, {"external_id": "m", "attributes": {"c": chunk}}])
    problem = assert_problem(r, 422)
    assert error_fields(problem) == ["[1].attributes"]
    assert f"{limits.MAX_STORED_ATTRIBUTES_BYTES:,} bytes" in problem["errors"][0]["reason"]
    keys = await env.fetchval("SELECT array_agg(k ORDER BY k) FROM contacts, jsonb_object_keys(attributes) k WHERE external_id = 'm'")
    assert keys == ["a", "b"]
    assert await env.fetchval("SELECT count(*) FROM contacts WHERE external_id = 'other'") == 0  # all or nothing

    # the same, merged within one request for a new contact
    r = await env.call("POST", "/v1/contacts", json=[{"external_id": "n", "attributes": {k: chunk}} for k in "abc"])
    assert error_fields(assert_problem(r, 422)) == ["[0].attributes", "[1].attributes", "[2].attributes"]
    assert await env.fetchval("SELECT count(*) FROM contacts WHERE external_id = 'n'") == 0


# ---- the limits are part of the API's contract ----


async def test_the_limits_are_in_the_openapi_schema(env):
    doc = (await env.call("GET", "/schema/openapi.json", 200)).json()
    schemas = doc["components"]["schemas"]
    content_in = next(s for name, s in schemas.items() if name.endswith("ContentIn"))
    assert content_in["properties"]["html"]["maxLength"] == limits.MAX_HTML_CHARS
    assert content_in["properties"]["text"]["maxLength"] == limits.MAX_TEXT_CHARS
    content_patch = next(s for name, s in schemas.items() if name.endswith("ContentPatch"))
    assert _max_length(content_patch["properties"]["html"]) == limits.MAX_HTML_CHARS
    assert _max_length(content_patch["properties"]["from_email"]) == limits.MAX_ADDRESS_CHARS

    upsert = doc["paths"]["/v1/contacts"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    contact = upsert["oneOf"][0]
    attributes = next(a for a in contact["properties"]["attributes"].get("anyOf", [contact["properties"]["attributes"]])
                      if a.get("type") == "object")
    assert attributes["maxProperties"] == limits.MAX_ATTRIBUTE_KEYS
    assert attributes["propertyNames"]["maxLength"] == limits.MAX_ATTRIBUTE_KEY_CHARS


def _max_length(schema: dict[str, Any]) -> int | None:
    if "maxLength" in schema:
        return schema["maxLength"]
    for option in schema.get("oneOf", []) + schema.get("anyOf", []):
        if (found := _max_length(option)) is not None:
            return found
    return None


# ---- /readyz: lag of the relay and the projector ----


@pytest.fixture
async def quiet_env(settings) -> AsyncIterator[Env]:
    """The app with no background tasks (no relay, no projector) and a lag threshold of zero."""
    quiet = msgspec.structs.replace(settings, run_background=False, ready_max_lag_s=0.0)
    async for e in _env(quiet):
        yield e


async def test_readyz_reports_lag_and_is_503_while_the_relay_or_projector_is_behind(quiet_env):
    env = quiet_env
    ready = await env.call("GET", "/readyz", 200)
    assert ready.json()["relay"]["behind"] == 0 and ready.json()["parked_events"] == 0

    await env.call("POST", BROADCASTS, 201, json={"name": "x", "content": {"subject": "s"}})
    await asyncio.sleep(0.05)
    behind = await env.call("GET", "/readyz", 503)
    body = behind.json()
    assert body["status"] == "unavailable"
    assert body["relay"]["behind"] == 1 and body["relay"]["oldest_age_s"] > 0
    assert body["projector"]["behind"] == 1 and body["projector"]["oldest_age_s"] > 0
    assert body["checks"]["relay"].startswith("behind") and body["checks"]["projector"].startswith("behind")
    assert body["checks"]["postgres"] == "ok" and body["checks"]["nats"] == "ok"

    # The relay catches up; the projector is still behind.
    pool = await db.create_pool(env.settings.database_url, min_size=1, max_size=2)
    nc = await bus.connect(env.settings.nats_url, "test-limits")
    try:
        js = nc.jetstream()
        names = await bus.ensure_streams(js, env.settings)
        assert await relay.relay_once(pool, js, names) == 1
        body = (await env.call("GET", "/readyz", 503)).json()
        assert body["relay"] == {"behind": 0, "behind_capped": False, "oldest_age_s": 0.0}
        assert body["checks"]["relay"] == "ok" and body["projector"]["behind"] == 1

        for projection, then in async_projections():
            await projections.catch_up(pool, projection, then=then)
        body = (await env.call("GET", "/readyz", 200)).json()
        assert body["status"] == "ok" and body["projector"]["behind"] == 0
        assert set(body["checks"].values()) == {"ok"}
    finally:
        await nc.close()
        await pool.close()
