"""/v1/broadcasts through the real app: create, read, list, edit, delete, history, and validation."""
from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from shared.platform import db
from tests.api_helpers import (  # noqa: F401  (api, tenant_tokens are fixtures)
    BROADCASTS,
    api,
    assert_problem,
    bearer,
    create_broadcast,
    error_fields,
    list_ids,
    list_total,
    new_broadcast,
    tenant_tokens,
)

# A year to schedule in: in the future, and within the 10 years a one-off schedule may be ahead.
FUTURE_YEAR = datetime.now(timezone.utc).year + 2


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# ---- create, read, list ----


async def test_create_returns_201_and_a_draft(api, tenant_tokens):
    body = new_broadcast()
    response = await api.post(BROADCASTS, json=body, headers=bearer(tenant_tokens.a_write))

    assert response.status_code == 201, response.text
    created = response.json()
    uuid.UUID(created["id"])
    assert created["status"] == "draft"
    assert created["name"] == body["name"]
    assert created["channel"] == "email"
    assert created["list_id"] is None and created["provider_id"] is None
    assert created["content"] == body["content"]  # fields left at their defaults are left out
    assert created["version"] >= 1
    assert created["created_at"] == created["updated_at"]
    assert "tenant_id" not in created


async def test_create_fills_content_defaults(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write, content={"subject": "Just a subject"})
    assert created["content"] == {"subject": "Just a subject"}  # html and text empty, no from_email or reply_to


async def test_get_by_id_returns_what_create_returned(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    response = await api.get(f"{BROADCASTS}/{created['id']}", headers=bearer(tenant_tokens.a_read))
    assert response.status_code == 200
    assert response.json() == created


async def test_get_missing_broadcast_is_404_problem(api, tenant_tokens):
    response = await api.get(f"{BROADCASTS}/{uuid.uuid4()}", headers=bearer(tenant_tokens.a_read))
    assert_problem(response, 404, "not_found")


async def test_list_pages_with_total_limit_offset(api, tenant_tokens):
    ids = [(await create_broadcast(api, tenant_tokens.a_write, name=f"B{i}"))["id"] for i in range(5)]
    read = bearer(tenant_tokens.a_read)

    everything = (await api.get(BROADCASTS, headers=read)).json()
    assert everything["total"] == 5
    assert everything["limit"] == 50 and everything["offset"] == 0
    assert sorted(item["id"] for item in everything["items"]) == sorted(ids)

    first = (await api.get(BROADCASTS, params={"limit": 2}, headers=read)).json()
    second = (await api.get(BROADCASTS, params={"limit": 2, "offset": 2}, headers=read)).json()
    third = (await api.get(BROADCASTS, params={"limit": 2, "offset": 4}, headers=read)).json()
    beyond = (await api.get(BROADCASTS, params={"limit": 2, "offset": 10}, headers=read)).json()

    assert (first["total"], first["limit"], first["offset"], len(first["items"])) == (5, 2, 0, 2)
    assert (second["total"], second["limit"], second["offset"], len(second["items"])) == (5, 2, 2, 2)
    assert (third["total"], third["limit"], third["offset"], len(third["items"])) == (5, 2, 4, 1)
    assert beyond["total"] == 5 and beyond["items"] == []
    paged = [item["id"] for page in (first, second, third) for item in page["items"]]
    assert sorted(paged) == sorted(ids) and len(set(paged)) == 5
    assert paged == [item["id"] for item in everything["items"]]  # a stable order


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 501}, {"limit": "many"}, {"offset": -1}])
async def test_list_rejects_bad_paging(api, tenant_tokens, params):
    response = await api.get(BROADCASTS, params=params, headers=bearer(tenant_tokens.a_read))
    assert response.status_code in (400, 422), response.text
    assert_problem(response, response.status_code)


async def test_list_filters_by_status(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    read = bearer(tenant_tokens.a_read)

    drafts = (await api.get(BROADCASTS, params={"status": "draft"}, headers=read)).json()
    assert drafts["total"] == 1 and [i["id"] for i in drafts["items"]] == [created["id"]]

    completed = (await api.get(BROADCASTS, params={"status": "completed"}, headers=read)).json()
    assert completed["total"] == 0 and completed["items"] == []


async def test_list_rejects_an_unknown_status(api, tenant_tokens):
    await create_broadcast(api, tenant_tokens.a_write)
    response = await api.get(BROADCASTS, params={"status": "bogus"}, headers=bearer(tenant_tokens.a_read))
    assert response.status_code in (400, 422), response.text
    assert_problem(response, response.status_code)


# ---- edit ----


async def test_patch_merges_content(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    url = f"{BROADCASTS}/{created['id']}"

    response = await api.patch(url, json={"content": {"subject": "New subject"}}, headers=bearer(tenant_tokens.a_write))

    assert response.status_code == 200, response.text
    edited = response.json()
    assert edited["content"] == {**created["content"], "subject": "New subject"}
    assert edited["content"]["html"] == created["content"]["html"]
    assert edited["name"] == created["name"]
    assert edited["version"] > created["version"]
    assert parse_time(edited["updated_at"]) >= parse_time(created["updated_at"])
    assert edited["created_at"] == created["created_at"]
    assert (await api.get(url, headers=bearer(tenant_tokens.a_read))).json() == edited


async def test_patch_name_only_keeps_content(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    response = await api.patch(
        f"{BROADCASTS}/{created['id']}", json={"name": "Renamed"}, headers=bearer(tenant_tokens.a_write)
    )
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "Renamed"
    assert response.json()["content"] == created["content"]


async def test_patch_can_clear_a_nullable_content_field(api, tenant_tokens):
    created = await create_broadcast(
        api, tenant_tokens.a_write, content={"subject": "S", "reply_to": "replies@example.com"}
    )
    response = await api.patch(
        f"{BROADCASTS}/{created['id']}", json={"content": {"reply_to": None}}, headers=bearer(tenant_tokens.a_write)
    )
    assert response.status_code == 200, response.text
    assert "reply_to" not in response.json()["content"]  # null: left out
    assert response.json()["content"]["subject"] == "S"


@pytest.mark.parametrize(
    "patch_body",
    [{}, {"name": "Spring sale"}, {"content": {"subject": "Hello {{ first_name }}"}}, {"content": {}}],
    ids=["empty", "same-name", "same-subject", "empty-content"],
)
async def test_patch_without_a_change_is_fine_and_records_nothing(api, tenant_tokens, patch_body):
    created = await create_broadcast(api, tenant_tokens.a_write)
    url = f"{BROADCASTS}/{created['id']}"

    response = await api.patch(url, json=patch_body, headers=bearer(tenant_tokens.a_write))

    assert response.status_code == 200, response.text
    assert response.json() == created
    history = (await api.get(f"{url}/events", headers=bearer(tenant_tokens.a_read))).json()
    assert [e["type"] for e in history["items"]] == ["BroadcastCreated"]


async def test_patch_missing_broadcast_is_404(api, tenant_tokens):
    response = await api.patch(
        f"{BROADCASTS}/{uuid.uuid4()}", json={"name": "X"}, headers=bearer(tenant_tokens.a_write)
    )
    assert_problem(response, 404, "not_found")


# ---- delete ----


async def test_delete_is_204_then_404(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    url = f"{BROADCASTS}/{created['id']}"
    write = bearer(tenant_tokens.a_write)

    response = await api.delete(url, headers=write)
    assert response.status_code == 204, response.text
    assert response.content == b""

    assert_problem(await api.get(url, headers=write), 404, "not_found")
    assert_problem(await api.patch(url, json={"name": "Back"}, headers=write), 404, "not_found")
    assert await list_total(api, tenant_tokens.a_read) == 0
    assert await list_ids(api, tenant_tokens.a_read) == []


async def test_delete_missing_broadcast_is_404(api, tenant_tokens):
    response = await api.delete(f"{BROADCASTS}/{uuid.uuid4()}", headers=bearer(tenant_tokens.a_write))
    assert_problem(response, 404, "not_found")


async def test_delete_twice_is_404_the_second_time(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    url = f"{BROADCASTS}/{created['id']}"
    assert (await api.delete(url, headers=bearer(tenant_tokens.a_write))).status_code == 204
    second = await api.delete(url, headers=bearer(tenant_tokens.a_write))
    # the broadcast is gone for the client; a retried delete may also be accepted as a no-op
    assert second.status_code in (204, 404), second.text
    if second.status_code == 404:
        assert_problem(second, 404, "not_found")


# ---- history ----


async def test_history_lists_every_event_with_actor_and_time(api, tenant_tokens):
    write_token = tenant_tokens.a_write
    created = await create_broadcast(api, write_token)
    url = f"{BROADCASTS}/{created['id']}"
    edit = await api.patch(
        url,
        json={"name": "Renamed", "content": {"subject": "New subject"}},
        headers={**bearer(write_token), "X-Request-Id": "req-123"},
    )
    assert edit.status_code == 200, edit.text

    response = await api.get(f"{url}/events", headers=bearer(tenant_tokens.a_read))

    assert response.status_code == 200, response.text
    history = response.json()
    assert history["total"] == 2 and history["offset"] == 0 and history["limit"] >= 2
    created_event, edited_event = history["items"]

    assert created_event["type"] == "BroadcastCreated"
    assert created_event["data"]["name"] == "Spring sale"
    assert created_event["data"]["content"]["subject"] == created["content"]["subject"]
    assert created_event["data"]["broadcast_id"] == created["id"]

    assert edited_event["type"] == "BroadcastEdited"
    assert edited_event["data"]["name"] == "Renamed"
    assert edited_event["data"]["content"]["subject"] == "New subject"
    assert edited_event["data"]["content"]["html"] == created["content"]["html"]  # the merged content
    assert edited_event["correlation_id"] == "req-123"

    for event in history["items"]:
        assert event["actor"] == f"token:{write_token.id}"
        uuid.UUID(event["id"])
        assert isinstance(event["position"], int)
        parse_time(event["created_at"])
    assert created_event["position"] < edited_event["position"]
    assert parse_time(created_event["created_at"]) <= parse_time(edited_event["created_at"])


async def test_history_pages(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    url = f"{BROADCASTS}/{created['id']}"
    for i in range(3):
        r = await api.patch(url, json={"name": f"Name {i}"}, headers=bearer(tenant_tokens.a_write))
        assert r.status_code == 200, r.text

    page = (await api.get(f"{url}/events", params={"limit": 2, "offset": 1}, headers=bearer(tenant_tokens.a_read))).json()
    assert page["total"] == 4 and page["limit"] == 2 and page["offset"] == 1
    assert [e["type"] for e in page["items"]] == ["BroadcastEdited", "BroadcastEdited"]
    assert [e["data"]["name"] for e in page["items"]] == ["Name 0", "Name 1"]


async def test_history_of_a_missing_broadcast_is_404(api, tenant_tokens):
    response = await api.get(f"{BROADCASTS}/{uuid.uuid4()}/events", headers=bearer(tenant_tokens.a_read))
    assert_problem(response, 404, "not_found")


async def test_history_of_a_deleted_broadcast_is_404_like_the_broadcast(api, tenant_tokens):
    """Once deleted, the broadcast answers 404 on every route, its history included."""
    created = await create_broadcast(api, tenant_tokens.a_write)
    url = f"{BROADCASTS}/{created['id']}"
    before = (await api.get(f"{url}/events", headers=bearer(tenant_tokens.a_read))).json()
    assert [e["type"] for e in before["items"]] == ["BroadcastCreated"]
    assert (await api.delete(url, headers=bearer(tenant_tokens.a_write))).status_code == 204

    response = await api.get(f"{url}/events", headers=bearer(tenant_tokens.a_read))

    assert_problem(response, 404, "not_found")


# ---- validation: 422 naming the field, 400 for broken JSON, nothing half-written ----


async def assert_rejected_without_writes(api, tenant_tokens, response, status: int) -> dict[str, Any]:
    body = assert_problem(response, status)
    assert await list_total(api, tenant_tokens.a_read) == 0, "a rejected create left a broadcast behind"
    return body


CREATE_422 = [
    pytest.param({**new_broadcast(), "status": "completed"}, "status", id="unknown-top-level(read-only status)"),
    pytest.param({**new_broadcast(), "foo": 1}, "foo", id="unknown-top-level"),
    pytest.param(
        new_broadcast(content={"subject": "S", "foo": "bar"}), "content.foo", id="unknown-nested",
    ),
    pytest.param(new_broadcast(name=""), "name", id="empty-name"),
    pytest.param(new_broadcast(name="x" * 201), "name", id="too-long-name"),
    pytest.param(new_broadcast(content={"subject": ""}), "content.subject", id="empty-subject"),
    pytest.param(new_broadcast(name=42), "name", id="wrong-type-name"),
    pytest.param(new_broadcast(content="hello"), "content", id="wrong-type-content"),
    pytest.param(new_broadcast(content={"subject": ["a"]}), "content.subject", id="wrong-type-subject"),
    pytest.param(new_broadcast(list_id="not-a-uuid"), "list_id", id="bad-uuid-list_id"),
    pytest.param({"content": {"subject": "S"}}, "name", id="missing-name"),
    pytest.param({"name": "N"}, "content", id="missing-content"),
    pytest.param(
        new_broadcast(content={"html": "<p/>"}), "content.subject", id="missing-subject"
    ),
    pytest.param(new_broadcast(content={"subject": "Hi {{ name"}), "content.subject", id="broken-liquid-subject"),
    pytest.param(new_broadcast(content={"subject": "S", "html": "{% if x %}"}), "content.html", id="broken-liquid-html"),
    pytest.param(new_broadcast(list_id=str(uuid.uuid4())), "list_id", id="unknown-list"),
    pytest.param(new_broadcast(provider_id=str(uuid.uuid4())), "provider_id", id="unknown-provider"),
]


@pytest.mark.parametrize(("body", "field"), CREATE_422)
async def test_create_rejects_invalid_body_with_422_naming_the_field(api, tenant_tokens, body, field):
    response = await api.post(BROADCASTS, json=body, headers=bearer(tenant_tokens.a_write))
    problem = await assert_rejected_without_writes(api, tenant_tokens, response, 422)
    assert problem["code"] == "validation_error"
    assert field in error_fields(problem), problem


@pytest.mark.parametrize(
    "raw",
    [
        b'{"name": "x", ',
        b"not json",
        b'{"name": "x"} trailing',
        pytest.param(b""),
        b"\xff\xfe",
    ],
    ids=["truncated", "not-json", "trailing", "empty", "not-utf8"],
)
async def test_create_with_malformed_json_is_400(api, tenant_tokens, raw):
    response = await api.post(
        BROADCASTS, content=raw, headers={**bearer(tenant_tokens.a_write), "Content-Type": "application/json"}
    )
    problem = await assert_rejected_without_writes(api, tenant_tokens, response, 400)
    assert problem["code"] == "bad_request"


async def test_create_with_a_json_array_body_is_422(api, tenant_tokens):
    response = await api.post(BROADCASTS, json=[new_broadcast()], headers=bearer(tenant_tokens.a_write))
    problem = await assert_rejected_without_writes(api, tenant_tokens, response, 422)
    error_fields(problem)


PATCH_422 = [
    pytest.param({"foo": 1}, "foo", id="unknown-top-level"),
    pytest.param({"status": "completed"}, "status", id="read-only-status"),
    pytest.param({"id": str(uuid.uuid4())}, "id", id="read-only-id"),
    pytest.param({"content": {"foo": "bar"}}, "content.foo", id="unknown-nested"),
    pytest.param({"name": ""}, "name", id="empty-name"),
    pytest.param({"name": None}, "name", id="null-name"),
    pytest.param({"content": {"subject": ""}}, "content.subject", id="empty-subject"),
    pytest.param({"content": {"subject": None}}, "content.subject", id="null-subject"),
    pytest.param({"name": 7}, "name", id="wrong-type"),
    pytest.param({"content": {"html": 7}}, "content.html", id="wrong-type-nested"),
    pytest.param({"content": {"text": "{{ oops"}}, "content.text", id="broken-liquid-text"),
    pytest.param({"list_id": str(uuid.uuid4())}, "list_id", id="unknown-list"),
]


@pytest.mark.parametrize(("patch_body", "field"), PATCH_422)
async def test_patch_rejects_invalid_body_with_422_and_changes_nothing(api, tenant_tokens, patch_body, field):
    created = await create_broadcast(api, tenant_tokens.a_write)
    url = f"{BROADCASTS}/{created['id']}"

    response = await api.patch(url, json=patch_body, headers=bearer(tenant_tokens.a_write))

    problem = assert_problem(response, 422, "validation_error")
    assert field in error_fields(problem), problem
    assert (await api.get(url, headers=bearer(tenant_tokens.a_read))).json() == created
    history = (await api.get(f"{url}/events", headers=bearer(tenant_tokens.a_read))).json()
    assert [e["type"] for e in history["items"]] == ["BroadcastCreated"]
    assert await list_total(api, tenant_tokens.a_read) == 1


async def test_patch_with_malformed_json_is_400_and_changes_nothing(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    url = f"{BROADCASTS}/{created['id']}"
    response = await api.patch(
        url, content=b'{"name": ', headers={**bearer(tenant_tokens.a_write), "Content-Type": "application/json"}
    )
    assert_problem(response, 400, "bad_request")
    assert (await api.get(url, headers=bearer(tenant_tokens.a_read))).json() == created


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE", "GET events"])
async def test_a_non_uuid_id_in_the_path_is_a_404_problem(api, tenant_tokens, method):
    """The path does not name a broadcast at all: 404, as problem+json like every error."""
    await create_broadcast(api, tenant_tokens.a_write)
    headers = bearer(tenant_tokens.a_write)
    match method:
        case "GET":
            response = await api.get(f"{BROADCASTS}/not-a-uuid", headers=headers)
        case "PATCH":
            response = await api.patch(f"{BROADCASTS}/not-a-uuid", json={"name": "X"}, headers=headers)
        case "DELETE":
            response = await api.delete(f"{BROADCASTS}/not-a-uuid", headers=headers)
        case _:
            response = await api.get(f"{BROADCASTS}/not-a-uuid/events", headers=headers)
    assert_problem(response, 404, "not_found")
    assert await list_total(api, tenant_tokens.a_read) == 1


async def test_a_rejected_create_leaves_no_event_stream_behind(api, settings, tenant_tokens):
    """Nothing half-written: a rejected create appends no event, not only no view row."""
    rejected = [
        new_broadcast(name=""),
        new_broadcast(content={"subject": "S", "foo": 1}),
        new_broadcast(list_id=str(uuid.uuid4())),
    ]
    for body in rejected:
        response = await api.post(BROADCASTS, json=body, headers=bearer(tenant_tokens.a_write))
        assert response.status_code == 422, response.text
    forbidden = await api.post(BROADCASTS, json=new_broadcast(), headers=bearer(tenant_tokens.a_read))
    assert forbidden.status_code == 403
    con = await db.connect(settings.database_url)
    try:
        assert await con.fetchval("SELECT count(*) FROM events WHERE stream_name LIKE 'broadcast-%'") == 0
        assert await con.fetchval("SELECT count(*) FROM broadcasts") == 0
    finally:
        await con.close()


# ---- readiness ----


async def test_readyz_reports_postgres_and_nats_ok(api):
    response = await api.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"] == {"postgres": "ok", "nats": "ok", "relay": "ok", "projector": "ok"}
    assert body["parked_events"] == 0


# ---- errors outside the handlers are problem details too ----


async def test_an_unsupported_method_is_a_405_problem(api, tenant_tokens):
    response = await api.put(BROADCASTS, json=new_broadcast(), headers=bearer(tenant_tokens.a_write))
    assert_problem(response, 405, "method_not_allowed")
    assert await list_total(api, tenant_tokens.a_read) == 0


async def test_an_unknown_path_is_a_404_problem(api, tenant_tokens):
    response = await api.get("/v1/no-such-thing", headers=bearer(tenant_tokens.a_read))
    assert_problem(response, 404, "not_found")


# ---- schedule ----


async def test_create_with_scheduled_at_is_scheduled_at_once(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write, scheduled_at=f"{FUTURE_YEAR}-01-02T09:00:00Z")

    assert created["status"] == "scheduled"
    assert parse_time(created["scheduled_at"]) == parse_time(f"{FUTURE_YEAR}-01-02T09:00:00+00:00")
    assert created["recurring"] is False and created["next_run_at"] is None


async def test_a_local_scheduled_at_is_read_in_the_given_timezone(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write, scheduled_at=f"{FUTURE_YEAR}-07-04T09:00:00",
                                     timezone="America/New_York")

    assert parse_time(created["scheduled_at"]) == parse_time(f"{FUTURE_YEAR}-07-04T13:00:00+00:00")  # 09:00 EDT
    assert created["schedule"]["timezone"] == "America/New_York"


@pytest.mark.parametrize("when", ["2001-01-01T00:00:00Z", "2001-01-01T00:00:00"])
async def test_create_with_a_time_in_the_past_is_a_422_and_creates_nothing(api, tenant_tokens, when):
    before = await list_total(api, tenant_tokens.a_write)

    response = await api.post(BROADCASTS, json=new_broadcast(scheduled_at=when), headers=bearer(tenant_tokens.a_write))

    assert error_fields(assert_problem(response, 422)) == ["scheduled_at"]
    assert await list_total(api, tenant_tokens.a_write) == before


async def test_schedule_and_reschedule_a_draft(api, tenant_tokens):
    draft = await create_broadcast(api, tenant_tokens.a_write)
    path = f"{BROADCASTS}/{draft['id']}/schedule"

    first = await api.post(path, json={"scheduled_at": f"{FUTURE_YEAR}-01-02T09:00:00Z"}, headers=bearer(tenant_tokens.a_write))
    again = await api.post(path, json={"scheduled_at": f"{FUTURE_YEAR}-01-03T09:00:00Z"}, headers=bearer(tenant_tokens.a_write))

    assert first.status_code == 200 and first.json()["status"] == "scheduled", first.text
    assert again.status_code == 200, again.text
    assert parse_time(again.json()["scheduled_at"]) == parse_time(f"{FUTURE_YEAR}-01-03T09:00:00+00:00")


async def test_schedule_in_the_past_is_a_422_and_changes_nothing(api, tenant_tokens):
    draft = await create_broadcast(api, tenant_tokens.a_write)

    response = await api.post(f"{BROADCASTS}/{draft['id']}/schedule", json={"scheduled_at": "2001-01-01T00:00:00Z"},
                              headers=bearer(tenant_tokens.a_write))

    assert error_fields(assert_problem(response, 422)) == ["scheduled_at"]
    unchanged = (await api.get(f"{BROADCASTS}/{draft['id']}", headers=bearer(tenant_tokens.a_write))).json()
    assert unchanged["status"] == "draft" and unchanged["version"] == draft["version"]


async def test_recurring_is_scheduled_for_its_next_occurrence(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write, recurring=True, cron="0 9 * * 1",
                                     timezone="Europe/Berlin", missed_policy="skip")

    assert created["status"] == "scheduled" and created["recurring"] is True
    next_run = parse_time(created["next_run_at"])
    local = next_run.astimezone(ZoneInfo("Europe/Berlin"))
    assert (local.weekday(), local.hour, local.minute) == (0, 9, 0)
    assert next_run > datetime.now(timezone.utc)
    assert created["schedule"] == {"timezone": "Europe/Berlin", "cron": "0 9 * * 1", "missed_policy": "skip",
                                   "max_lateness_s": 3600}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"recurring": True, "cron": "every monday"}, "cron"),
        ({"recurring": True, "cron": "0 9 * * 1 2026"}, "cron"),
        ({"recurring": True, "cron": "0 9 * * 1", "timezone": "Mars/Olympus"}, "timezone"),
        ({"scheduled_at": f"{FUTURE_YEAR}-01-01T00:00:00", "timezone": "Nowhere"}, "timezone"),
        ({"recurring": True}, "cron"),
        ({"scheduled_at": f"{FUTURE_YEAR}-01-01T00:00:00Z", "missed_policy": "later"}, "missed_policy"),
    ],
)
async def test_a_bad_schedule_is_a_422_naming_the_field(api, tenant_tokens, fields, field):
    before = await list_total(api, tenant_tokens.a_write)

    response = await api.post(BROADCASTS, json=new_broadcast(**fields), headers=bearer(tenant_tokens.a_write))

    assert field in error_fields(assert_problem(response, 422))
    assert await list_total(api, tenant_tokens.a_write) == before


async def test_commands_the_status_does_not_allow_are_409_with_the_current_status(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write)
    path = f"{BROADCASTS}/{created['id']}"
    headers = bearer(tenant_tokens.a_write)
    for command in ("cancel", "pause", "resume"):  # (a reset of a never-sent draft is a no-op, like its retry)
        response = await api.post(f"{path}/{command}", headers=headers)
        assert assert_problem(response, 409, "wrong_status")["current_status"] == "draft", command

    await api.post(f"{path}/schedule", json={"scheduled_at": f"{FUTURE_YEAR}-01-02T09:00:00Z"}, headers=headers)
    for command in ("pause", "resume", "reset"):
        response = await api.post(f"{path}/{command}", headers=headers)
        assert assert_problem(response, 409, "wrong_status")["current_status"] == "scheduled", command


async def test_a_scheduled_broadcast_can_be_edited_stopped_and_deleted(api, tenant_tokens):
    created = await create_broadcast(api, tenant_tokens.a_write, scheduled_at=f"{FUTURE_YEAR}-01-02T09:00:00Z")
    path = f"{BROADCASTS}/{created['id']}"
    headers = bearer(tenant_tokens.a_write)

    edited = await api.patch(path, json={"name": "Renamed"}, headers=headers)
    assert edited.status_code == 200 and edited.json()["status"] == "scheduled", edited.text
    stopped = await api.post(f"{path}/stop", headers=headers)
    assert stopped.status_code == 200 and stopped.json()["status"] == "draft", stopped.text
    assert stopped.json()["scheduled_at"] is None
    await api.post(f"{path}/schedule", json={"scheduled_at": f"{FUTURE_YEAR}-01-02T09:00:00Z"}, headers=headers)
    assert (await api.delete(path, headers=headers)).status_code == 204
    assert (await api.get(path, headers=headers)).status_code == 404


# ---- templates within a message's limits ----

# 240 bytes of nested loops writing a 60-character string: 6 MB per message before the limits.
RUNAWAY = (
    "{% assign s = '<p>All work and no play makes Jack a dull boy, all day long.</p>' %}"
    "{% for a in (1..100) %}{% for b in (1..100) %}{% for c in (1..10) %}{{ s }}"
    "{% endfor %}{% endfor %}{% endfor %}<p>Hello {{ first_name }}</p>"
)


async def test_a_template_past_the_limits_whatever_the_data_is_a_422_naming_its_field(api, tenant_tokens):
    headers = bearer(tenant_tokens.a_write)
    response = await api.post(BROADCASTS, json=new_broadcast(content={"subject": "S", "html": RUNAWAY}), headers=headers)
    problem = await assert_rejected_without_writes(api, tenant_tokens, response, 422)
    [error] = problem["errors"]
    assert error["field"] == "content.html" and "more than 10,000 loop iterations" in error["reason"], error

    created = await create_broadcast(api, tenant_tokens.a_write)
    path = f"{BROADCASTS}/{created['id']}"
    response = await api.patch(path, json={"content": {"text": RUNAWAY}}, headers=headers)
    assert error_fields(assert_problem(response, 422, "validation_error")) == ["content.text"]
    assert (await api.get(path, headers=headers)).json() == created


async def _previewed(api, tenant_tokens, html: str, bios: list[str]) -> tuple[list[dict[str, Any]], float]:
    """Preview, as a user would, a broadcast of `html` to contacts with these bios (in order)."""
    headers = bearer(tenant_tokens.a_write)
    people = [{"external_id": f"p{i}", "email": f"p{i}@example.com", "attributes": {"bio": bio}}
              for i, bio in enumerate(bios)]
    ids = (await api.post("/v1/contacts", json=people, headers=headers)).json()["ids"]
    list_id = (await api.post("/v1/lists", json={"name": "bios"}, headers=headers)).json()["id"]
    added = await api.post(f"/v1/lists/{list_id}/members", json={"contact_ids": ids}, headers=headers)
    assert added.status_code < 300, added.text
    created = await create_broadcast(api, tenant_tokens.a_write, list_id=list_id,
                                     content={"subject": "Hi", "html": html, "text": "Hi"})
    started = time.perf_counter()
    response = await api.get(f"{BROADCASTS}/{created['id']}/preview", params={"limit": 10}, headers=headers)
    took = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return response.json()["items"], took


async def test_a_preview_shows_the_message_the_data_takes_past_the_limits_as_not_rendered(api, tenant_tokens):
    # Saved (with no data the loop writes nothing); one contact's 8 KiB bio makes 1.6 MB
    items, took = await _previewed(api, tenant_tokens, "{% for i in (1..200) %}<p>{{ bio }}</p>{% endfor %}",
                                   ["short", "b" * 8192, "also short"])
    assert [i["subject"] for i in items] == [
        "Hi", "(not rendered: content.html: output over 1 MiB (the limit per message) on line 1)", "Hi",
    ]
    # the HTML as sent: the body in a document
    assert "<body>" + "<p>short</p>" * 200 + "\n</body>" in items[0]["html"] and items[1]["html"] == ""
    assert took < 2


async def test_a_preview_of_a_heavy_template_stops_after_a_few_messages(api, tenant_tokens):
    # Each message takes 9,000 loop iterations (under the 10,000 of a message): a preview of ten
    # renders until two messages' worth is used, and says so for the rest
    items, took = await _previewed(api, tenant_tokens, "{% for i in (1..9000) %}{{ bio }}{% endfor %}",
                                   [f"{n}" for n in range(10)])
    assert [i["html"].split("<body>")[1].split("\n</body>")[0] for i in items[:3]] == [f"{n}" * 9000 for n in range(3)]
    assert {i["subject"] for i in items[3:]} == {"(not rendered: the preview's budget of two messages' work is used up)"}
    assert len(items) == 10 and took < 2
