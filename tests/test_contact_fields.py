"""Every address a contact has, through the REST API on a real Postgres: each field's normal form
and its 422s, PATCH's merge, the list filters (within a tenant), and erasure (GDPR) with the send
history it leaves; and the fields' fast paths against the libraries they stand in for."""
from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import phonenumbers
import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shared.audience import erasure, fields
from shared.platform import db
from shared.sending import snapshot
from tests.tenant_env import Client, TenantEnv, tenant_env

CONTACTS = "/v1/contacts"


@pytest.fixture
async def env(settings):
    async with tenant_env(settings) as e:
        yield e


# -- each field's normal form ---------------------------------------------------------------------


async def test_every_address_is_stored_in_its_normal_form_and_shown(env):
    # Given a contact written the way people write addresses
    body = {
        "external_id": "ann", "email": "Ann.Lee@Example.COM", "phone": "+1 (415) 555-0100",
        "whatsapp": "0151 23456789", "phone_region": "de", "telegram_chat_id": 123456789,
        "push_tokens": ["fcm:abc", "apns-0f1e", "fcm:abc"], "locale": "pt_br", "timezone": "europe/berlin",
        "attributes": {"plan": "pro"},
    }
    # When it is created
    created = await env.writer.call("POST", CONTACTS, 201, json=body)
    # Then every field is in its normal form, and reading it shows the same
    assert created["email"] == "Ann.Lee@example.com"  # the domain's case only, as email-validator does
    assert created["phone"] == "+14155550100"
    assert created["whatsapp"] == "+4915123456789"  # national, in phone_region
    assert created["telegram_chat_id"] == "123456789"
    assert created["push_tokens"] == ["fcm:abc", "apns-0f1e"]  # repeats dropped, order kept
    assert created["locale"] == "pt-BR" and created["timezone"] == "Europe/Berlin"
    assert "phone_region" not in created  # input only
    assert await env.writer.call("GET", f"{CONTACTS}/{created['id']}", 200) == created


async def test_a_national_phone_needs_its_region(env):
    # Given a German national number, with and without its region
    with_region = await env.writer.call("POST", CONTACTS, 201, json={"phone": "030 1234567", "phone_region": "DE"})
    assert with_region["phone"] == "+49301234567"
    # When it comes without one, the 422 names the phone of that item, and nothing is written
    refused = await env.writer.fields("POST", CONTACTS, json=[{"phone": "+49 30 1234567"}, {"phone": "030 1234567"}])
    assert refused == ["[1].phone"]
    # And an international number needs none, in whatever format
    assert (await env.writer.call("POST", CONTACTS, 201, json={"phone": "+49 (30) 123-4567"}))["phone"] == "+49301234567"
    assert await env.sql("fetchval", "SELECT count(*) FROM contacts") == 2


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"phone": "030 1234567"}, "phone"),  # national, no region
        ({"phone": "030 1234567", "phone_region": "XX"}, "phone_region"),  # no such region
        ({"phone": "+1 415 555 0100 ext. 7"}, "phone"),  # an extension: not E.164
        ({"whatsapp": "0151 23456789"}, "whatsapp"),
        ({"whatsapp": "+99912345678"}, "whatsapp"),  # no such country code
        ({"whatsapp": "+4420"}, "whatsapp"),  # too short
        ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"timezone": "CEST"}, "timezone"),  # an abbreviation, not a zone
        ({"telegram_chat_id": "hello world"}, "telegram_chat_id"),
        ({"telegram_chat_id": 0}, "telegram_chat_id"),
        ({"push_tokens": [f"t{i}" for i in range(fields.MAX_PUSH_TOKENS + 1)]}, "push_tokens"),
        ({"push_tokens": ["ok", "not a token"]}, "push_tokens[1]"),
        ({"push_tokens": "one"}, "push_tokens"),
        ({"email": "ann@example"}, "email"),
        ({"locale": "english"}, "locale"),
    ],
)
async def test_a_bad_field_is_a_422_naming_it_and_nothing_is_written(env, item, field):
    assert await env.writer.fields("POST", CONTACTS, json=[{"external_id": "fine"}, {"external_id": "x", **item}]) == [
        f"[1].{field}"
    ]
    assert await env.writer.fields("POST", CONTACTS, json=item) == [field]
    assert await env.sql("fetchval", "SELECT count(*) FROM contacts") == 0


async def test_every_bad_field_of_an_import_is_named(env):
    body = [{"external_id": f"u{i}", "email": f"u{i}@example.com"} for i in range(5)]
    body[1]["timezone"] = "Nowhere/Land"
    body[3]["whatsapp"] = "12345"
    body[3]["telegram_chat_id"] = "@no"
    refused = await env.writer.fields("POST", CONTACTS, json=body)
    assert refused == ["[1].timezone", "[3].whatsapp", "[3].telegram_chat_id"]


async def test_an_upsert_keeps_the_channel_fields_it_leaves_out_and_clears_those_given_null(env):
    # Given contacts with every channel
    first = [{"external_id": f"c{i}", "whatsapp": f"+4915123456{i:03d}", "telegram_chat_id": f"-100{i}",
              "push_tokens": [f"tok{i}"], "timezone": "Europe/Paris"} for i in range(3)]
    ids = (await env.writer.call("POST", CONTACTS, 200, json=first))["ids"]
    # When an import gives some fields for some of them, null for others, and leaves the rest out
    second = [
        {"external_id": "c0", "timezone": "Asia/Tokyo"},
        {"external_id": "c1", "whatsapp": None, "push_tokens": None},
        {"external_id": "c2", "email": "c2@example.com"},
        {"external_id": "c2", "push_tokens": ["b", "a", "b"]},  # the same contact again: applied in order
    ]
    result = await env.writer.call("POST", CONTACTS, 200, json=second)
    assert result["created"] == 0 and result["ids"] == [ids[0], ids[1], ids[2], ids[2]]
    c0, c1, c2 = [await env.writer.call("GET", f"{CONTACTS}/{i}", 200) for i in ids]
    # Then each keeps what it was not given
    assert (c0["timezone"], c0["whatsapp"], c0["push_tokens"]) == ("Asia/Tokyo", "+4915123456000", ["tok0"])
    assert (c1["whatsapp"], c1["push_tokens"], c1["telegram_chat_id"]) == (None, [], "-1001")
    assert (c2["email"], c2["push_tokens"], c2["timezone"]) == ("c2@example.com", ["b", "a"], "Europe/Paris")


# -- PATCH ----------------------------------------------------------------------------------------


async def test_patch_replaces_what_it_gives_and_merges_attributes_as_a_merge_patch(env):
    # Given a contact
    ann = await env.writer.call("POST", CONTACTS, 201, json={
        "external_id": "ann", "email": "ann@example.com", "phone": "+14155550100", "push_tokens": ["a", "b"],
        "attributes": {"plan": "pro", "score": 3, "address": {"city": "Oslo", "zip": "0150"}, "tags": ["x"]},
    })
    path = f"{CONTACTS}/{ann['id']}"
    # When some fields change, one is cleared, and the attributes are patched
    patched = await env.writer.call("PATCH", path, 200, json={
        "phone": None, "timezone": "America/New_York", "push_tokens": ["c", "c"],
        "attributes": {"score": None, "address": {"zip": None, "street": "Main"}, "tags": ["y"], "vip": True},
    })
    # Then the fields given replace, null clears, the rest is kept
    assert patched["email"] == "ann@example.com" and patched["phone"] is None
    assert patched["timezone"] == "America/New_York" and patched["push_tokens"] == ["c"]
    # attributes: a key given replaces, an object merges, null removes, arrays are replaced whole
    assert patched["attributes"] == {"plan": "pro", "address": {"city": "Oslo", "street": "Main"}, "tags": ["y"], "vip": True}
    assert patched["updated_at"] > ann["updated_at"]
    assert await env.writer.call("GET", path, 200) == patched

    # A national number in its region; then all attributes cleared; an empty patch changes nothing
    assert (await env.writer.call("PATCH", path, 200, json={"phone": "(415) 555-0199", "phone_region": "US"}))["phone"] == "+14155550199"
    cleared = await env.writer.call("PATCH", path, 200, json={"attributes": None})
    assert cleared["attributes"] == {} and cleared["email"] == "ann@example.com"
    assert await env.writer.call("PATCH", path, 200, json={}) == cleared


async def test_patch_refuses_bad_fields_and_changes_nothing(env):
    ann = await env.writer.call("POST", CONTACTS, 201, json={"external_id": "ann", "timezone": "UTC"})
    path = f"{CONTACTS}/{ann['id']}"
    assert await env.writer.fields("PATCH", path, json={"timezone": "Moon/Base", "email": "x"}) == ["email", "timezone"]
    assert await env.writer.fields("PATCH", path, json={"phone": "0151 23456789"}) == ["phone"]
    assert await env.writer.fields("PATCH", path, json={"id": 5}) == ["id"]  # read-only
    assert await env.writer.fields("PATCH", path, json={"external_id": ""}) == ["external_id"]
    assert await env.writer.call("GET", path, 200) == ann


async def test_patch_external_id_to_another_contacts_is_409_and_to_a_free_one_is_fine(env):
    ann = await env.writer.call("POST", CONTACTS, 201, json={"external_id": "ann"})
    bob = await env.writer.call("POST", CONTACTS, 201, json={"external_id": "bob"})
    problem = await env.writer.call("PATCH", f"{CONTACTS}/{ann['id']}", 409, json={"external_id": "bob", "locale": "de"})
    assert problem["code"] == "external_id_taken" and problem["contact_id"] == bob["id"]
    assert (await env.writer.call("GET", f"{CONTACTS}/{ann['id']}", 200))["locale"] is None  # nothing changed
    # Another tenant's "bob" does not count, and a free external id (or none) is fine
    await env.stranger.call("POST", CONTACTS, 201, json={"external_id": "carl"})
    assert (await env.writer.call("PATCH", f"{CONTACTS}/{ann['id']}", 200, json={"external_id": "carl"}))["external_id"] == "carl"
    assert (await env.writer.call("PATCH", f"{CONTACTS}/{ann['id']}", 200, json={"external_id": None}))["external_id"] is None
    # An upsert by the old key now creates a new contact
    assert (await env.writer.call("POST", CONTACTS, 201, json={"external_id": "ann"}))["id"] != ann["id"]


async def test_patch_of_another_tenants_contact_is_404_and_a_reader_may_not(env):
    ann = await env.writer.call("POST", CONTACTS, 201, json={"external_id": "ann", "email": "ann@example.com"})
    await env.stranger.call("PATCH", f"{CONTACTS}/{ann['id']}", 404, json={"email": "evil@example.com"})
    await env.writer.call("PATCH", f"{CONTACTS}/999999999", 404, json={"email": "x@example.com"})
    await env.reader.call("PATCH", f"{CONTACTS}/{ann['id']}", 403, json={"email": "x@example.com"})
    assert (await env.writer.call("GET", f"{CONTACTS}/{ann['id']}", 200))["email"] == "ann@example.com"


async def test_patch_that_would_grow_attributes_past_the_stored_limit_is_422(env):
    ann = await env.writer.call("POST", CONTACTS, 201, json={"external_id": "ann", "attributes": {"a": "x" * 65_000}})
    path = f"{CONTACTS}/{ann['id']}"
    await env.writer.call("PATCH", path, 200, json={"attributes": {"b": "y" * 60_000}})
    assert await env.writer.fields("PATCH", path, json={"attributes": {"c": "z" * 60_000}}) == ["attributes"]
    assert set((await env.writer.call("GET", path, 200))["attributes"]) == {"a", "b"}


# -- filters --------------------------------------------------------------------------------------


async def ids_of(client: Client, **params: Any) -> list[int]:
    page = await client.call("GET", CONTACTS, 200, params=params)
    assert page["total"] == len(page["items"]) or "limit" in params
    return [c["id"] for c in page["items"]]


async def test_filters_by_email_external_id_list_and_update_time_within_the_tenant(env):
    # Given five contacts of mine, two of them on a list, and a stranger's with the same addresses
    body = [{"external_id": f"u{i}", "email": f"User{i}@Example.com"} for i in range(5)]
    ids = (await env.writer.call("POST", CONTACTS, 200, json=body))["ids"]
    lst = await env.writer.call("POST", "/v1/lists", 201, json={"name": "vip"})
    await env.writer.call("POST", f"/v1/lists/{lst['id']}/members", 200, json={"contact_ids": [ids[3], ids[1]]})
    theirs = (await env.stranger.call("POST", CONTACTS, 200, json=body))["ids"]
    their_list = await env.stranger.call("POST", "/v1/lists", 201, json={"name": "theirs"})
    await env.stranger.call("POST", f"/v1/lists/{their_list['id']}/members", 200, json={"contact_ids": theirs})

    # Then each filter finds mine only
    assert await ids_of(env.writer, email="user2@EXAMPLE.COM") == [ids[2]]
    assert await ids_of(env.writer, external_id="u4") == [ids[4]]
    assert await ids_of(env.writer, list_id=lst["id"]) == sorted([ids[1], ids[3]])
    assert await ids_of(env.writer, list_id=lst["id"], email="User3@example.com") == [ids[3]]  # they combine
    assert await ids_of(env.writer, list_id=lst["id"], external_id="u0") == []
    page = await env.writer.call("GET", CONTACTS, 200, params={"list_id": lst["id"], "limit": 1, "offset": 1})
    assert page["total"] == 2 and [c["id"] for c in page["items"]] == [max(ids[1], ids[3])]
    # Another tenant's list is as absent as a missing one: 404, whoever asks
    await env.writer.call("GET", CONTACTS, 404, params={"list_id": their_list["id"]})
    await env.stranger.call("GET", CONTACTS, 404, params={"list_id": lst["id"]})
    await env.writer.call("GET", CONTACTS, 404, params={"list_id": str(uuid.uuid4())})
    await env.writer.call("GET", CONTACTS, 422, params={"list_id": "not-a-uuid"})

    # updated_since: only what changed at or after it (a time without offset is UTC)
    await asyncio.sleep(0.01)
    cut = datetime.now(timezone.utc)
    await env.writer.call("PATCH", f"{CONTACTS}/{ids[0]}", 200, json={"locale": "fr"})
    assert await ids_of(env.writer, updated_since=cut.isoformat()) == [ids[0]]
    assert await ids_of(env.writer, updated_since=cut.replace(tzinfo=None).isoformat()) == [ids[0]]
    earlier = (cut - timedelta(hours=1)).astimezone(timezone(timedelta(hours=-5)))
    assert await ids_of(env.writer, updated_since=earlier.isoformat()) == ids
    assert await ids_of(env.stranger, updated_since=cut.isoformat()) == []


async def test_a_filtered_list_reads_only_the_tenants_contacts(env):
    # Given a query plan for each filter (on tables the planner thinks are large)
    con = await db.connect(env.database_url)
    try:
        await con.execute("ANALYZE contacts; ANALYZE list_members")
        plans = []
        for condition in ("lower(c.email) = lower('a@b.co') AND c.email IS NOT NULL", "c.external_id = 'u1'::text",
                          "c.updated_at >= now()",
                          f"EXISTS (SELECT 1 FROM list_members m WHERE m.list_id = '{uuid.uuid4()}' AND m.contact_id = c.id)"):
            await con.execute("SET enable_seqscan = off")  # as if contacts were large
            rows = await con.fetch(f"EXPLAIN SELECT * FROM contacts c WHERE c.tenant_id = $1 AND {condition} ORDER BY c.id",
                                   env.tenant_id)
            plans.append("\n".join(r[0] for r in rows))
    finally:
        await con.close()
    # Then each reaches contacts through an index whose first column is the tenant
    for plan in plans:
        assert "Seq Scan on contacts" not in plan, plan
        assert "Index" in plan, plan


async def test_segment_filter_is_the_segments_contacts_and_another_tenants_segment_is_404(env):
    body = [{"external_id": f"u{i}", "email": f"u{i}@example.com", "attributes": {"plan": "pro" if i % 2 else "free"}}
            for i in range(4)]
    ids = (await env.writer.call("POST", CONTACTS, 200, json=body))["ids"]
    r = await env.writer.http.post("/v1/segments", headers=env.writer.headers, json={
        "name": "pro", "rules": {"field": "attributes.plan", "op": "eq", "value": "pro"},
    })
    if r.status_code == 404:
        pytest.skip("no /v1/segments in this build")
    assert r.status_code == 201, r.text
    segment = r.json()
    assert await ids_of(env.writer, segment_id=segment["id"]) == [ids[1], ids[3]]
    assert await ids_of(env.writer, segment_id=segment["id"], external_id="u3") == [ids[3]]
    await env.stranger.call("GET", CONTACTS, 404, params={"segment_id": segment["id"]})
    await env.writer.call("GET", CONTACTS, 404, params={"segment_id": str(uuid.uuid4())})


# -- erasure --------------------------------------------------------------------------------------


async def given_a_send_history(env: TenantEnv, ann: int, bob: int) -> dict[str, Any]:
    """Two runs of one broadcast of the writer's tenant that reached Ann and Bob (ledger rows with
    an error quoting Ann's address, batches with their addresses, counters), and one of the
    stranger's tenant."""
    b, theirs = uuid.uuid4(), uuid.uuid4()
    con = await db.connect(env.database_url)
    try:
        for broadcast, run, tenant in ((b, 1, env.tenant_id), (b, 2, env.tenant_id), (theirs, 1, env.stranger_tenant_id)):
            await con.execute(
                "INSERT INTO runs (broadcast_id, run, tenant_id, channel, planned) VALUES ($1, $2, $3, 'email', true)",
                broadcast, run, tenant,
            )
        await con.execute(
            """INSERT INTO batches (broadcast_id, run, seq, contact_ids, addresses, status) VALUES
               ($1, 1, 0, ARRAY[$2, $3]::bigint[], ARRAY['ann+x@example.com', 'bob@example.com'], 'done'),
               ($1, 2, 0, ARRAY[$3]::bigint[], ARRAY['bob@example.com'], 'done'),
               ($1, 2, 1, ARRAY[$2]::bigint[], '{}', 'queued')""",  # a batch without addresses
            b, ann, bob,
        )
        await con.execute(
            """INSERT INTO messages (broadcast_id, run, contact_id, channel, batch_seq, address, status, attempts, error)
               VALUES ($1, 1, $2, 'email', 0, 'ann+x@example.com', 'failed', 1, 'smtp 550: <ANN+X@example.com> full'),
                      ($1, 1, $3, 'email', 0, 'bob@example.com', 'sent', 1, NULL),
                      ($1, 2, $2, 'email', 0, 'ann+x@example.com', 'sent', 1, NULL),
                      ($4, 1, 1, 'email', 0, 'ann@example.com', 'sent', 1, NULL)""",
            b, ann, bob, theirs,
        )
        await con.execute(
            "INSERT INTO broadcast_counters (broadcast_id, run, total, sent, failed) VALUES ($1, 1, 2, 1, 1), ($1, 2, 2, 1, 0)", b
        )
    finally:
        await con.close()
    return {"broadcast": b, "theirs": theirs}


async def test_erasing_a_contact_redacts_its_addresses_and_keeps_the_history(env):
    # Given Ann and Bob on a list, and a send history with Ann's address in it
    ann, bob = (await env.writer.call("POST", CONTACTS, 200, json=[
        {"external_id": "ann", "email": "ann@example.com"}, {"external_id": "bob", "email": "bob@example.com"},
    ]))["ids"]
    lst = await env.writer.call("POST", "/v1/lists", 201, json={"name": "all"})
    await env.writer.call("POST", f"/v1/lists/{lst['id']}/members", 200, json={"contact_ids": [ann, bob]})
    history = await given_a_send_history(env, ann, bob)
    counters = await env.sql("fetch", "SELECT * FROM broadcast_counters ORDER BY run")

    # When a stranger tries, nothing happens; when the tenant erases Ann, the answer is 204
    await env.stranger.call("DELETE", f"{CONTACTS}/{ann}", 404)
    await env.reader.call("DELETE", f"{CONTACTS}/{ann}", 403)
    assert await env.sql("fetchval", "SELECT count(*) FROM messages WHERE address = $1", erasure.ERASED) == 0
    await env.writer.call("DELETE", f"{CONTACTS}/{ann}", 204)

    # Then Ann is gone, and so is her membership
    await env.writer.call("GET", f"{CONTACTS}/{ann}", 404)
    await env.writer.call("DELETE", f"{CONTACTS}/{ann}", 404)
    assert await env.sql("fetchval", "SELECT count(*) FROM list_members WHERE contact_id = $1", ann) == 0
    assert (await env.writer.call("GET", f"/v1/lists/{lst['id']}", 200))["member_count"] == 1
    # Her ledger rows keep her contact id and status, with her address redacted, also in the error
    rows = await env.sql("fetch", "SELECT run, contact_id, address, status, error FROM messages WHERE broadcast_id = $1 ORDER BY run, contact_id",
                         history["broadcast"])
    assert [tuple(r) for r in rows] == [
        (1, ann, "[erased]", "failed", "smtp 550: <[erased]> full"),  # found ignoring case, + as a literal
        (1, bob, "bob@example.com", "sent", None),
        (2, ann, "[erased]", "sent", None),
    ]
    # The batches' copies of her address are redacted, the arrays still parallel; Bob's are kept
    batches = await env.sql("fetch", "SELECT run, seq, contact_ids, addresses FROM batches ORDER BY run, seq")
    assert [(r["run"], r["seq"], r["contact_ids"], r["addresses"]) for r in batches] == [
        (1, 0, [ann, bob], ["[erased]", "bob@example.com"]),
        (2, 0, [bob], ["bob@example.com"]),
        (2, 1, [ann], []),
    ]
    # The counters are untouched, and so is another tenant's ledger
    assert await env.sql("fetch", "SELECT * FROM broadcast_counters ORDER BY run") == counters
    assert await env.sql("fetchval", "SELECT address FROM messages WHERE broadcast_id = $1", history["theirs"]) == "ann@example.com"
    # Bob is as he was
    assert (await env.writer.call("GET", f"{CONTACTS}/{bob}", 200))["email"] == "bob@example.com"


async def test_erasure_reads_the_ledger_by_key_not_all_of_it(env):
    # Given statistics that make a scan look cheap, each statement's plan still reads by key: the
    # tenant's runs by runs_tenant, the ledger and the batches by their primary keys
    b = uuid.uuid4()
    await env.sql("execute", "INSERT INTO runs (broadcast_id, run, tenant_id, channel) VALUES ($1, 1, $2, 'email')",
                  b, env.tenant_id)
    await env.sql("execute", """INSERT INTO runs (broadcast_id, run, tenant_id, channel, planned)
                                SELECT gen_random_uuid(), 1, $1, 'email', true FROM generate_series(1, 2000)""",
                  env.stranger_tenant_id)  # another tenant's: reading them would be the scan to avoid
    con = await db.connect(env.database_url)
    try:
        await con.execute("ANALYZE")
        async with con.transaction():
            await con.execute(erasure._PROBES_ONLY)
            plans = ["\n".join(r[0] for r in await con.fetch(f"EXPLAIN {sql}", *args)) for sql, args in (
                (erasure._LOCK_RUNS_BEING_PLANNED, [env.tenant_id]),
                (erasure._FIND_LEDGER_ROWS, [env.tenant_id, 1]),
                (erasure._FIND_BATCHES, [env.tenant_id, 1]),
            )]
    finally:
        await con.close()
    for plan, index in zip(plans, ("runs_tenant", "messages_pkey", "batches_pkey")):
        assert "Seq Scan" not in plan and index in plan and "runs_tenant" in plan, plan
    # one probe per run: the run's key and the contact in the index condition
    assert "Index Cond: ((broadcast_id = r.broadcast_id) AND (run = r.run) AND (contact_id = " in plans[1], plans[1]


async def test_erasure_waits_for_a_planner_snapshotting_one_of_the_tenants_runs(env):
    # Given a run being planned, its planner in the middle of a chunk (holding the run's lock)
    ann = (await env.writer.call("POST", CONTACTS, 201, json={"email": "ann@example.com"}))["id"]
    b = uuid.uuid4()
    await env.sql("execute", "INSERT INTO runs (broadcast_id, run, tenant_id, channel) VALUES ($1, 1, $2, 'email')",
                  b, env.tenant_id)
    planner, eraser = await db.connect(env.database_url), await db.connect(env.database_url)
    try:
        chunk = planner.transaction()
        await chunk.start()
        await snapshot.lock_run(planner, b, 1)
        # When Ann is erased meanwhile
        erase = asyncio.ensure_future(erasure.erase_contact(eraser, env.tenant_id, ann))
        await asyncio.sleep(0.5)
        # Then the erasure waits for the chunk (which could be writing Ann's address into a batch)
        assert not erase.done()
        assert await env.sql("fetchval", "SELECT count(*) FROM contacts") == 1
        await chunk.commit()
        assert await asyncio.wait_for(erase, 10) == erasure.Erased(ledger_rows=0, batches=0)
    finally:
        await planner.close()
        await eraser.close()
    assert await env.sql("fetchval", "SELECT count(*) FROM contacts") == 0


# -- the fields' fast paths against the libraries -------------------------------------------------


@hsettings(max_examples=2000, deadline=None)
@given(st.text(alphabet="aZ0.-_+@xn'", min_size=1, max_size=24))
def test_email_normal_form_is_email_validators(address):
    try:
        expected: str | None = validate_email(address, check_deliverability=False).normalized
    except EmailNotValidError:
        expected = None
    assert fields.checked_email(address)[0] == expected


@pytest.mark.parametrize("address", ["A@EXAMPLE.COM", "a.B+c@Sub.Example.Org", "x@xn--bcher-kva.example", "josé@EXAMPLE.com"])
def test_email_normal_form_examples(address):
    assert fields.checked_email(address) == (validate_email(address, check_deliverability=False).normalized, None)


@hsettings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(["+14155550100", "+4930123456", "+1 415", "+99912345678", "+4420", "4930123456",
                                 "+442079460958", "+14155550100\n"]), min_size=1, max_size=6))
def test_the_one_regex_over_all_numbers_agrees_with_one_per_number(numbers):
    assert fields.all_e164(numbers) == all(fields._E164.fullmatch(n) for n in numbers)
    if fields.all_e164(numbers):
        assert fields.shape_problems(numbers) == any(fields.phone_problem(n) for n in numbers)


@pytest.mark.parametrize(
    ("number", "region"),
    [("+1 (415) 555-0100", None), ("(415) 555-0100", "US"), ("030 1234567", "DE"), ("0044 20 7946 0958", "GB"),
     ("+81 3-1234-5678", None), ("0151 23456789", "de")],
)
def test_e164_is_phonenumbers_e164(number, region):
    parsed = phonenumbers.parse(number, region.upper() if region else None)
    assert fields.e164(number, region) == (phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164), None)


def test_timezones_push_tokens_and_telegram_ids():
    assert fields.canonical_timezone("Europe/Berlin") == "Europe/Berlin"
    assert fields.canonical_timezone("AMERICA/port-au-prince") == "America/Port-au-Prince"
    assert fields.canonical_timezone("Berlin") is None and fields.canonical_timezone("") is None
    assert fields.unique_tokens(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]
    for chat in ("123456789", "-1001234567890", "@crier_news"):
        assert fields.telegram_chat_id_problem(chat) is None, chat
    for chat in ("", "0", "12ab", "@abc", "@1abcdef", "-0"):
        assert fields.telegram_chat_id_problem(chat) is not None, chat
