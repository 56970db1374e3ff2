"""End to end: one broadcast on email and SMS, each recipient's channels chosen by the broadcast's
policy and its language by its locale, sent through a real SMTP peer and a local Twilio peer."""
from __future__ import annotations

import uuid
from collections import Counter

import asyncpg

from tests.smtp_peer import SmtpPeer
from tests.stack import Api, api_for, sender_in_process
from tests.twilio_peer import TwilioPeer

# Who has which address and locale (None: none).
PEOPLE = [
    # external_id, email,              phone,            locale
    ("both-de", "both-de@example.com", "+4915100000001", "de-AT"),
    ("both-en", "both-en@example.com", "+4915100000002", "en"),
    ("mail-pt", "mail-pt@example.com", None, "pt-BR"),
    ("sms-de", None, "+4915100000004", "de"),
    ("sms-fr", None, "+4915100000005", "fr"),
    ("none", None, None, "de"),
]

CONTENT = {
    "subject": "Hello {{ first_name }}", "subject_i18n": {"de": "Hallo {{ first_name }}", "pt-BR": "Olá {{ first_name }}"},
    "preheader": "News for you", "preheader_i18n": {"de": "Neuigkeiten"},
    "html": "<p>Hi {{ first_name }}</p>", "html_i18n": {"de": "<p>Hallo {{ first_name }}</p>",
                                                         "pt-BR": "<p>Olá {{ first_name }}</p>"},
    "sms": {"body": "Hi {{ first_name }}", "body_i18n": {"de": "Hallo {{ first_name }}"}},
}


async def setup(api: Api, smtp: SmtpPeer, twilio: TwilioPeer, policy: str, content: dict | None = None) -> str:
    contacts = [{"external_id": x, **({"email": e} if e else {}), **({"phone": p} if p else {}),
                 "locale": loc, "attributes": {"first_name": f"<{x}>"}} for x, e, p, loc in PEOPLE]
    ids = (await api.post("/v1/contacts", contacts))["ids"]
    lst = await api.post("/v1/lists", {"name": f"mixed {policy}"})
    await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
    mail = await api.post("/v1/providers", {
        "name": "mail", "channel": "email", "kind": "smtp", "host": smtp.host, "port": smtp.port, "starttls": False,
        "from_email": "news@example.com", "batch_size": 2, "batch_delay_ms": 0})
    texts = await api.post("/v1/providers", {"name": "texts", "kind": "twilio", **twilio.provider_config(),
                                             "allow_insecure_auth": True, "batch_size": 2, "batch_delay_ms": 0,
                                             "rate_limits": []})
    created = await api.post("/v1/broadcasts", {
        "name": f"both ways {policy}", "list_id": lst["id"], "channels": ["email", "sms"], "channel_policy": policy,
        "providers": {"email": mail["id"], "sms": texts["id"]}, "content": content or CONTENT})
    return created["id"]


async def ledger(settings, broadcast_id: str) -> dict[tuple[str, str], tuple[str, str | None]]:
    con = await asyncpg.connect(settings.database_url)
    try:
        rows = await con.fetch(
            """SELECT c.external_id, m.channel, m.status, m.error FROM messages m JOIN contacts c ON c.id = m.contact_id
               WHERE m.broadcast_id = $1""", uuid.UUID(broadcast_id))
    finally:
        await con.close()
    return {(r["external_id"], r["channel"]): (r["status"], r["error"]) for r in rows}


async def test_first_available_sends_each_recipient_once_on_its_first_channel_in_its_language(settings):
    with SmtpPeer() as smtp, TwilioPeer() as twilio:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id = await setup(api, smtp, twilio, "first_available")
            preview = (await api.get(f"/v1/broadcasts/{broadcast_id}/preview"))["items"]
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            done = await api.wait_for_status(broadcast_id, {"completed", "partially_failed", "failed"}, timeout=60)
            pairs = await ledger(settings, broadcast_id)

    # Then whoever has an email got it by email only, the others by SMS, in their language
    assert done["status"] == "completed"
    mails = {r.rcpt_tos[0]: r for r in smtp.received}
    texts = {r.to: r for r in twilio.received}
    assert sorted(mails) == ["both-de@example.com", "both-en@example.com", "mail-pt@example.com"]
    assert sorted(texts) == ["+4915100000004", "+4915100000005"]
    assert mails["both-de@example.com"].subject == "Hallo <both-de>"  # de-AT falls back to de
    assert mails["both-en@example.com"].subject == "Hello <both-en>"
    assert mails["mail-pt@example.com"].subject == "Olá <mail-pt>"
    assert "Hallo &lt;both-de&gt;" in mails["both-de@example.com"].html  # escaped in HTML ...
    assert "Neuigkeiten" in mails["both-de@example.com"].html  # ... with the preheader of its language
    assert mails["both-de@example.com"].html.lstrip().lower().startswith("<!doctype html>")
    assert mails["both-de@example.com"].text.strip() == "Hallo <both-de>"  # derived from the HTML, plain
    assert texts["+4915100000004"].body == "Hallo <sms-de>"  # plain in SMS
    assert texts["+4915100000005"].body == "Hi <sms-fr>"  # no fr variant: the default
    # And the ledger has one row per (recipient, channel) sent, and the channels tried without an
    # address as skipped
    assert pairs == {
        ("both-de", "email"): ("sent", None), ("both-en", "email"): ("sent", None),
        ("mail-pt", "email"): ("sent", None),
        ("sms-de", "email"): ("skipped", "no_address"), ("sms-de", "sms"): ("sent", None),
        ("sms-fr", "email"): ("skipped", "no_address"), ("sms-fr", "sms"): ("sent", None),
        ("none", "email"): ("skipped", "no_address"), ("none", "sms"): ("skipped", "no_address"),
    }
    assert done["counters"]["sent"] == 5 and done["counters"]["total"] == 5 and done["counters"]["skipped"] == 4
    # The preview said the same before the send
    by_contact = {p["messages"][0]["address"] if p["messages"] else None: p for p in preview}
    assert by_contact["both-de@example.com"]["channels"] == ["email"]
    assert by_contact["both-de@example.com"]["locale"] == "de"
    assert by_contact["+4915100000004"]["channels"] == ["sms"]
    assert by_contact["+4915100000004"]["skipped"] == ["email"]
    assert by_contact["+4915100000004"]["messages"][0]["content"] == {"body": "Hallo <sms-de>"}


async def test_all_sends_on_every_channel_a_recipient_has_an_address_on(settings):
    with SmtpPeer() as smtp, TwilioPeer() as twilio:
        async with api_for(settings) as api, sender_in_process(settings):
            broadcast_id = await setup(api, smtp, twilio, "all")
            await api.post(f"/v1/broadcasts/{broadcast_id}/send", expect=202)
            done = await api.wait_for_status(broadcast_id, {"completed", "partially_failed", "failed"}, timeout=60)
            pairs = await ledger(settings, broadcast_id)

    assert done["status"] == "completed"
    assert Counter(a for r in smtp.received for a in r.rcpt_tos) == Counter(
        ["both-de@example.com", "both-en@example.com", "mail-pt@example.com"])
    assert Counter(r.to for r in twilio.received) == Counter(
        ["+4915100000001", "+4915100000002", "+4915100000004", "+4915100000005"])
    assert {k: v for k, v in pairs.items() if v[0] == "skipped"} == {
        ("mail-pt", "sms"): ("skipped", "no_address"),
        ("sms-de", "email"): ("skipped", "no_address"), ("sms-fr", "email"): ("skipped", "no_address"),
        ("none", "email"): ("skipped", "no_address"), ("none", "sms"): ("skipped", "no_address"),
    }
    assert sum(1 for v in pairs.values() if v[0] == "sent") == 7
    assert done["counters"]["sent"] == 7 and done["counters"]["skipped"] == 5


async def test_a_channel_the_content_has_nothing_for_is_a_422(settings):
    content = {k: v for k, v in CONTENT.items() if k != "sms"}
    async with api_for(settings) as api:
        # inline content: refused when the broadcast is saved
        problem = await api.post("/v1/broadcasts", {"name": "x", "channels": ["email", "sms"], "content": content},
                                 expect=422)
        assert problem["errors"][0]["field"] == "content.sms"
        # a template: refused when the broadcast is sent (the template may be edited until then)
        lst = await api.post("/v1/lists", {"name": "l"})
        await api.post(f"/v1/lists/{lst['id']}/members", {
            "contact_ids": (await api.post("/v1/contacts", [{"email": "a@example.com"}]))["ids"]})
        providers = {channel: (await api.post("/v1/providers", {"name": channel, "kind": "null", "channel": channel}))["id"]
                     for channel in ("email", "sms")}
        template = await api.post("/v1/templates", {"name": "mail only", "content": content})
        created = await api.post("/v1/broadcasts", {"name": "t", "list_id": lst["id"], "channels": ["email", "sms"],
                                                    "providers": providers, "template_id": template["id"]})
        problem = await api.post(f"/v1/broadcasts/{created['id']}/send", expect=422)
        assert problem["errors"][0]["field"] == "template_id"
        assert "sms" in problem["errors"][0]["reason"]


async def test_a_run_renders_the_template_version_it_started_with(settings):
    with SmtpPeer() as smtp:
        async with api_for(settings) as api, sender_in_process(settings):
            ids = (await api.post("/v1/contacts", [{"email": f"t{i}@example.com"} for i in range(6)]))["ids"]
            lst = await api.post("/v1/lists", {"name": "six"})
            await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
            mail = await api.post("/v1/providers", {
                "name": "mail", "channel": "email", "kind": "smtp", "host": smtp.host, "port": smtp.port,
                "starttls": False, "from_email": "news@example.com", "batch_size": 2, "batch_delay_ms": 300})
            template = await api.post("/v1/templates", {"name": "news", "content": {"subject": "First", "text": "1"}})
            created = await api.post("/v1/broadcasts", {"name": "t", "list_id": lst["id"], "provider_id": mail["id"],
                                                        "template_id": template["id"]})
            # When the template is edited while the run sends (its batches 300 ms apart)
            await api.post(f"/v1/broadcasts/{created['id']}/send", expect=202)
            edited = await api.patch(f"/v1/templates/{template['id']}", {"content": {"subject": "Second", "text": "2"}})
            done = await api.wait_for_status(created["id"], {"completed", "failed", "partially_failed"}, timeout=60)
            first_run = sorted(r.subject for r in smtp.received)
            # Then the run sent the version it started with; the next run sends the new one
            await api.post(f"/v1/broadcasts/{created['id']}/reset")
            preview = (await api.get(f"/v1/broadcasts/{created['id']}/preview", params={"limit": 1}))["items"]
            await api.post(f"/v1/broadcasts/{created['id']}/send", expect=202)
            again = await api.wait_for_status(created["id"], {"completed", "failed", "partially_failed"}, timeout=60)
    assert edited["version"] == 2 and done["template_version"] == 1 and again["template_version"] == 2
    assert done["status"] == "completed" and first_run == ["First"] * 6
    assert preview[0]["subject"] == "Second"
    assert sorted(r.subject for r in smtp.received) == ["First"] * 6 + ["Second"] * 6


async def test_preview_and_test_send_on_every_channel(settings):
    content = {
        "subject": "Hi {{ first_name }}", "text": "Hello {{ first_name }}",
        "sms": {"body": "Hi {{ first_name }}"},
        "whatsapp": {"template_name": "hello", "language": "en", "parameters": {"1": "{{ first_name }}"}},
        "telegram": {"text": "Hi *{{ first_name }}*", "action_label": "Open", "action_url": "https://example.com"},
        "push": {"title": "Hi {{ first_name }}", "body": "news"},
        "webhook": {"payload": {"hello": "{{ first_name }}", "n": 1}},
    }
    channels = ["email", "sms", "whatsapp", "telegram", "push", "webhook"]
    async with api_for(settings) as api:
        [contact_id] = (await api.post("/v1/contacts", [{
            "email": "all@example.com", "phone": "+4915100000009", "telegram_chat_id": "4711",
            "push_tokens": ["tok-1"], "attributes": {"first_name": "A_n*n"}}]))["ids"]
        lst = await api.post("/v1/lists", {"name": "one"})
        await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": [contact_id]})
        providers = {c: (await api.post("/v1/providers", {"name": c, "kind": "null", "channel": c}))["id"]
                     for c in channels}
        created = await api.post("/v1/broadcasts", {"name": "everywhere", "list_id": lst["id"], "channels": channels,
                                                    "providers": providers, "content": content})
        [item] = (await api.get(f"/v1/broadcasts/{created['id']}/preview"))["items"]
        sent = await api.post(f"/v1/broadcasts/{created['id']}/test", {"contact_ids": [contact_id]})
    assert item["channels"] == channels and item["skipped"] == []
    rendered = {m["channel"]: (m["address"], m["content"]) for m in item["messages"]}
    assert rendered["sms"] == ("+4915100000009", {"body": "Hi A_n*n"})
    assert rendered["whatsapp"] == ("+4915100000009", {"template_name": "hello", "language": "en",
                                                       "parameters": {"1": "A_n*n"}})
    assert rendered["telegram"] == ("4711", {"text": r"Hi *A\_n\*n*", "media_url": None, "media_type": None,
                                             "button_label": "Open", "button_url": "https://example.com"})
    assert rendered["push"] == ("tok-1", {"title": "Hi A_n*n", "body": "news", "image_url": None, "url": None,
                                          "data": {}})
    assert rendered["webhook"] == (str(contact_id), {"payload": {"hello": "A_n*n", "n": 1}})
    assert rendered["email"][1]["subject"] == "Hi A_n*n" and rendered["email"][1]["text"] == "Hello A_n*n"
    assert sorted(r["address"] for r in sent["results"]) == sorted(a for a, _ in rendered.values())
    assert all(r["ok"] for r in sent["results"])
