"""Authentication and authorization of the REST API: bearer tokens, scopes, tenant isolation."""
from __future__ import annotations

import uuid

import pytest

from tests.api_helpers import (  # noqa: F401  (api, tenant_tokens are fixtures)
    BROADCASTS,
    api,
    assert_problem,
    bearer,
    create_broadcast,
    list_ids,
    list_total,
    new_broadcast,
    revoke,
    tenant_tokens,
)

# ---- 401: no, malformed, unknown or revoked token ----


async def test_missing_authorization_header_is_401_problem(api):
    response = await api.get(BROADCASTS)
    body = assert_problem(response, 401, "unauthorized")
    assert response.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert body["type"] == "urn:crier:problem:unauthorized"


@pytest.mark.parametrize(
    "header",
    ["Token x", "Bearer", "Bearer ", "Bearer a b", "Basic dXNlcjpwYXNz", "bearer"],
)
async def test_malformed_authorization_header_is_401(api, tenant_tokens, header):
    response = await api.get(BROADCASTS, headers={"Authorization": header})
    assert_problem(response, 401, "unauthorized")


async def test_a_real_token_behind_the_wrong_scheme_is_401(api, tenant_tokens):
    response = await api.get(BROADCASTS, headers={"Authorization": f"Token {tenant_tokens.a_write.token}"})
    assert_problem(response, 401, "unauthorized")


async def test_unknown_token_is_401(api, tenant_tokens):
    response = await api.get(BROADCASTS, headers=bearer("crier_this-token-was-never-issued"))
    assert_problem(response, 401, "unauthorized")


async def test_revoked_token_is_401_on_the_next_request(api, settings, tenant_tokens):
    token = tenant_tokens.a_write
    assert (await api.get(BROADCASTS, headers=bearer(token))).status_code == 200

    assert await revoke(settings, token)

    assert_problem(await api.get(BROADCASTS, headers=bearer(token)), 401, "unauthorized")
    assert_problem(await api.post(BROADCASTS, json=new_broadcast(), headers=bearer(token)), 401, "unauthorized")
    # the tenant's other tokens are untouched
    assert (await api.get(BROADCASTS, headers=bearer(tenant_tokens.a_read))).status_code == 200


async def test_401_writes_nothing(api, tenant_tokens):
    response = await api.post(BROADCASTS, json=new_broadcast(), headers=bearer("crier_nope"))
    assert_problem(response, 401, "unauthorized")
    assert await list_total(api, tenant_tokens.a_read) == 0
    assert await list_total(api, tenant_tokens.b_read) == 0


# ---- 403: the read scope may look but not change ----


async def test_read_token_can_get_list_and_history(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    read = bearer(tenant_tokens.a_read)

    listed = await api.get(BROADCASTS, headers=read)
    assert listed.status_code == 200
    assert [item["id"] for item in listed.json()["items"]] == [created["id"]]

    one = await api.get(f"{BROADCASTS}/{created['id']}", headers=read)
    assert one.status_code == 200
    assert one.json()["id"] == created["id"]

    history = await api.get(f"{BROADCASTS}/{created['id']}/events", headers=read)
    assert history.status_code == 200
    assert history.json()["total"] == 1


async def test_read_token_cannot_create(api, tenant_tokens):
    response = await api.post(BROADCASTS, json=new_broadcast(), headers=bearer(tenant_tokens.a_read))
    assert_problem(response, 403, "forbidden")
    assert await list_total(api, tenant_tokens.a_read) == 0


async def test_read_token_cannot_edit(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    url = f"{BROADCASTS}/{created['id']}"

    response = await api.patch(url, json={"name": "Renamed"}, headers=bearer(tenant_tokens.a_read))
    assert_problem(response, 403, "forbidden")

    after = (await api.get(url, headers=bearer(tenant_tokens.a_read))).json()
    assert after == created  # same name, same version, same updated_at
    history = (await api.get(f"{url}/events", headers=bearer(tenant_tokens.a_read))).json()
    assert [e["type"] for e in history["items"]] == ["BroadcastCreated"]


async def test_read_token_cannot_delete(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    url = f"{BROADCASTS}/{created['id']}"

    response = await api.delete(url, headers=bearer(tenant_tokens.a_read))
    assert_problem(response, 403, "forbidden")

    assert (await api.get(url, headers=bearer(tenant_tokens.a_read))).status_code == 200
    assert await list_ids(api, tenant_tokens.a_read) == [created["id"]]


# ---- another tenant's broadcast is a 404, never a 403 ----


async def test_other_tenant_cannot_see_or_touch_a_broadcast(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    url = f"{BROADCASTS}/{created['id']}"
    b_write = bearer(tenant_tokens.b_write)

    assert_problem(await api.get(url, headers=b_write), 404, "not_found")
    assert_problem(await api.get(f"{url}/events", headers=b_write), 404, "not_found")
    assert_problem(await api.patch(url, json={"name": "Hijacked"}, headers=b_write), 404, "not_found")
    assert_problem(
        await api.patch(url, json={"content": {"subject": "Hijacked"}}, headers=b_write), 404, "not_found"
    )
    assert_problem(await api.delete(url, headers=b_write), 404, "not_found")

    # tenant B's read token too (a 403 here would leak that the id exists)
    assert_problem(await api.get(url, headers=bearer(tenant_tokens.b_read)), 404, "not_found")

    listed = (await api.get(BROADCASTS, headers=b_write)).json()
    assert listed["items"] == [] and listed["total"] == 0

    # tenant A's broadcast is untouched
    after = (await api.get(url, headers=bearer(tenant_tokens.a_read))).json()
    assert after == created
    history = (await api.get(f"{url}/events", headers=bearer(tenant_tokens.a_read))).json()
    assert [e["type"] for e in history["items"]] == ["BroadcastCreated"]


async def test_other_tenant_and_missing_broadcast_look_the_same(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    b_write = bearer(tenant_tokens.b_write)
    theirs = await api.get(f"{BROADCASTS}/{created['id']}", headers=b_write)
    missing = await api.get(f"{BROADCASTS}/{uuid.uuid4()}", headers=b_write)
    assert theirs.status_code == missing.status_code == 404
    assert {k: v for k, v in theirs.json().items() if k != "instance"} == {
        k: v for k, v in missing.json().items() if k != "instance"
    }


async def test_each_tenant_lists_only_its_own(api, tenant_tokens):
    a1 = await create_broadcast(api, tenant_tokens.a_write, name="A one")
    a2 = await create_broadcast(api, tenant_tokens.a_write, name="A two")
    b1 = await create_broadcast(api, tenant_tokens.b_write, name="B one")

    assert sorted(await list_ids(api, tenant_tokens.a_read)) == sorted([a1["id"], a2["id"]])
    assert await list_ids(api, tenant_tokens.b_read) == [b1["id"]]
    assert await list_total(api, tenant_tokens.a_read) == 2
    assert await list_total(api, tenant_tokens.b_read) == 1


# ---- public endpoints ----


async def test_healthz_needs_no_token(api):
    response = await api.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


async def test_readyz_needs_no_token(api):
    response = await api.get("/readyz")
    assert response.status_code == 200


async def test_openapi_schema_needs_no_token_and_documents_bearer(api):
    response = await api.get("/schema/openapi.json")
    assert response.status_code == 200, response.text
    schema = response.json()
    assert schema["openapi"].startswith("3.")

    schemes = schema["components"]["securitySchemes"]
    bearer_schemes = [s for s in schemes.values() if s.get("type") == "http" and s.get("scheme") == "bearer"]
    assert bearer_schemes, schemes
    name = next(n for n, s in schemes.items() if s in bearer_schemes)
    assert {name: []} in schema.get("security", []), schema.get("security")

    assert "/v1/broadcasts" in schema["paths"]
    assert "/v1/broadcasts/{broadcast_id}/events" in schema["paths"]


async def test_interactive_docs_need_no_token(api):
    response = await api.get("/schema")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
