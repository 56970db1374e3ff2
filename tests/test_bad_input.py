"""Bad input and faults through the real API: each is a 4xx naming what is wrong (or a 503 with
Retry-After when a dependency is down), as RFC 9457 problem details, never a 500, and nothing is
written. Real app, Postgres and nats-server."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api_service.app import create_app
from shared.broadcasts.schedule import check_interval
from shared.kernel import limits
from shared.platform import db
from shared.platform.settings import Settings
from shared.tenants import store as tenants
from tests.api_helpers import PROBLEM_JSON, assert_problem, bearer, error_fields
from tests.stack import served

NUL = "cannot contain the character U+0000"
ONE_LINE = "must be one line: no CR, LF or U+0000"
BIGINT_MAX = 2**63 - 1
# What a request could write to; a refused one must leave every row as it was.
TABLES = ("events", "broadcasts", "contacts", "lists", "list_members", "providers", "idempotency_keys")


class Env(msgspec.Struct):
    """The app, a write token, and one object of each kind to aim requests at."""

    http: AsyncTestClient
    headers: dict[str, str]
    settings: Settings
    ids: dict[str, str]

    async def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self.http.request(method, path.format(**self.ids), headers=self.headers, **kw)

    async def footprint(self) -> dict[str, str | None]:
        """A digest of every table a request could write to."""
        con = await db.connect(self.settings.database_url)
        try:
            return {t: await con.fetchval(f"SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {t} t")
                    for t in TABLES}
        finally:
            await con.close()

    async def refused(self, method: str, path: str, status: int, **kw: Any) -> dict[str, Any]:
        """The request's problem, after checking it is one with `status` and wrote nothing."""
        before = await self.footprint()
        response = await self.call(method, path, **kw)
        problem = assert_problem(response, status)
        assert await self.footprint() == before, f"{method} {path} -> {status} but wrote something"
        return problem


@asynccontextmanager
async def env_for(settings: Settings) -> AsyncIterator[Env]:
    settings = msgspec.structs.replace(settings, run_background=False)
    con = await db.connect(settings.database_url)
    tenant = await tenants.create_tenant(con, "bad input")
    token = await tenants.create_token(con, tenant.id, "write")
    await con.close()
    async with AsyncTestClient(app=create_app(settings)) as http:
        env = Env(http, bearer(token), settings, {})
        env.ids = await _objects(env)
        yield env


async def _objects(env: Env) -> dict[str, str]:
    async def created(path: str, body: Any) -> Any:
        response = await env.call("POST", path, json=body)
        assert response.status_code in (200, 201), response.text
        return response.json()

    return {
        "broadcast": (await created("/v1/broadcasts", {"name": "b", "content": {"subject": "s"}}))["id"],
        "list": (await created("/v1/lists", {"name": "l"}))["id"],
        "provider": (await created("/v1/providers", {
            "kind": "smtp", "name": "p", "host": "smtp.example.com", "from_email": "news@example.com",
        }))["id"],
        "contact": str((await created("/v1/contacts", {"external_id": "ann", "email": "ann@example.com"}))["id"]),
    }


@pytest.fixture
async def env(settings) -> AsyncIterator[Env]:
    async with env_for(settings) as e:
        yield e


# ---- paging: an offset past Postgres's bigint, a huge limit ----

LISTS = [
    "/v1/broadcasts", "/v1/broadcasts/{broadcast}/events", "/v1/broadcasts/{broadcast}/messages",
    "/v1/contacts", "/v1/lists", "/v1/providers",
]


async def test_an_offset_or_limit_past_what_postgres_takes_is_a_422_on_every_list(env):
    for path in LISTS:
        for params, field in (({"offset": 2**63}, "offset"), ({"offset": 10**30}, "offset"),
                              ({"limit": 2**63}, "limit"), ({"limit": 10**30}, "limit")):
            problem = await env.refused("GET", path, 422, params=params)
            assert error_fields(problem) == [field], (path, params, problem)


async def test_the_largest_offset_is_an_empty_page(env):
    for path in LISTS:
        response = await env.call("GET", path, params={"offset": BIGINT_MAX})
        assert response.status_code == 200, (path, response.text)
        assert response.json()["items"] == [] and response.json()["offset"] == BIGINT_MAX


# ---- U+0000: Postgres text and jsonb cannot hold it ----

NUL_BODIES = [
    ("POST", "/v1/broadcasts", {"name": "a\u0000", "content": {"subject": "s"}}, "name"),
    ("POST", "/v1/broadcasts", {"name": "a", "content": {"subject": "s\u0000"}}, "content.subject"),
    ("POST", "/v1/broadcasts", {"name": "a", "content": {"subject": "s", "html": "<p>\u0000</p>"}}, "content.html"),
    ("POST", "/v1/broadcasts", {"name": "a", "content": {"subject": "s", "text": "\u0000"}}, "content.text"),
    ("POST", "/v1/broadcasts", {"name": "a", "content": {"subject": "s", "from_email": "a\u0000@example.com"}},
     "content.from_email"),
    ("POST", "/v1/broadcasts", {"name": "a", "content": {"subject": "s"}, "recurring": True,
                                "cron": "0 9 * * 1\u0000"}, "cron"),
    ("PATCH", "/v1/broadcasts/{broadcast}", {"name": "\u0000"}, "name"),
    ("PATCH", "/v1/broadcasts/{broadcast}", {"content": {"text": "a\u0000b"}}, "content.text"),
    ("POST", "/v1/broadcasts/{broadcast}/schedule", {"scheduled_at": "2030-01-01T00:00:00", "timezone": "UTC\u0000"},
     "timezone"),
    ("POST", "/v1/broadcasts/{broadcast}/test", {"emails": ["ann\u0000@example.com"]}, "emails[0]"),
    ("POST", "/v1/lists", {"name": "l\u0000"}, "name"),
    ("POST", "/v1/lists/{list}/members", {"external_ids": ["ann", "b\u0000b"]}, "external_ids[1]"),
    ("DELETE", "/v1/lists/{list}/members", {"external_ids": ["\u0000"]}, "external_ids[0]"),
    ("POST", "/v1/contacts", {"external_id": "x\u0000"}, "external_id"),
    ("POST", "/v1/contacts", [{"external_id": "ok"}, {"external_id": "x\u0000"}], "[1].external_id"),
    ("POST", "/v1/contacts", {"external_id": "x", "attributes": {"k": "v\u0000"}}, "attributes"),
    ("POST", "/v1/providers", {"kind": "null", "name": "n\u0000"}, "name"),
    ("POST", "/v1/providers", {"kind": "smtp", "name": "s", "host": "smtp.example.com", "username": "u\u0000",
                               "password": "p", "from_email": "news@example.com"}, "username"),
    ("PATCH", "/v1/providers/{provider}", {"password": "\u0000", "username": "u"}, "password"),
]


# (One test per group of cases, each case checked in turn: an app per case would take a second each.)
async def test_a_nul_in_any_string_of_a_body_is_a_422_naming_the_field(env):
    for method, path, body, field in NUL_BODIES:
        problem = await env.refused(method, path, 422, json=body)
        header_line = field.endswith(("subject", "from_email", "reply_to"))  # their rule: one line, and no NUL
        assert {"field": field, "reason": ONE_LINE if header_line else NUL} in problem["errors"], (method, path, problem)


async def test_a_nul_in_a_filter_is_a_422_naming_it(env):
    for path, param in [
        ("/v1/contacts", "external_id"), ("/v1/contacts", "email"),
        ("/v1/providers", "channel"), ("/v1/providers", "kind"),
        ("/v1/broadcasts/{broadcast}/messages", "status"), ("/v1/broadcasts", "status"),
    ]:
        problem = await env.refused("GET", path, 422, params={param: "a\u0000"})
        assert error_fields(problem) == [param], (path, problem)


# ---- header lines: a CR or LF could never be sent ----

LINE_BREAKS = [
    ("POST", "/v1/broadcasts", {"name": "a", "content": {"subject": "Hi\r\nBcc: all@example.com"}}, "content.subject"),
    ("POST", "/v1/broadcasts", {"name": "a", "content": {"subject": "Hi\n"}}, "content.subject"),
    ("POST", "/v1/broadcasts", {"name": "a", "content": {"subject": "s", "from_email": "a@example.com\nBcc: b@x.io"}},
     "content.from_email"),
    ("POST", "/v1/broadcasts", {"name": "a", "content": {"subject": "s", "reply_to": "Ann\r <a@example.com>"}},
     "content.reply_to"),
    ("PATCH", "/v1/broadcasts/{broadcast}", {"content": {"subject": "a\rb"}}, "content.subject"),
    ("PATCH", "/v1/broadcasts/{broadcast}", {"content": {"reply_to": "a@example.com\r\n"}}, "content.reply_to"),
    ("POST", "/v1/providers", {"kind": "null", "name": "n", "from_email": "News\n <news@example.com>"}, "from_email"),
    ("PATCH", "/v1/providers/{provider}", {"from_email": "news@example.com\r\nX: y"}, "from_email"),
]


async def test_a_line_break_in_a_header_value_is_a_422_naming_the_field(env):
    for method, path, body, field in LINE_BREAKS:
        problem = await env.refused(method, path, 422, json=body)
        assert problem["errors"] == [{"field": field, "reason": ONE_LINE}], (method, path, problem)


# ---- JSON nested far deeper than any input ----

BODIES = [
    ("POST", "/v1/broadcasts"), ("PATCH", "/v1/broadcasts/{broadcast}"), ("POST", "/v1/broadcasts/{broadcast}/schedule"),
    ("POST", "/v1/broadcasts/{broadcast}/test"), ("POST", "/v1/broadcasts/{broadcast}/retry"), ("POST", "/v1/contacts"), ("POST", "/v1/lists"),
    ("POST", "/v1/lists/{list}/members"), ("DELETE", "/v1/lists/{list}/members"), ("POST", "/v1/providers"),
    ("PATCH", "/v1/providers/{provider}"),
]


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [1_000, 100_000])
async def test_json_nested_deeper_than_the_decoder_goes_is_a_4xx_everywhere(env, depth):
    headers = {**env.headers, "Content-Type": "application/json"}
    bodies = {
        "the body": nested(depth),
        "a field": b'{"name": "x", "attributes": ' + nested(depth) + b"}",
        "objects": b'{"a":' * depth + b"1" + b"}" * depth,
    }
    for method, path in BODIES:
        for what, body in bodies.items():
            before = await env.footprint()
            response = await env.http.request(method, path.format(**env.ids), content=body, headers=headers)
            assert response.status_code in (400, 422), (method, path, what, response.status_code, response.text[:300])
            assert_problem(response, response.status_code)
            assert await env.footprint() == before


# ---- numbers past a bigint ----

async def test_a_contact_id_no_bigint_holds_is_a_422_in_a_body_and_a_404_in_a_path(env):
    for contact_id in (2**63, 10**30, 0, -1):
        problem = await env.refused("POST", "/v1/broadcasts/{broadcast}/test", 422, json={"contact_ids": [contact_id]})
        assert error_fields(problem) == ["contact_ids[0]"], problem
    problem = await env.refused("POST", "/v1/lists/{list}/members", 422, json={"contact_ids": [1, 2**63]})
    assert error_fields(problem) == ["contact_ids[1]"], problem
    for method in ("GET", "DELETE"):
        await env.refused(method, f"/v1/contacts/{2**63}", 404)


# ---- schedules that could never run as asked ----

def _later(**delta: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(**delta)).isoformat()


SCHEDULES = [
    ({"recurring": True, "cron": "0 0 31 2 *"}, "cron", "never fires"),  # 31 February
    ({"recurring": True, "cron": "0 0 30 2 *", "timezone": "Europe/Paris"}, "cron", "never fires"),
    ({"recurring": True, "cron": "*/5 * * * *"}, "cron", "minimum interval"),
    ({"recurring": True, "cron": "0,30 9 * * 1"}, "cron", "minimum interval"),
    ({"recurring": True, "cron": "* * 29 2 *"}, "cron", "minimum interval"),  # every minute, one day in four years
    ({"scheduled_at": "9999-12-31T23:59:59Z"}, "scheduled_at", "10 years"),
    ({"scheduled_at": "9999-12-31T23:59:59", "timezone": "America/New_York"}, "scheduled_at", "10 years"),
    ({"scheduled_at": "9999-12-31T23:59:59-14:00"}, "scheduled_at", "10 years"),
    ({"scheduled_at": _later(days=limits.MAX_SCHEDULE_AHEAD_DAYS + 1)}, "scheduled_at", "10 years"),
    ({"scheduled_at": "0001-01-01T00:00:00+14:00"}, "scheduled_at", "future"),
    ({"scheduled_at": _later(days=1), "max_lateness_s": 10**30}, "max_lateness_s", "<="),
    ({"scheduled_at": _later(days=1), "max_lateness_s": 7 * 86400 + 1}, "max_lateness_s", "<="),
]


async def test_a_schedule_that_could_never_run_as_asked_is_a_422_on_create_and_on_schedule(env):
    new = {"name": "n", "content": {"subject": "s"}}
    for fields, field, says in SCHEDULES:
        created = await env.refused("POST", "/v1/broadcasts", 422, json={**new, **fields})
        scheduled = await env.refused("POST", "/v1/broadcasts/{broadcast}/schedule", 422, json=fields)
        for problem in (created, scheduled):
            assert error_fields(problem) == [field], (fields, problem)
            assert says in problem["errors"][0]["reason"], (fields, problem)


async def test_what_is_just_within_the_bounds_is_scheduled(env):
    hourly = await env.call("POST", "/v1/broadcasts/{broadcast}/schedule", json={
        "recurring": True, "cron": "0 * * * *", "timezone": "America/New_York", "max_lateness_s": 7 * 86400,
    })
    assert hourly.status_code == 200 and hourly.json()["recurring"], hourly.text
    far = await env.call("POST", "/v1/broadcasts/{broadcast}/schedule", json={
        "scheduled_at": _later(days=limits.MAX_SCHEDULE_AHEAD_DAYS - 1)})
    assert far.status_code == 200 and far.json()["status"] == "scheduled", far.text


@pytest.mark.parametrize(("cron", "minimum_h", "shortest"), [
    ("0 * * * *", 1, None), ("0 9 * * 1", 48, None), ("0 0,23 * * 1", 2, None),  # Mondays 00:00 and 23:00
    ("0 0,23 * * *", 2, "1 hour"),  # 23:00, then 00:00 the next day
    ("0 0,23 */2 * *", 2, "1 hour"),  # the 31st, then the 1st
    ("0 0,23 28,29 2 *", 2, "1 hour"),  # in a leap year only
    ("0 9 * * *", 48, "24 hours"), ("*/20 9 * * 1", 1, "20 minutes"),
])
def test_the_shortest_interval_of_a_cron_is_found_between_days_too(cron, minimum_h, shortest):
    if shortest is None:
        check_interval(cron, timedelta(hours=minimum_h))
    else:
        with pytest.raises(ValueError, match=f"fires {shortest} apart"):
            check_interval(cron, timedelta(hours=minimum_h))


async def test_the_minimum_cron_interval_is_a_setting(settings):
    async with env_for(msgspec.structs.replace(settings, min_cron_interval_s=300)) as env:
        every_5 = await env.call("POST", "/v1/broadcasts/{broadcast}/schedule",
                                 json={"recurring": True, "cron": "*/5 * * * *"})
        assert every_5.status_code == 200, every_5.text
        problem = await env.refused("POST", "/v1/broadcasts", 422, json={
            "name": "n", "content": {"subject": "s"}, "recurring": True, "cron": "* * * * *"})
        assert problem["errors"] == [{"field": "cron", "reason": (
            "fires 1 minute apart at the shortest; the minimum interval is 5 minutes")}]


# ---- a dependency that is down: 503 with Retry-After, never a 500, and back when it is ----

class Gate:
    """A TCP proxy in front of a server that the test can close: while closed, every connection
    through it is cut and new ones are refused, as when the server stops. Silenced, it cuts them too
    but takes new ones and never answers, as a host that went away behind a dropping firewall."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.silent = False
        self.pipes: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self.silent = False
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        self._cut()
        await self.server.wait_closed()

    def silence(self) -> None:
        self.silent = True
        self._cut()

    def _cut(self) -> None:
        for writer in list(self.pipes):
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.silent:
            self.pipes.add(writer)  # held open, unanswered, until cut
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.pipes |= {writer, up_writer}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        self.pipes -= {writer, up_writer}


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}{'@' if parts.username else ''}127.0.0.1:{port}"))


@asynccontextmanager
async def gated(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str], Gate, Gate]]:
    """The app served over HTTP with Postgres and NATS each behind a Gate."""
    pg_url, nats_url = urlsplit(settings.database_url), urlsplit(settings.nats_url)
    postgres, nats = Gate(pg_url.hostname or "127.0.0.1", pg_url.port or 5432), Gate(nats_url.hostname or "", nats_url.port or 4222)
    await postgres.open()
    await nats.open()
    gated_settings = msgspec.structs.replace(
        settings, run_background=False, database_url=_through(settings.database_url, postgres.port),
        nats_url=_through(settings.nats_url, nats.port),
    )
    con = await db.connect(settings.database_url)
    tenant = await tenants.create_tenant(con, "outage")
    token = await tenants.create_token(con, tenant.id, "write")
    await con.close()
    async with served(create_app(gated_settings)) as base_url, httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        yield http, bearer(token), postgres, nats
        for gate in (postgres, nats):  # open again, so that the app can shut down cleanly
            if gate.server is not None and not gate.server.is_serving():
                await gate.open()
            gate.silent = False


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, f"{response.request.method} {response.request.url} -> {response.text}"
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert int(response.headers["retry-after"]) > 0
    problem = response.json()
    assert problem["code"] == "unavailable" and problem["retry_after"] == int(response.headers["retry-after"])


async def test_postgres_down_is_a_503_with_retry_after_on_every_route_and_back_once_it_is_up(settings):
    async with gated(settings) as (http, headers, postgres, _):
        created = await http.post("/v1/lists", json={"name": "before"}, headers=headers)
        assert created.status_code == 201, created.text

        await postgres.close()
        requests = [
            ("GET", "/v1/broadcasts", None), ("GET", f"/v1/lists/{created.json()['id']}", None),
            ("POST", "/v1/lists", {"name": "during"}), ("POST", "/v1/broadcasts", {"name": "b", "content": {"subject": "s"}}),
            ("POST", "/v1/contacts", [{"external_id": "a"}]), ("DELETE", "/v1/contacts/1", None),
        ]
        for method, path, body in requests:
            started = time.monotonic()
            response = await http.request(method, path, json=body, headers=headers)
            assert_unavailable(response)
            assert time.monotonic() - started < 10, "a request hung while Postgres was down"
        keyed = await http.post("/v1/lists", json={"name": "keyed"}, headers={**headers, "Idempotency-Key": "k1"})
        assert_unavailable(keyed)
        no_token = await http.get("/v1/lists", headers={"Authorization": "Bearer crier_not_checkable_now"})
        assert_unavailable(no_token)  # a token cannot be checked either: not a 401
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["postgres"].startswith("error")

        await postgres.open()
        lists = await http.get("/v1/lists", headers=headers)
        assert lists.status_code == 200, lists.text
        assert [item["name"] for item in lists.json()["items"]] == ["before"]  # nothing half-written
        again = await http.post("/v1/lists", json={"name": "keyed"}, headers={**headers, "Idempotency-Key": "k1"})
        assert again.status_code == 201 and "idempotent-replayed" not in again.headers  # a 503 keeps no key
        assert (await http.get("/readyz")).status_code == 200


async def test_an_unresponsive_postgres_is_a_503_within_the_connect_timeout(settings):
    async with gated(settings) as (http, headers, postgres, _):
        assert (await http.get("/v1/lists", headers=headers)).status_code == 200
        postgres.silence()
        started = time.monotonic()
        response = await http.get("/v1/lists", headers=headers)
        assert_unavailable(response)
        assert time.monotonic() - started < db.CONNECT_TIMEOUT_S + 3, "the request waited past the connect timeout"


async def test_nats_down_makes_readyz_say_not_ready_while_requests_on_postgres_go_on(settings):
    async with gated(settings) as (http, headers, _, nats):
        await nats.close()
        ready = await http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["nats"] != "ok" and ready.json()["checks"]["postgres"] == "ok"
        created = await http.post("/v1/broadcasts", json={"name": "b", "content": {"subject": "s"}}, headers=headers)
        assert created.status_code == 201, created.text  # commands go to Postgres; the relay publishes later
        await nats.open()
        for _ in range(100):  # the client reconnects by itself
            if (await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await http.get("/readyz")).status_code == 200
