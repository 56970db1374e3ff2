"""GET /v1/broadcasts: the name search, the sorts and their pages, and the times of the latest run
(started_at, sent_at) after a real send, rebuilt the same from the log."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from shared.platform import db
from shared.tenants import store as tenants
from shared.tooling.rebuild import rebuild_named
from tests.api_helpers import (  # noqa: F401  (api, tenant_tokens are fixtures)
    BROADCASTS,
    api,
    assert_problem,
    bearer,
    create_broadcast,
    error_fields,
    tenant_tokens,
)
from tests.stack import Api, api_for, sender_in_process

FUTURE = f"{datetime.now(timezone.utc).year + 2}-06-01T09:00:00Z"


async def listed(api, token, **params: Any) -> list[dict[str, Any]]:
    response = await api.get(BROADCASTS, params={"limit": 500, **params}, headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()["items"]


async def names(api, token, **params: Any) -> list[str]:
    return [b["name"] for b in await listed(api, token, **params)]


# ---- search ----


async def test_search_is_a_substring_in_any_case_with_wildcards_taken_literally(api, tenant_tokens):
    for name in ["Spring Sale", "spring sale, again", "Autumn", "50% off", "50 off", "a_b", "axb", r"back\slash",
                 "backslash"]:
        await create_broadcast(api, tenant_tokens.a_write, name=name)
    await create_broadcast(api, tenant_tokens.b_write, name="Spring, the other tenant's")
    read = tenant_tokens.a_read

    assert sorted(await names(api, read, **{"filter[search]": "SPRING"})) == ["Spring Sale", "spring sale, again"]
    assert await names(api, read, **{"filter[search]": "ale, Ag"}) == ["spring sale, again"]
    assert await names(api, read, **{"filter[search]": "%"}) == ["50% off"]
    assert await names(api, read, **{"filter[search]": "50%"}) == ["50% off"]
    assert await names(api, read, **{"filter[search]": "_"}) == ["a_b"]
    assert await names(api, read, **{"filter[search]": "a_"}) == ["a_b"]
    assert await names(api, read, **{"filter[search]": "\\"}) == [r"back\slash"]
    assert await names(api, read, **{"filter[search]": "nothing like it"}) == []
    assert len(await names(api, read, **{"filter[search]": ""})) == 9  # an empty search box: no filter
    # the total counts what the search finds; the status filter combines with it
    response = await api.get(BROADCASTS, params={"filter[search]": "sale", "limit": 1}, headers=bearer(read))
    assert response.json()["total"] == 2 and len(response.json()["items"]) == 1
    assert await names(api, read, **{"filter[search]": "sale", "status": "scheduled"}) == []


async def test_another_tenants_broadcasts_are_neither_found_nor_sorted_in(api, tenant_tokens):
    await create_broadcast(api, tenant_tokens.a_write, name="Ours")
    await create_broadcast(api, tenant_tokens.b_write, name="Theirs")
    for sort in ("name", "-name", "created_at", "-created_at", "status", "-status"):
        assert await names(api, tenant_tokens.a_read, sort=sort) == ["Ours"]
        assert await names(api, tenant_tokens.b_read, sort=sort) == ["Theirs"]
    assert await names(api, tenant_tokens.a_read, **{"filter[search]": "theirs"}) == []


# ---- sorts ----


async def test_each_sort_both_ways(api, tenant_tokens):
    write, read = tenant_tokens.a_write, tenant_tokens.a_read
    made = [await create_broadcast(api, write, name=name) for name in ["banana", "Apple", "cherry", "apricot"]]
    # statuses: banana scheduled, cherry cancelled (scheduled, then cancelled), the others drafts
    for b in (made[0], made[2]):
        r = await api.post(f"{BROADCASTS}/{b['id']}/schedule", json={"scheduled_at": FUTURE}, headers=bearer(write))
        assert r.status_code == 200, r.text
    r = await api.post(f"{BROADCASTS}/{made[2]['id']}/cancel", headers=bearer(write))
    assert r.status_code == 200, r.text

    assert await names(api, read, sort="name") == ["Apple", "apricot", "banana", "cherry"]  # in any case
    assert await names(api, read, sort="-name") == ["cherry", "banana", "apricot", "Apple"]
    oldest_first = ["banana", "Apple", "cherry", "apricot"]
    assert await names(api, read, sort="created_at") == oldest_first
    assert await names(api, read, sort="-created_at") == oldest_first[::-1]
    assert await names(api, read) == oldest_first[::-1]  # the default: newest first
    # by status name, then by creation in the same direction
    assert await names(api, read, sort="status") == ["cherry", "Apple", "apricot", "banana"]
    assert await names(api, read, sort="-status") == ["banana", "apricot", "Apple", "cherry"]
    assert await names(api, read, sort="name", status="draft") == ["Apple", "apricot"]


async def test_pages_are_stable_and_ties_go_by_id_in_the_sorts_direction(api, tenant_tokens):
    ids = [(await create_broadcast(api, tenant_tokens.a_write, name="Same name"))["id"] for _ in range(7)]
    for sort, expected in (("name", sorted(ids)), ("-name", sorted(ids, reverse=True))):
        paged: list[str] = []
        for offset in range(0, 8, 3):
            response = await api.get(BROADCASTS, params={"sort": sort, "limit": 3, "offset": offset},
                                     headers=bearer(tenant_tokens.a_read))
            assert response.json()["total"] == 7
            paged += [b["id"] for b in response.json()["items"]]
        assert paged == expected, sort  # every one once, in id order among equal names


@pytest.mark.parametrize("params, field", [
    ({"sort": "size"}, "sort"),
    ({"sort": "+name"}, "sort"),
    ({"filter[search]": "a\x00b"}, "filter[search]"),
    ({"filter[search]": "x" * 201}, "filter[search]"),
])
async def test_a_bad_sort_or_search_is_a_422_naming_it(api, tenant_tokens, params, field):
    response = await api.get(BROADCASTS, params=params, headers=bearer(tenant_tokens.a_read))
    assert field in error_fields(assert_problem(response, 422))


# ---- the latest run's times ----


async def test_started_at_and_sent_at_follow_the_runs_and_rebuild_alike(settings):
    async with api_for(settings) as api, sender_in_process(settings):
        ids = (await api.post("/v1/contacts", [{"external_id": f"p{i}", "email": f"p{i}@example.com"}
                                               for i in range(5)]))["ids"]
        lst = await api.post("/v1/lists", {"name": "everyone"})
        await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
        provider = await api.post("/v1/providers", {"name": "null", "channel": "email", "kind": "null",
                                                    "from_email": "news@example.com"})
        b = await api.post(BROADCASTS, {"name": "Times", "list_id": lst["id"], "provider_id": provider["id"],
                                        "content": {"subject": "Hi", "text": "Hello"}})
        assert (b["started_at"], b["sent_at"], b["scheduled_at"]) == (None, None, None)
        scheduled = await api.post(f"{BROADCASTS}/{b['id']}/schedule", {"scheduled_at": FUTURE})
        assert scheduled["scheduled_at"] == FUTURE and scheduled["started_at"] is None

        before = datetime.now(timezone.utc)
        await api.post(f"{BROADCASTS}/{b['id']}/send", expect=202)
        running = await api.get(f"{BROADCASTS}/{b['id']}")
        assert running["sent_at"] is None or running["status"] == "completed"
        done = await api.wait_for_status(b["id"], {"completed"})
        started, sent = parse(done["started_at"]), parse(done["sent_at"])
        assert before <= started <= sent <= datetime.now(timezone.utc)
        assert done["scheduled_at"] is None  # the one-off schedule was used up by the send
        events = {e["type"]: e["data"] for e in (await api.get(f"{BROADCASTS}/{b['id']}/events"))["items"]}
        assert started == parse(events["BroadcastStarted"]["at"])
        assert sent == parse(events["BroadcastCompleted"]["at"])
        assert [x["id"] for x in (await api.get(BROADCASTS, params={"sort": "-created_at"}))["items"]] == [b["id"]]

        # a reset and a second run: started_at moves on, sent_at is the new run's once it finished
        await api.post(f"{BROADCASTS}/{b['id']}/reset")
        await api.post(f"{BROADCASTS}/{b['id']}/send", expect=202)
        again = await api.wait_for_status(b["id"], {"completed"})
        assert parse(again["started_at"]) > sent and parse(again["sent_at"]) >= parse(again["started_at"])

        await rebuild_named(settings.database_url, "broadcasts")
        rebuilt = await api.get(f"{BROADCASTS}/{b['id']}")
        assert (rebuilt["started_at"], rebuilt["sent_at"]) == (again["started_at"], again["sent_at"])

        # another tenant sees none of it
        con = await db.connect(settings.database_url)
        other = await tenants.create_tenant(con, "other")
        token = (await tenants.create_token(con, other.id, "read")).token
        await con.close()
        assert (await Api(api.client, token).get(BROADCASTS))["items"] == []


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
