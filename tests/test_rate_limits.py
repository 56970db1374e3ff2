"""Tenant isolation at the door: request rates per token and per tenant, shared by every replica;
failed authentication slowed per address; progress streams limited per token and tenant; per-tenant
overrides. All against the real app and Postgres."""
from __future__ import annotations

import asyncio
import os
import re
import sys
import time
import uuid
from contextlib import AsyncExitStack

import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api_service.app import create_app
from shared.platform import db
from shared.platform.settings import Settings
from shared.tenants import limits
from tests.api_helpers import (  # noqa: F401  (tenant_tokens is a fixture)
    BROADCASTS,
    TenantTokens,
    assert_problem,
    bearer,
    new_broadcast,
    tenant_tokens,
)
from tests.stack import served

SLOW = 0.2  # requests per second: nothing comes back within a test's few seconds


def limited(settings: Settings, **limits_: object) -> Settings:
    """The test settings with small limits (conftest's are far above any test's pace)."""
    return msgspec.structs.replace(settings, **{
        "rate_limit_per_s": SLOW, "rate_limit_burst": 1000, "tenant_rate_limit_per_s": SLOW,
        "tenant_rate_limit_burst": 1000, **limits_,
    })


def items(field: str) -> dict[str, dict[str, str]]:
    """A RateLimit / RateLimit-Policy field value as {policy: {param: value}}."""
    parsed: dict[str, dict[str, str]] = {}
    for item in field.split(","):
        name, *params = item.strip().split(";")
        assert re.fullmatch(r'"[a-z]+"', name), field  # an sf-string naming the policy
        parsed[name.strip('"')] = dict(p.split("=", 1) for p in params)
    return parsed


async def test_a_token_over_its_rate_gets_429_with_retry_after_and_ratelimit_fields_and_another_tenant_does_not(
    settings, tenant_tokens: TenantTokens,
):
    async with AsyncTestClient(app=create_app(limited(settings, rate_limit_burst=5))) as api:
        # When one token makes 8 requests at once
        answers = [await api.get(BROADCASTS, headers=bearer(tenant_tokens.a_write)) for _ in range(8)]
        # And meanwhile another tenant's token, and the health checks, ask
        other = await api.get(BROADCASTS, headers=bearer(tenant_tokens.b_write))
        health = [await api.get(path) for path in ("/healthz", "/readyz", "/schema/openapi.json") for _ in range(8)]

    # Then its burst of 5 passes, counting down, and the rest are refused
    assert [a.status_code for a in answers] == [200] * 5 + [429] * 3
    remaining = [int(items(a.headers["ratelimit"])["token"]["r"]) for a in answers[:5]]
    assert remaining == [4, 3, 2, 1, 0]
    assert items(answers[0].headers["ratelimit-policy"]) == {
        "token": {"q": "5", "w": "25"}, "tenant": {"q": "1000", "w": "5000"}}
    refused = answers[-1]
    problem = assert_problem(refused, 429, "rate_limited")
    assert problem["violated_policies"] == ["token"]
    assert 1 <= int(refused.headers["retry-after"]) <= 5  # one request comes back every 5 s
    assert items(refused.headers["ratelimit"])["token"]["r"] == "0"
    assert int(items(refused.headers["ratelimit"])["token"]["t"]) >= int(refused.headers["retry-after"])
    assert "token" in items(refused.headers["ratelimit-policy"])
    # And the other tenant is not slowed by it; health checks and the schema are never limited
    assert other.status_code == 200 and items(other.headers["ratelimit"])["token"]["r"] == "4"
    assert {h.status_code for h in health} == {200}
    assert not any("ratelimit" in h.headers for h in health)


async def test_a_spent_burst_comes_back_at_the_rate(settings, tenant_tokens: TenantTokens):
    async with AsyncTestClient(app=create_app(limited(settings, rate_limit_per_s=4.0, rate_limit_burst=2))) as api:
        first = [(await api.get(BROADCASTS, headers=bearer(tenant_tokens.a_read))).status_code for _ in range(3)]
        await asyncio.sleep(0.6)  # 2.4 requests' worth
        later = [(await api.get(BROADCASTS, headers=bearer(tenant_tokens.a_read))).status_code for _ in range(3)]
    assert first == [200, 200, 429]
    assert later == [200, 200, 429]


async def test_a_tenants_limit_covers_all_its_tokens(settings, tenant_tokens: TenantTokens):
    async with AsyncTestClient(app=create_app(limited(settings, tenant_rate_limit_burst=6))) as api:
        # Given tenant A's two tokens, each well within its own burst
        a = [(await api.get(BROADCASTS, headers=bearer(t))).status_code
             for t in (tenant_tokens.a_write, tenant_tokens.a_read) * 4]
        last = await api.get(BROADCASTS, headers=bearer(tenant_tokens.a_read))
        b = await api.get(BROADCASTS, headers=bearer(tenant_tokens.b_read))
    # Then together they get the tenant's 6, and tenant B its own
    assert a == [200] * 6 + [429] * 2
    assert assert_problem(last, 429)["violated_policies"] == ["tenant"]
    assert b.status_code == 200


async def test_two_api_replicas_count_together(settings, tenant_tokens: TenantTokens):
    # Given two API instances on one database (the second not running the background tasks)
    first = create_app(limited(settings, rate_limit_burst=4))
    second = create_app(limited(settings, rate_limit_burst=4, run_background=False))
    async with AsyncTestClient(app=first) as one, AsyncTestClient(app=second) as two:
        # When a token alternates between them
        statuses = [(await api.get(BROADCASTS, headers=bearer(tenant_tokens.a_write))).status_code
                    for api in (one, two) * 4]
    # Then its burst of 4 is spent across both
    assert statuses == [200] * 4 + [429] * 4


async def test_repeated_bad_tokens_from_one_address_get_429_before_the_token_is_looked_up(
    settings, tenant_tokens: TenantTokens,
):
    slow_auth = limited(settings, auth_failures_per_minute=3)
    async with AsyncTestClient(app=create_app(slow_auth)) as api, \
            AsyncTestClient(app=create_app(msgspec.structs.replace(slow_auth, run_background=False))) as replica:
        # When one address tries 5 made-up tokens
        guesses = [await api.get(BROADCASTS, headers=bearer(f"crier_guess{i}")) for i in range(5)]
        # Then (and even with a real token, whose lookup would succeed) it is held off
        real = await api.get(BROADCASTS, headers=bearer(tenant_tokens.a_write))
        health = await api.get("/healthz")
        # And another replica counts the same failures: its first failure from that address is a 429
        elsewhere = await replica.get(BROADCASTS, headers=bearer("crier_guess-elsewhere"))

    assert [g.status_code for g in guesses] == [401, 401, 401, 429, 429]
    for refused in (*guesses[3:], real, elsewhere):
        assert_problem(refused, 429, "rate_limited")
        assert 1 <= int(refused.headers["retry-after"]) <= 20  # 3 a minute: one back every 20 s
    assert health.status_code == 200


async def wait_until(predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := await predicate()):
        assert time.monotonic() < deadline, "gave up waiting"
        await asyncio.sleep(0.1)
    return result


async def test_progress_streams_over_the_limit_get_429_and_a_closed_stream_frees_its_slot(
    settings, tenant_tokens: TenantTokens,
):
    t = tenant_tokens
    streams = limited(settings, rate_limit_per_s=1000.0, tenant_rate_limit_per_s=1000.0,
                      progress_streams_per_token=2, progress_streams_per_tenant=3)
    # A dead replica's leases: expired, they take no slot of tenant B's
    con = await db.connect(settings.database_url)
    try:
        await con.executemany(
            "INSERT INTO stream_leases (id, tenant_id, token_id, expires_at) VALUES ($1, $2, $3, now() - interval '1 s')",
            [(uuid.uuid4(), t.b_id, t.b_write.id) for _ in range(5)],
        )
    finally:
        await con.close()
    async with served(create_app(streams)) as base_url, httpx.AsyncClient(base_url=base_url, timeout=30) as client, \
            AsyncExitStack() as open_streams:
        # Given a draft broadcast of each tenant (its progress stream stays open until a run starts)
        a_id = (await client.post(BROADCASTS, json=new_broadcast(), headers=bearer(t.a_write))).json()["id"]
        b_id = (await client.post(BROADCASTS, json=new_broadcast(), headers=bearer(t.b_write))).json()["id"]

        async def follow(token, broadcast_id: str) -> httpx.Response:  # type: ignore[no-untyped-def]
            return await open_streams.enter_async_context(
                client.stream("GET", f"{BROADCASTS}/{broadcast_id}/progress", headers=bearer(token)))

        a1, a2 = await follow(t.a_write, a_id), await follow(t.a_write, a_id)
        a3 = await follow(t.a_write, a_id)  # over the token's 2
        a_read1 = await follow(t.a_read, a_id)  # the tenant's 3rd
        a_read2 = await follow(t.a_read, a_id)  # over the tenant's 3
        b1, b2 = await follow(t.b_write, b_id), await follow(t.b_write, b_id)  # another tenant, expired leases aside
        assert [s.status_code for s in (a1, a2, a_read1, b1, b2)] == [200] * 5
        assert a1.headers["content-type"].startswith("text/event-stream")
        for refused, policy in ((a3, "token"), (a_read2, "tenant")):
            await refused.aread()
            problem = assert_problem(refused, 429, "rate_limited")
            assert problem["violated_policies"] == ["streams"] and policy in problem["detail"]
            assert int(refused.headers["retry-after"]) >= 1
            assert items(refused.headers["ratelimit-policy"])["streams"]["qu"] == '"concurrent-requests"'
            assert items(refused.headers["ratelimit"])["streams"]["r"] == "0"

        # When a stream closes, its slot is free again
        await a1.aclose()

        async def reopened() -> httpx.Response | None:
            again = await follow(t.a_write, a_id)
            if again.status_code == 200:
                return again
            await again.aclose()
            return None

        assert (await wait_until(reopened)).status_code == 200
    # And once every stream has ended, no lease is left behind
    con = await db.connect(settings.database_url)
    try:
        left = await wait_until(lambda: con.fetchval(
            "SELECT count(*) = 0 FROM stream_leases WHERE expires_at > now()"), timeout=10)
    finally:
        await con.close()
    assert left


async def test_a_tenant_override_set_by_the_cli_changes_that_tenants_limits_only(settings, tenant_tokens: TenantTokens):
    t = tenant_tokens
    # Given defaults of a burst of 2 per token, and tenant A given 5 through the CLI
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.tooling.cli", "tenant", "limits", str(t.a_id), "--burst", "5",
        "--requests-per-s", "0.5",
        env={**os.environ, "CRIER_DATABASE_URL": settings.database_url, "CRIER_RATE_LIMIT_BURST": "2",
             "CRIER_LOG_LEVEL": "warning"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await cli.communicate()
    assert cli.returncode == 0, err.decode()
    shown = dict(line.split(" ", 1) for line in out.decode().splitlines())
    assert shown["burst"] == "5 (tenant)" and shown["requests_per_s"] == "0.5 (tenant)"
    assert shown["tenant_burst"].endswith("(default)")

    async with AsyncTestClient(app=create_app(limited(settings, rate_limit_burst=2))) as api:
        a = [(await api.get(BROADCASTS, headers=bearer(t.a_write))).status_code for _ in range(6)]
        b = [(await api.get(BROADCASTS, headers=bearer(t.b_write))).status_code for _ in range(3)]
        policy = items((await api.get(BROADCASTS, headers=bearer(t.a_read))).headers["ratelimit-policy"])
    assert a == [200] * 5 + [429]
    assert b == [200] * 2 + [429]
    assert policy["token"] == {"q": "5", "w": "10"}

    # And a bad override is refused, naming the problem
    con = await db.connect(settings.database_url)
    try:
        for bad in ({"burst": 0}, {"requests_per_s": -1}, {"nonsense": 1}, {"burst": 1.5}):
            with pytest.raises(ValueError):
                await limits.set_overrides(con, t.a_id, bad)
        with pytest.raises(LookupError):
            await limits.set_overrides(con, uuid.uuid4(), {"burst": 3})
        assert await limits.set_overrides(con, t.a_id, {}, clear=("burst",)) == {"requests_per_s": 0.5}
    finally:
        await con.close()
