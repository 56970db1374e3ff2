"""The OpenAPI document against the running app. What it says about errors, headers and media types
(read from the document), and, checked by schemathesis: for requests generated from the document
(valid ones, and invalid ones), the app never answers a 5xx, and answers only the statuses, media
types and bodies the document says it can. Real app, Postgres and nats-server.

Bounded and repeatable: a fixed seed and a fixed number of examples per operation, so the file runs
in about a minute and a half; schemathesis's own Python API (4.x: `openapi.from_dict`, `operation.as_strategy`,
`case.call`, `case.validate_response`) under Hypothesis's `given`."""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from api_service.app import create_app
from shared.kernel import limits
from shared.platform import db
from shared.platform.settings import Settings
from shared.tenants import store as tenants
from tests.stack import served

SEED = 20261201
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 10}  # per operation
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Strings are generated at most this long: drawing a 512 Ki-character html to match its pattern takes
# a third of a second a case. Generation only: the responses are checked against the document as
# served (the limits themselves are tested in tests/test_limits.py).
GENERATED_MAX_LENGTH = 1000
# Path parameters of objects that exist, so that cases reach the handlers rather than only 404s. Not
# for the progress stream: on a draft it streams until the broadcast ends, which it never does here.
STREAMS = {"/v1/broadcasts/{broadcast_id}/progress"}
_KEYS = itertools.count()


@pytest.mark.fuzz
async def test_the_app_answers_only_what_its_openapi_document_says_and_never_a_5xx(settings):
    settings = msgspec.structs.replace(settings, run_background=False)
    token = await _write_token(settings)
    async with served(create_app(settings)) as base_url, httpx.AsyncClient(base_url=base_url) as http:
        auth = {"Authorization": f"Bearer {token}"}
        document = (await http.get("/schema/openapi.json")).json()
        ids = await _objects(http, auth)
        started = time.monotonic()
        # In a thread: schemathesis calls with `requests`, and the server runs on this event loop.
        cases, failures = await asyncio.to_thread(_fuzz, document, base_url, auth, ids)
        took = time.monotonic() - started
    print(f"schemathesis: {cases} cases in {took:.1f} s")
    assert not failures, "\n\n".join(failures)


# ---- what the document says ----

METHODS = {"get", "post", "put", "patch", "delete"}


async def test_every_error_is_documented_as_problem_details_with_retry_after_where_it_is_sent(settings):
    async with served(create_app(msgspec.structs.replace(settings, run_background=False))) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as http:
            document = (await http.get("/schema/openapi.json")).json()
    operations = [(path, method, op) for path, item in document["paths"].items()
                  for method, op in item.items() if method in METHODS]
    for path, method, op in operations:
        where = f"{method.upper()} {path}"
        errors = {status: r for status, r in op["responses"].items() if int(status) >= 400}
        # /u/: tests/test_suppressions.py; /m/: tests/test_media.py; /r/, /o/: tests/test_tracking_endpoints.py;
        # /v1/receipts/: tests/test_receipts.py (signed by the provider: no token, no Idempotency-Key)
        if path in ("/healthz", "/readyz") or path.startswith(("/u/", "/m/", "/r/", "/o/", "/v1/receipts/")):
            assert op["security"] == [], where  # no token needed
            continue
        assert {"401", "429", "503"} <= set(errors), where
        for status, response in errors.items():
            assert list(response["content"]) == ["application/problem+json"], (where, status)
            assert response["content"]["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
            assert ("Retry-After" in (response.get("headers") or {})) == (status in ("429", "503")), (where, status)
        if method == "post":
            assert {"409", "413", "422"} <= set(errors), where
            assert "Idempotency-Key" in [p["name"] for p in op.get("parameters", []) if p["in"] == "header"], where
        if "{" in path:
            assert "404" in errors, where
        if "requestBody" in op:
            assert {"400", "413", "422"} <= set(errors), where
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "code"}
    ready = document["paths"]["/readyz"]["get"]["responses"]
    assert ready["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}
    progress = document["paths"]["/v1/broadcasts/{broadcast_id}/progress"]["get"]["responses"]["200"]
    assert list(progress["content"]) == ["text/event-stream"]
    for path in ("/v1/broadcasts/{broadcast_id}", "/v1/lists/{list_id}", "/v1/providers/{provider_id}"):
        assert "409" in document["paths"][path]["delete"]["responses"], path


async def test_the_document_shows_the_character_and_paging_limits(settings):
    async with served(create_app(msgspec.structs.replace(settings, run_background=False))) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as http:
            document = (await http.get("/schema/openapi.json")).json()
    schemas = document["components"]["schemas"]
    content_in = next(s for name, s in schemas.items() if name.endswith("ContentIn"))
    assert content_in["properties"]["subject"]["pattern"] == limits.ONE_LINE_PATTERN
    assert content_in["properties"]["html"]["pattern"] == limits.NO_NUL_PATTERN
    create = next(s for name, s in schemas.items() if name.endswith("BroadcastCreate"))
    assert create["properties"]["name"]["pattern"] == limits.NO_NUL_PATTERN
    lists = {p["name"]: p["schema"] for p in document["paths"]["/v1/lists"]["get"]["parameters"]}
    assert lists["offset"]["maximum"] == 2**63 - 1 and lists["limit"]["maximum"] == 500


async def test_a_405_allows_exactly_the_methods_the_document_has(settings):
    settings = msgspec.structs.replace(settings, run_background=False)
    token = await _write_token(settings)
    async with served(create_app(settings)) as base_url, httpx.AsyncClient(base_url=base_url) as http:
        document = (await http.get("/schema/openapi.json")).json()
        ids = {"{broadcast_id}": "00000000-0000-0000-0000-000000000000", "{list_id}": "00000000-0000-0000-0000-000000000000",
               "{provider_id}": "00000000-0000-0000-0000-000000000000", "{contact_id}": "1"}
        for path, item in document["paths"].items():
            url = path
            for name, value in ids.items():
                url = url.replace(name, value)
            response = await http.put(url, headers={"Authorization": f"Bearer {token}"}, json={})
            if "put" in item:
                continue
            assert response.status_code == 405, (path, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            allowed = {m.strip() for m in response.headers["allow"].split(",")}
            # A media file and a tracked link also answer HEAD (left out of the document, as HEAD usually is).
            head = {"HEAD"} if path.startswith(("/m/", "/r/")) else set()
            assert allowed == {m.upper() for m in item if m in METHODS} | {"OPTIONS"} | head, path


async def _write_token(settings: Settings) -> str:
    con = await db.connect(settings.database_url)
    try:
        tenant = await tenants.create_tenant(con, "fuzz")
        return (await tenants.create_token(con, tenant.id, "write")).token
    finally:
        await con.close()


async def _objects(http: httpx.AsyncClient, auth: dict[str, str]) -> dict[str, Any]:
    """One object of each kind, by the name of the path parameter that names it."""
    async def created(path: str, body: Any) -> Any:
        response = await http.post(path, json=body, headers=auth)
        assert response.status_code in (200, 201), response.text
        return response.json()

    contact = await created("/v1/contacts", {"external_id": "ann", "email": "ann@example.com"})
    members = await created("/v1/lists", {"name": "everyone"})
    await created(f"/v1/lists/{members['id']}/members", {"contact_ids": [contact["id"]]})
    # A null provider: an SMTP one's /test would try to reach the host it names.
    provider = await created("/v1/providers", {"kind": "null", "name": "dry run"})
    broadcast = await created("/v1/broadcasts", {"name": "b", "content": {"subject": "Hi {{ first_name }}"},
                                                 "list_id": members["id"], "provider_id": provider["id"]})
    return {"broadcast_id": broadcast["id"], "list_id": members["id"], "provider_id": provider["id"],
            "contact_id": contact["id"]}


def _fuzz(document: dict[str, Any], base_url: str, auth: dict[str, str], ids: dict[str, Any]) -> tuple[int, list[str]]:
    """Every operation in both generation modes; the number of cases run and a report per failure."""
    schema = schemathesis.openapi.from_dict(_capped(document))
    cases, failures = 0, []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode, examples in EXAMPLES.items():
                if mode is GenerationMode.NEGATIVE and not (list(operation.iter_parameters()) or operation.body):
                    continue  # nothing in the request to make invalid
                test = _test(operation, mode, examples, ids, lambda case: _call(case, session, base_url, auth))
                try:
                    cases += test()
                except Exception as exc:  # every operation is tried; all failures are reported together
                    failures.append(f"{operation.label} ({mode.value}): {exc}")
    return cases, failures


def _capped(node: Any) -> Any:
    """The document with every maxLength over GENERATED_MAX_LENGTH lowered to it (see there)."""
    if isinstance(node, dict):
        return {k: min(v, GENERATED_MAX_LENGTH) if k == "maxLength" and isinstance(v, int) else _capped(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_capped(v) for v in node]
    return node


def _test(operation: Any, mode: GenerationMode, examples: int, ids: dict[str, Any],
          call: Callable[[Any], None]) -> Callable[[], int]:
    """A Hypothesis test of `operation`: generated path parameters, and sometimes those of real objects."""
    strategies = [operation.as_strategy(generation_mode=mode)]
    known = {p.name: ids[p.name] for p in operation.path_parameters if p.name in ids}
    if known and operation.path not in STREAMS and mode is GenerationMode.POSITIVE:
        strategies.append(operation.as_strategy(generation_mode=mode, path_parameters=known))
    ran = 0

    @seed(SEED)
    @hypothesis_settings(
        max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def test(case: Any) -> None:
        nonlocal ran
        ran += 1
        call(case)

    def run() -> int:
        test()
        return ran

    return run


def _call(case: Any, session: requests.Session, base_url: str, auth: dict[str, str]) -> None:
    if case.headers and "Idempotency-Key" in case.headers and case.meta.generation.mode.is_positive:
        # Generated keys repeat ("0", "00" ...) across operations and bodies, so most cases would only
        # meet the 422 for a key reused with another request: a key of its own for each (its shape is
        # what the document says; keys out of shape are the negative cases').
        case.headers["Idempotency-Key"] = f"fuzz-{next(_KEYS)}"
    response = case.call(base_url=base_url, session=session, headers=auth, timeout=30)
    case.validate_response(response, checks=CHECKS, headers=auth)
