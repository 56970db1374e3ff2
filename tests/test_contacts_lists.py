"""Contacts and static lists through the REST API, on a real Postgres: upserts, validation, bulk
limits, memberships and their counts, tenancy and scopes; and the address checks' fast paths
against the libraries they stand in for."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shared.audience import contacts
from shared.audience.fields import (
    _FAST_EMAIL,
    canonical_locale,
    email_problem,
    phone_problem,
)
from shared.audience.fields import all_fast_emails as _all_fast_emails
from shared.kernel.audience import Audience
from shared.platform import db
from shared.sending import audience
from shared.sending.jobs import recipient_json
from tests.tenant_env import tenant_env


@pytest.fixture
async def env(settings):
    async with tenant_env(settings) as e:
        yield e


def people(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"external_id": f"u{i}", "email": f"user{i}@example.com", "attributes": {"first_name": f"F{i}", "plan": "pro"}}
        for i in range(start, start + n)
    ]


# -- contacts ------------------------------------------------------------------------------------


async def test_upsert_creates_then_updates_by_external_id(env):
    body = {"external_id": "ada", "email": "ada@example.com", "phone": "+14155550100", "locale": "en_gb",
            "attributes": {"first_name": "Ada", "plan": "free", "tags": ["a", "b"]}}
    created = await env.writer.call("POST", "/v1/contacts", 201, json=body)
    assert created["email"] == "ada@example.com" and created["locale"] == "en-GB"
    assert created["attributes"] == {"first_name": "Ada", "plan": "free", "tags": ["a", "b"]}

    # Fields given replace (null clears), fields left out are kept, attributes merge key by key.
    patch = {"external_id": "ada", "phone": None, "attributes": {"plan": "pro", "score": 7}}
    updated = await env.writer.call("POST", "/v1/contacts", 200, json=patch)
    assert updated["id"] == created["id"]
    assert updated["email"] == "ada@example.com" and updated["phone"] is None and updated["locale"] == "en-GB"
    assert updated["attributes"] == {"first_name": "Ada", "plan": "pro", "tags": ["a", "b"], "score": 7}
    assert updated["updated_at"] >= created["updated_at"]

    assert await env.writer.call("GET", f"/v1/contacts/{created['id']}", 200) == updated
    page = await env.writer.call("GET", "/v1/contacts", 200, params={"external_id": "ada"})
    assert page["total"] == 1 and page["items"] == [updated]
    by_email = await env.writer.call("GET", "/v1/contacts", 200, params={"email": "ADA@example.com"})
    assert [c["id"] for c in by_email["items"]] == [created["id"]]

    # Without an external id every POST creates.
    one = await env.writer.call("POST", "/v1/contacts", 201, json={"email": "x@example.com"})
    two = await env.writer.call("POST", "/v1/contacts", 201, json={"email": "x@example.com"})
    assert one["id"] != two["id"] and one["external_id"] is None


async def test_bulk_of_2000_in_one_call_then_reimport_updates(env):
    body = people(2000)
    body.insert(500, {"email": "anonymous@example.com"})  # no external id: created, in place
    first = await env.writer.call("POST", "/v1/contacts", 200, json=body)
    assert first["created"] == 2001 and first["updated"] == 0 and len(first["ids"]) == 2001
    assert len(set(first["ids"])) == 2001
    assert await env.count("SELECT count(*) FROM contacts") == 2001
    # ids are in request order: item i has id ids[i].
    for i in (0, 499, 500, 501, 2000):
        contact = await env.writer.call("GET", f"/v1/contacts/{first['ids'][i]}", 200)
        assert contact["email"] == body[i]["email"]

    again = await env.writer.call("POST", "/v1/contacts", 200, json=people(2000, start=1000))
    assert again["created"] == 1000 and again["updated"] == 1000
    assert again["ids"][:1000] == first["ids"][1001:]
    page = await env.writer.call("GET", "/v1/contacts", 200, params={"limit": 10, "offset": 5})
    assert page["total"] == 3001 and page["limit"] == 10 and len(page["items"]) == 10
    assert [c["id"] for c in page["items"]] == sorted(c["id"] for c in page["items"])


async def test_duplicate_external_ids_in_one_request_apply_in_order(env):
    body = [
        {"external_id": "dup", "email": "first@example.com", "attributes": {"a": 1, "b": 1}},
        {"external_id": "other", "email": "other@example.com"},
        {"external_id": "dup", "locale": "fr", "attributes": {"b": 2}},
    ]
    result = await env.writer.call("POST", "/v1/contacts", 200, json=body)
    assert result["created"] == 2 and result["updated"] == 0
    assert result["ids"][0] == result["ids"][2] != result["ids"][1]
    contact = await env.writer.call("GET", f"/v1/contacts/{result['ids'][0]}", 200)
    assert contact["email"] == "first@example.com" and contact["locale"] == "fr"
    assert contact["attributes"] == {"a": 1, "b": 2}


async def test_items_giving_different_fields_each_keep_what_they_leave_out(env):
    first = [
        {"external_id": "a", "email": "a@example.com", "phone": "+14155550101", "locale": "en"},
        {"external_id": "b", "email": "b@example.com", "phone": "+14155550102", "locale": "de"},
    ]
    ids = (await env.writer.call("POST", "/v1/contacts", 200, json=first))["ids"]
    second = [
        {"external_id": "a", "phone": "+14155550199"},  # only the phone
        {"email": "new@example.com"},  # no key: created
        {"external_id": "b", "email": None, "attributes": {"vip": True}},  # clears the email only
        {"external_id": "c", "locale": "fr"},  # created
    ]
    result = await env.writer.call("POST", "/v1/contacts", 200, json=second)
    assert result["created"] == 2 and result["updated"] == 2
    assert result["ids"][0] == ids[0] and result["ids"][2] == ids[1]
    a, new, b, c = [await env.writer.call("GET", f"/v1/contacts/{i}", 200) for i in result["ids"]]
    assert (a["email"], a["phone"], a["locale"]) == ("a@example.com", "+14155550199", "en")
    assert (b["email"], b["phone"], b["locale"], b["attributes"]) == (None, "+14155550102", "de", {"vip": True})
    assert new["email"] == "new@example.com" and new["external_id"] is None
    assert c["locale"] == "fr" and c["email"] is None


async def test_more_than_10000_is_413_and_10000_is_fine(env):
    r = await env.writer.http.post("/v1/contacts", headers=env.writer.headers, json=[{"email": "a@example.com"}] * 10_001)
    assert r.status_code == 413, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["max_items"] == 10_000
    assert await env.count("SELECT count(*) FROM contacts") == 0
    done = await env.writer.call("POST", "/v1/contacts", 200, json=people(10_000))
    assert done["created"] == 10_000


async def test_invalid_email_at_index_3_rejects_the_whole_request(env):
    body = people(6)
    body[3]["email"] = "not-an-email"
    body[5]["email"] = "bob@example.test"  # special-use domain
    r = await env.writer.http.post("/v1/contacts", headers=env.writer.headers, json=body)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert [e["field"] for e in problem["errors"]] == ["[3].email", "[5].email"]
    assert "[3].email" in problem["detail"]
    assert await env.count("SELECT count(*) FROM contacts") == 0


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"phone": "415 555 0100"}, "phone"),  # a national number without phone_region
        ({"phone": "0044 20 7946 0958"}, "phone"),
        ({"phone": "not a number"}, "phone"),
        ({"phone": "+4420"}, "phone"),  # too short
        ({"phone": "+99912345678"}, "phone"),  # no such country code
        ({"locale": "english"}, "locale"),
        ({"attributes": ["a"]}, "attributes"),
        ({"attributes": {"x": "nul \u0000"}}, "attributes"),
        ({"attributes": {"bio": "x" * 70_000}}, "attributes"),  # over 64 KiB as JSON: no job could carry it
        ({"email": 5}, "email"),
        ({"external_id": ""}, "external_id"),
        ({"emial": "typo@example.com"}, "emial"),  # unknown field
        ({"id": 5}, "id"),  # read-only field
    ],
)
async def test_bad_items_are_422_naming_the_field(env, item, field):
    r = await env.writer.http.post("/v1/contacts", headers=env.writer.headers, json=[{"external_id": "ok"}, item])
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == [f"[1].{field}"]
    single = await env.writer.http.post("/v1/contacts", headers=env.writer.headers, json=item)
    assert single.status_code == 422, single.text
    assert [e["field"] for e in single.json()["errors"]] == [field]
    assert await env.count("SELECT count(*) FROM contacts") == 0


async def test_many_contacts_with_attributes_just_under_the_limit_are_accepted(env):
    body = [{"external_id": f"big{i}", "attributes": {"bio": "x" * 65_000}} for i in range(3)]
    r = await env.writer.http.post("/v1/contacts", headers=env.writer.headers, json=body)
    assert r.status_code == 200, r.text
    assert await env.count("SELECT count(*) FROM contacts") == 3


async def test_malformed_json_is_400(env):
    r = await env.writer.http.post(
        "/v1/contacts", headers={**env.writer.headers, "content-type": "application/json"}, content=b'[{"email": '
    )
    assert r.status_code == 400, r.text


async def test_attributes_out_of_range_are_422_with_the_index(env):
    body = b'[{"external_id": "a"}, {"external_id": "b", "attributes": {"x": 1e1000000}}]'
    r = await env.writer.http.post(
        "/v1/contacts", headers={**env.writer.headers, "content-type": "application/json"}, content=body
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"].startswith("[1].attributes")
    assert await env.count("SELECT count(*) FROM contacts") == 0


async def test_attributes_postgres_refuses_are_found_by_index(env):
    # What only Postgres rejects (the API's safety net after a failed upsert): a lone surrogate.
    con = await db.connect(env.database_url)
    try:
        assert await contacts.invalid_attributes_at(con, '[{"a": 1}, null, {"x": "\\ud800"}]') == [2]
    finally:
        await con.close()


async def test_delete_contact_removes_it_from_lists(env):
    ids = (await env.writer.call("POST", "/v1/contacts", 200, json=people(3)))["ids"]
    lst = await env.writer.call("POST", "/v1/lists", 201, json={"name": "all"})
    assert (await env.writer.call("POST", f"/v1/lists/{lst['id']}/members", 200, json={"contact_ids": ids}))["member_count"] == 3
    await env.writer.call("DELETE", f"/v1/contacts/{ids[1]}", 204)
    await env.writer.call("GET", f"/v1/contacts/{ids[1]}", 404)
    await env.writer.call("DELETE", f"/v1/contacts/{ids[1]}", 404)
    assert (await env.writer.call("GET", f"/v1/lists/{lst['id']}", 200))["member_count"] == 2
    assert await env.count("SELECT count(*) FROM list_members WHERE contact_id = $1", ids[1]) == 0


# -- lists ---------------------------------------------------------------------------------------


async def test_list_create_add_remove_count(env):
    ids = (await env.writer.call("POST", "/v1/contacts", 200, json=people(5)))["ids"]
    lst = await env.writer.call("POST", "/v1/lists", 201, json={"name": "newsletter"})
    assert lst["name"] == "newsletter" and lst["member_count"] == 0
    path = f"/v1/lists/{lst['id']}/members"

    assert await env.writer.call("POST", path, 200, json={"contact_ids": ids[:3]}) == {"added": 3, "member_count": 3}
    # Idempotent: members already in are not added twice; duplicates in the body count once.
    assert await env.writer.call("POST", path, 200, json={"contact_ids": [ids[2], ids[2], ids[3]]}) == {
        "added": 1, "member_count": 4,
    }
    assert await env.writer.call("POST", path, 200, json={"external_ids": ["u4", "u0"]}) == {"added": 1, "member_count": 5}
    assert await env.writer.call("DELETE", path, 200, json={"external_ids": ["u0", "u1"]}) == {
        "removed": 2, "member_count": 3,
    }
    assert await env.writer.call("DELETE", path, 200, json={"contact_ids": [ids[0]]}) == {"removed": 0, "member_count": 3}
    assert (await env.writer.call("GET", f"/v1/lists/{lst['id']}", 200))["member_count"] == 3
    assert await env.count("SELECT count(*) FROM list_members WHERE list_id = $1", uuid.UUID(lst["id"])) == 3

    other = await env.writer.call("POST", "/v1/lists", 201, json={"name": "second"})
    page = await env.writer.call("GET", "/v1/lists", 200)
    assert page["total"] == 2
    assert {(x["name"], x["member_count"]) for x in page["items"]} == {("newsletter", 3), ("second", 0)}

    await env.writer.call("DELETE", f"/v1/lists/{other['id']}", 204)
    await env.writer.call("GET", f"/v1/lists/{other['id']}", 404)
    await env.writer.call("DELETE", f"/v1/lists/{lst['id']}", 204)
    assert await env.count("SELECT count(*) FROM list_members") == 0
    assert await env.count("SELECT count(*) FROM contacts") == 5  # the contacts stay


async def test_membership_changes_name_unknown_ids_and_change_nothing(env):
    ids = (await env.writer.call("POST", "/v1/contacts", 200, json=people(2)))["ids"]
    theirs = (await env.stranger.call("POST", "/v1/contacts", 200, json=people(1)))["ids"]
    lst = await env.writer.call("POST", "/v1/lists", 201, json={"name": "l"})
    path = f"/v1/lists/{lst['id']}/members"

    problem = await env.writer.call("POST", path, 422, json={"contact_ids": [ids[0], 999_999, theirs[0]]})
    assert problem["errors"][0]["field"] == "contact_ids" and problem["unknown"] == [999_999, theirs[0]]
    problem = await env.writer.call("POST", path, 422, json={"external_ids": ["u1", "nobody"]})
    assert problem["errors"][0]["field"] == "external_ids" and problem["unknown"] == ["nobody"]
    problem = await env.writer.call("DELETE", path, 422, json={"contact_ids": [theirs[0]]})
    assert problem["unknown"] == [theirs[0]]
    assert (await env.writer.call("GET", f"/v1/lists/{lst['id']}", 200))["member_count"] == 0

    for body in ({}, {"contact_ids": [ids[0]], "external_ids": ["u0"]}, {"contact_ids": [0]}, {"ids": [1]}):
        await env.writer.call("POST", path, 422, json=body)
    await env.writer.call("POST", f"/v1/lists/{uuid.uuid4()}/members", 404, json={"contact_ids": ids})


async def test_idempotency_key_on_list_create(env):
    headers = {"Idempotency-Key": "k1"}
    first = await env.writer.call("POST", "/v1/lists", 201, json={"name": "a"}, headers=headers)
    again = await env.writer.call("POST", "/v1/lists", 201, json={"name": "a"}, headers=headers)
    assert first == again
    assert (await env.writer.call("GET", "/v1/lists", 200))["total"] == 1


async def test_the_next_runs_recipients_are_members_with_an_address_on_the_channel_in_contact_id_order(env):
    # Given a list of five, added in reverse order, of whom the even ones also have a phone
    body = [{**p, **({"phone": f"+4930123456{i}"} if i % 2 == 0 else {})} for i, p in enumerate(people(5))]
    ids = (await env.writer.call("POST", "/v1/contacts", 200, json=body))["ids"]
    lst = await env.writer.call("POST", "/v1/lists", 201, json={"name": "l"})
    await env.writer.call("POST", f"/v1/lists/{lst['id']}/members", 200, json={"contact_ids": ids[::-1]})
    con = await db.connect(env.database_url)
    try:
        # When the first recipients of a first run are read per channel
        tenant_id = await con.fetchval("SELECT tenant_id FROM contacts LIMIT 1")
        target, now = Audience(lists=(uuid.UUID(lst["id"]),)), datetime.now(timezone.utc)
        by_email = await audience.first_recipients(con, tenant_id, target, "email", now, 3, recipient_json("email"))
        by_phone = await audience.first_recipients(con, tenant_id, target, "sms", now, 10, recipient_json("sms"))
        people_by_id = {r["id"]: r for r in await con.fetch("SELECT id, email, phone FROM contacts")}
    finally:
        await con.close()
    # Then email goes to the first three by contact id at their email, sms to those with a phone at it
    email_recipients = [json.loads(r) for r in by_email]
    assert [(r[0], r[1]) for r in email_recipients] == [(i, people_by_id[i]["email"]) for i in sorted(ids)[:3]]
    assert email_recipients[0][6]["plan"] == "pro"  # attributes travel with the recipient
    with_phone = sorted(i for i in ids if people_by_id[i]["phone"])
    assert len(with_phone) == 3
    assert [(r[0], r[1]) for r in map(json.loads, by_phone)] == [(i, people_by_id[i]["phone"]) for i in with_phone]


# -- tenancy and scopes --------------------------------------------------------------------------


async def test_another_tenants_contacts_and_lists_are_404(env):
    ids = (await env.writer.call("POST", "/v1/contacts", 200, json=people(2)))["ids"]
    lst = await env.writer.call("POST", "/v1/lists", 201, json={"name": "mine"})
    await env.writer.call("POST", f"/v1/lists/{lst['id']}/members", 200, json={"contact_ids": ids})

    await env.stranger.call("GET", f"/v1/contacts/{ids[0]}", 404)
    await env.stranger.call("DELETE", f"/v1/contacts/{ids[0]}", 404)
    await env.stranger.call("GET", f"/v1/lists/{lst['id']}", 404)
    await env.stranger.call("DELETE", f"/v1/lists/{lst['id']}", 404)
    await env.stranger.call("POST", f"/v1/lists/{lst['id']}/members", 404, json={"contact_ids": []})
    assert (await env.stranger.call("GET", "/v1/contacts", 200))["total"] == 0
    assert (await env.stranger.call("GET", "/v1/lists", 200))["total"] == 0
    # The same external id is another contact in another tenant.
    theirs = await env.stranger.call("POST", "/v1/contacts", 201, json={"external_id": "u0", "email": "t@example.com"})
    assert theirs["id"] not in ids
    mine = await env.writer.call("GET", f"/v1/contacts/{ids[0]}", 200)
    assert mine["email"] == "user0@example.com"
    assert (await env.writer.call("GET", f"/v1/lists/{lst['id']}", 200))["member_count"] == 2


async def test_a_read_token_reads_but_cannot_change(env):
    ids = (await env.writer.call("POST", "/v1/contacts", 200, json=people(1)))["ids"]
    lst = await env.writer.call("POST", "/v1/lists", 201, json={"name": "l"})
    await env.reader.call("GET", "/v1/contacts", 200)
    await env.reader.call("GET", f"/v1/contacts/{ids[0]}", 200)
    await env.reader.call("GET", f"/v1/lists/{lst['id']}", 200)
    await env.reader.call("POST", "/v1/contacts", 403, json=people(1, start=5))
    await env.reader.call("DELETE", f"/v1/contacts/{ids[0]}", 403)
    await env.reader.call("POST", "/v1/lists", 403, json={"name": "x"})
    await env.reader.call("POST", f"/v1/lists/{lst['id']}/members", 403, json={"contact_ids": ids})
    await env.reader.call("DELETE", f"/v1/lists/{lst['id']}/members", 403, json={"contact_ids": ids})
    await env.reader.call("DELETE", f"/v1/lists/{lst['id']}", 403)
    assert await env.count("SELECT count(*) FROM contacts") == 1


# -- the address checks --------------------------------------------------------------------------


def _validator_accepts(address: str) -> bool:
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


@pytest.mark.parametrize(
    "address",
    [
        "a@b.co", "first.last+tag@sub.example.com", "o'neil@example.ie", "x@a-b.c-d.org", "UPPER@EXAMPLE.COM",
        "a@x.c0m", "a@xn--bcher-kva.example", "josé@example.com", "a@bücher.de", "user@example.example",
        "a..b@x.com", "a@x-.com", "a@-x.com", "a@ab--c.com", "a@b.123", "x@localhost", "a@x.local", "a@x.test",
        "a@[1.2.3.4]", '"a b"@x.com', ".a@x.com", "a.@x.com", "a@x..com", "a@x.com.", "@x.com", "a@", "a",
        "a@" + "b" * 64 + ".com", "l" * 65 + "@x.com", "a@" + ".".join(["abcdefghi"] * 26) + ".com",
    ],
)
def test_email_check_agrees_with_email_validator(address):
    assert (email_problem(address) is None) == _validator_accepts(address)


@hsettings(max_examples=3000, deadline=None)
@given(st.text(alphabet="aZ0.-_+@xn'é", min_size=1, max_size=24))
def test_email_fast_path_never_accepts_what_email_validator_rejects(address):
    assert (email_problem(address) is None) == _validator_accepts(address)


@hsettings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["a@b.co", "x.y@ex-ample.org", "bad@", "a@b.test", "a\nb@c.de", "", "é@x.com", "a@b.co\n"]), max_size=6))
def test_the_one_regex_over_all_addresses_agrees_with_one_per_address(addresses):
    assert _all_fast_emails(addresses) == (bool(addresses) and all(_FAST_EMAIL.fullmatch(a) for a in addresses))


def test_phone_check():
    import phonenumbers

    for number in ("+14155550100", "+442079460958", "+33612345678", "+8613812345678", "+390612345678", "+80012345678"):
        assert phone_problem(number) is None, number
        assert phonenumbers.is_possible_number(phonenumbers.parse(number)), number
    for number in ("+1415555010", "+4420794609581234", "14155550100", "+1-415-555-0100", "+0123456789", "+99912345678"):
        assert phone_problem(number) is not None, number


def test_locale_canonical_form():
    assert canonical_locale("en") == "en"
    assert canonical_locale("pt_br") == "pt-BR"
    assert canonical_locale("ZH-hant-tw") == "zh-Hant-TW"
    assert canonical_locale("es-419") == "es-419"
    assert canonical_locale("de-CH-1996") == "de-CH-1996"
    for bad in ("", "e", "english", "en-", "en--US", "en US", "12"):
        assert canonical_locale(bad) is None, bad
