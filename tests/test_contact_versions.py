"""A contact's former data, kept so a message renders with the recipient data it was made from
(migration 031): which changes keep a version, that erasure takes them along, and GET
/v1/messages/{id} before and after the retention's sweep, on the real stack."""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from shared.audience import contact_versions
from shared.background import run_housekeeping
from shared.platform import db
from tests.stack import Api, api_for, sender_in_process

ENDED = {"completed", "partially_failed", "failed"}
ANN = {"external_id": "ann", "email": "ann@example.com", "locale": "en", "attributes": {"first_name": "Ann"}}
BOB = {"external_id": "bob", "email": "bob@example.com", "attributes": {"first_name": "Bob"}}


async def versions(con: asyncpg.Connection) -> list[tuple[int, str | None, dict[str, Any]]]:
    """Every kept version, oldest first: contact id, its email then, its attributes then."""
    rows = await con.fetch("SELECT contact_id, contact FROM contact_versions ORDER BY valid_until, seq")
    return [(r["contact_id"], r["contact"]["email"], r["contact"]["attributes"]) for r in rows]


async def test_only_a_change_of_what_messages_render_keeps_a_version_and_erasure_takes_them_along(settings):
    con = await db.connect(settings.database_url)
    try:
        async with api_for(settings) as api:
            ann, bob = (await api.post("/v1/contacts", [ANN, BOB]))["ids"]
            # The same data again (an import run twice), and a change no message renders: nothing kept
            await api.post("/v1/contacts", [ANN, BOB])
            await api.patch(f"/v1/contacts/{ann}", {"timezone": "Europe/Berlin"})
            assert await versions(con) == []

            # An upsert that changes Ann and not Bob, then a PATCH of Bob's address: the rows as they were
            await api.post("/v1/contacts", [{**ANN, "attributes": {"first_name": "Annie"}}, BOB])
            await api.patch(f"/v1/contacts/{bob}", {"email": "robert@example.com"})
            assert await versions(con) == [
                (ann, "ann@example.com", {"first_name": "Ann"}),
                (bob, "bob@example.com", {"first_name": "Bob"}),
            ]

            # Erasing Bob erases his former data too; Ann's stays
            await api.call("DELETE", f"/v1/contacts/{bob}")
            assert await versions(con) == [(ann, "ann@example.com", {"first_name": "Ann"})]
    finally:
        await con.close()


async def send_to(api: Api, contact_id: int, subject: str) -> str:
    """A broadcast to the contact alone through the null provider, sent and finished: its message's id."""
    lst = await api.post("/v1/lists", {"name": subject})
    await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": [contact_id]})
    provider = await api.post("/v1/providers", {"name": subject, "kind": "null", "channel": "email",
                                                "from_email": "news@example.com"})
    b = await api.post("/v1/broadcasts", {"name": subject, "list_id": lst["id"], "provider_id": provider["id"],
                                          "content": {"subject": subject + " {{ first_name }}",
                                                      "html": "<p>Hi {{ first_name }}</p>"}})
    await api.post(f"/v1/broadcasts/{b['id']}/send", expect=202)
    await api.wait_for_status(b["id"], ENDED)
    return (await api.get("/v1/messages", params={"broadcast_id": b["id"]}))["items"][0]["id"]


async def test_a_message_shows_the_data_it_was_made_from_until_the_retention_drops_it(settings):
    con = await db.connect(settings.database_url)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        async with api_for(settings) as api, sender_in_process(settings):
            ann = (await api.post("/v1/contacts", [ANN]))["ids"][0]
            first = await send_to(api, ann, "First")
            await api.patch(f"/v1/contacts/{ann}", {"attributes": {"first_name": "Annie"}})
            second = await send_to(api, ann, "Second")
            await api.patch(f"/v1/contacts/{ann}", {"attributes": {"first_name": "Anna"}})

            shown = [await api.get(f"/v1/messages/{m}") for m in (first, second)]
            assert [(s["content"]["subject"], s["data_as_sent"]) for s in shown] == [
                ("First Ann", True), ("Second Annie", True)]
            assert [v[2]["first_name"] for v in await versions(con)] == ["Ann", "Annie"]

            # The first message and the version it was made from 100 days back: the housekeeping drops
            # that version, and the message shows the earliest data kept since, saying so
            await con.execute("UPDATE messages SET recorded_at = recorded_at - interval '100 days' "
                              "WHERE broadcast_id = $1", uuid.UUID(shown[0]["broadcast_id"]))
            await con.execute("UPDATE contact_versions SET valid_until = valid_until - interval '100 days' "
                              "WHERE contact->'attributes'->>'first_name' = 'Ann'")
            sweeping = asyncio.create_task(run_housekeeping(pool, every_s=0.05, sweep_every_s=0.05))
            try:
                for _ in range(200):
                    if len(await versions(con)) == 1:
                        break
                    await asyncio.sleep(0.05)
            finally:
                sweeping.cancel()
            assert [v[2]["first_name"] for v in await versions(con)] == ["Annie"]
            again = await api.get(f"/v1/messages/{first}")
            assert (again["content"]["subject"], again["data_as_sent"]) == ("First Annie", False)
            second_again = await api.get(f"/v1/messages/{second}")
            assert (second_again["content"]["subject"], second_again["data_as_sent"]) == ("Second Annie", True)
            assert await contact_versions.sweep(con) == 0
    finally:
        await pool.close()
        await con.close()
