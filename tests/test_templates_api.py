"""Templates: the REST API on a real Postgres (CRUD, search, versions, tenancy, deletion while in
use), and what every save checks and repairs (shared/content/checks.py): 422s naming the exact
field and line, locale keys, repaired HTML, SMS segment counts."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import msgspec
import pytest

from api_service.schemas import content as schemas
from shared.content import template_store
from shared.kernel import content as kernel
from shared.platform import db
from tests.api_helpers import error_fields
from tests.tenant_env import Client, TenantEnv, tenant_env

TEMPLATES = "/v1/templates"
EMAIL = {"subject": "Hi {{ first_name }}", "html": "<p>Hello {{ first_name }}</p>"}


@pytest.fixture
async def env(settings):
    async with tenant_env(settings) as e:
        yield e


async def a_template(client: Client, name: str = "Welcome", content: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return await client.call("POST", TEMPLATES, 201, json={"name": name, "content": content or EMAIL, **kw})


async def invalid(env: TenantEnv, content: dict[str, Any]) -> dict[str, str]:
    """The one error of a POST with this content (a 422)."""
    body = await env.writer.problem("POST", TEMPLATES, 422, json={"name": "bad", "content": content})
    assert len(error_fields(body)) == 1, body
    return body["errors"][0]


# -- the API's content mirrors the kernel's ---------------------------------------------------------


def test_the_content_schemas_have_the_kernels_fields():
    fields = set(kernel.Content.__struct_fields__)
    for schema in (schemas.ContentIn, schemas.ContentPatch, schemas.ContentOut):
        assert set(schema.__struct_fields__) == fields, schema
    for part, schema in ((kernel.SmsPart, schemas.SmsIn), (kernel.TelegramPart, schemas.TelegramIn),
                         (kernel.WhatsappPart, schemas.WhatsappIn), (kernel.PushPart, schemas.PushIn),
                         (kernel.WebhookPart, schemas.WebhookIn)):
        assert set(schema.__struct_fields__) == set(part.__struct_fields__), schema


# -- CRUD, search and tenancy -----------------------------------------------------------------------


async def test_create_get_and_list_with_search_filter_and_paging(env):
    # Given four contents, one of them not offered as a template
    invoice = await a_template(env.writer, "Invoice")
    receipt = await a_template(env.writer, "Receipt 100%_off", is_template=False)
    welcome = await a_template(env.writer, "Welcome email")
    sms_only = await a_template(env.writer, "welcome SMS", {"sms": {"body": "Hi {{ first_name }}"}})
    # Then each comes back as saved, at version 1
    assert welcome["version"] == 1 and welcome["is_template"] and welcome["content"] == EMAIL
    assert welcome["sms_segments"] is None and welcome["created_at"] == welcome["updated_at"]
    assert sms_only["content"] == {"sms": {"body": "Hi {{ first_name }}"}}  # no subject: SMS only
    assert receipt["is_template"] is False
    assert await env.reader.call("GET", f"{TEMPLATES}/{welcome['id']}", 200) == welcome

    # and the list pages them by name, case-insensitively, without their content
    page = await env.reader.call("GET", TEMPLATES, 200)
    assert [t["id"] for t in page["items"]] == [invoice["id"], receipt["id"], welcome["id"], sms_only["id"]]
    assert page["total"] == 4 and "content" not in page["items"][0]
    assert [t["channels"] for t in page["items"]] == [["email"], ["email"], ["email"], ["sms"]]
    page = await env.reader.call("GET", TEMPLATES, 200, params={"limit": 2, "offset": 2})
    assert [t["id"] for t in page["items"]] == [welcome["id"], sms_only["id"]]
    assert (page["total"], page["limit"], page["offset"]) == (4, 2, 2)

    async def names(**params: Any) -> list[str]:
        found = await env.reader.call("GET", TEMPLATES, 200, params=params)
        assert found["total"] == len(found["items"])
        return [t["name"] for t in found["items"]]

    # A search is a case-insensitive substring of the name, its % and _ taken literally
    assert await names(**{"filter[search]": "WELCOME"}) == ["Welcome email", "welcome SMS"]
    assert await names(**{"filter[search]": "%"}) == ["Receipt 100%_off"]
    assert await names(**{"filter[search]": "0_o"}) == []
    assert await names(**{"filter[search]": "%_"}) == ["Receipt 100%_off"]
    assert await names(is_template="false") == ["Receipt 100%_off"]
    assert await names(is_template="true", **{"filter[search]": "e"}) == ["Invoice", "Welcome email", "welcome SMS"]


async def test_idempotency_key_on_create(env):
    headers = {"Idempotency-Key": "tpl-1"}
    first = await env.writer.call("POST", TEMPLATES, 201, json={"name": "t", "content": EMAIL}, headers=headers)
    again = await env.writer.call("POST", TEMPLATES, 201, json={"name": "t", "content": EMAIL}, headers=headers)
    assert again == first
    assert (await env.writer.call("GET", TEMPLATES, 200))["total"] == 1


async def test_another_tenants_template_is_404_and_a_read_token_cannot_write(env):
    template = await a_template(env.writer)
    path = f"{TEMPLATES}/{template['id']}"
    await env.stranger.problem("GET", path, 404)
    await env.stranger.problem("GET", path, 404, params={"version": 1})
    await env.stranger.problem("PATCH", path, 404, json={"name": "mine"})
    await env.stranger.problem("DELETE", path, 404)
    assert (await env.stranger.call("GET", TEMPLATES, 200))["total"] == 0
    await env.reader.problem("POST", TEMPLATES, 403, json={"name": "x", "content": EMAIL})
    await env.reader.problem("PATCH", path, 403, json={"name": "x"})
    await env.reader.problem("DELETE", path, 403)
    assert await env.writer.call("GET", path, 200) == template


async def test_delete_then_get_is_404_but_a_running_broadcast_still_reads_its_version(env):
    template = await a_template(env.writer)
    path = f"{TEMPLATES}/{template['id']}"
    await env.writer.call("DELETE", path, 204)
    await env.writer.problem("GET", path, 404)
    await env.writer.problem("GET", path, 404, params={"version": 1})
    await env.writer.problem("PATCH", path, 404, json={"name": "back"})
    await env.writer.problem("DELETE", path, 404)
    assert (await env.writer.call("GET", TEMPLATES, 200))["total"] == 0
    # The store still has the version, for a broadcast whose run started with it
    con = await db.connect(env.database_url)
    try:
        kept = await template_store.get_version(con, env.tenant_id, uuid.UUID(template["id"]), 1)
        theirs = await template_store.get_version(con, env.stranger_tenant_id, uuid.UUID(template["id"]), 1)
    finally:
        await con.close()
    assert kept is not None and kept.content == kernel.Content(**EMAIL) and theirs is None


async def test_a_template_used_by_a_broadcast_not_finished_cannot_be_deleted(env):
    if not await env.sql("fetchval", """SELECT true FROM information_schema.columns
                                          WHERE table_name = 'broadcasts' AND column_name = 'template_id'"""):
        pytest.skip("broadcasts.template_id is not there yet (migration 021 adds it)")
    template = await a_template(env.writer)
    path = f"{TEMPLATES}/{template['id']}"
    # Given a draft using it (its view row, as the broadcasts projection writes it), and one that ended
    draft, done = uuid.uuid4(), uuid.uuid4()
    for broadcast_id, status in ((draft, "draft"), (done, "completed")):
        now = datetime.now(timezone.utc)
        await env.sql(
            "execute", """INSERT INTO broadcasts (id, tenant_id, name, channel, status, content, version, created_at,
                                                  updated_at, template_id)
                          VALUES ($1, $2, 'b', 'email', $3, '{}', 1, $4, $4, $5)""",
            broadcast_id, env.tenant_id, status, now, uuid.UUID(template["id"]),
        )
    # Then deleting the template is a 409 naming the draft only
    body = await env.writer.problem("DELETE", path, 409, "template_in_use")
    assert body["broadcasts"] == [str(draft)]
    # Once the draft is deleted, the template goes
    await env.sql("execute", "UPDATE broadcasts SET deleted = true WHERE id = $1", draft)
    await env.writer.call("DELETE", path, 204)


# -- versions -------------------------------------------------------------------------------------


async def test_patch_makes_a_new_version_and_the_old_one_stays_readable(env):
    sms = {"body": "Hi {{ first_name }}"}
    first = await a_template(env.writer, content={**EMAIL, "sms": sms, "subject_i18n": {"de": "Hallo"}})
    path = f"{TEMPLATES}/{first['id']}"
    # When the subject changes and the SMS section is removed
    second = await env.writer.call("PATCH", path, 200, json={"content": {"subject": "Hello", "sms": None}})
    # Then that is version 2, the rest of the content kept
    assert second["version"] == 2 and second["updated_at"] > first["updated_at"]
    assert second["content"] == {**EMAIL, "subject": "Hello", "subject_i18n": {"de": "Hallo"}}
    assert second["sms_segments"] is None
    assert await env.writer.call("GET", path, 200) == second
    # and version 1 is still there as it was
    assert await env.reader.call("GET", path, 200, params={"version": 1}) == first
    assert await env.reader.call("GET", path, 200, params={"version": 2}) == second
    await env.reader.problem("GET", path, 404, params={"version": 3})
    await env.reader.problem("GET", path, 422, params={"version": 0})

    # A rename is a save too; an empty patch saves nothing
    third = await env.writer.call("PATCH", path, 200, json={"name": "Renamed", "is_template": False})
    assert (third["version"], third["name"], third["is_template"]) == (3, "Renamed", False)
    assert third["content"] == second["content"]
    assert await env.writer.call("PATCH", path, 200, json={}) == third
    # A section given replaces the stored one; an i18n field given replaces all its variants
    fourth = await env.writer.call("PATCH", path, 200, json={"content": {
        "subject_i18n": {"fr": "Salut"}, "push": {"title": "Hi"}, "from_email": "News <news@example.com>",
    }})
    assert fourth["content"]["subject_i18n"] == {"fr": "Salut"} and fourth["content"]["push"] == {"title": "Hi"}
    fifth = await env.writer.call("PATCH", path, 200, json={"content": {"push": {"title": "Yo", "body": "b"},
                                                                         "from_email": None}})
    assert fifth["content"]["push"] == {"title": "Yo", "body": "b"} and "from_email" not in fifth["content"]
    assert await env.count("SELECT count(*) FROM template_versions WHERE template_id = $1", uuid.UUID(first["id"])) == 5


async def test_a_patch_made_on_an_older_version_is_a_409(env):
    template = await a_template(env.writer)
    con = await db.connect(env.database_url)
    try:
        with pytest.raises(template_store.TemplateChanged):
            await template_store.update(con, env.tenant_id, uuid.UUID(template["id"]), expected_version=0, name="x")
    finally:
        await con.close()
    assert (await env.writer.call("GET", f"{TEMPLATES}/{template['id']}", 200))["version"] == 1


# -- what a save checks and repairs ----------------------------------------------------------------


async def test_malformed_html_comes_back_repaired(env):
    broken = "<p>Hi <b>{{ first_name }}<script>alert(1)</script>"
    template = await a_template(env.writer, content={"subject": "Hi", "html": broken, "html_i18n": {"de": broken}})
    for html in (template["content"]["html"], template["content"]["html_i18n"]["de"]):
        assert "<script" not in html and "alert(1)" not in html
        assert html == "<p>Hi <b>{{ first_name }}</b></p>"  # tags closed, Liquid as it was
    # and on a PATCH too
    patched = await env.writer.call("PATCH", f"{TEMPLATES}/{template['id']}", 200,
                                    json={"content": {"html": '<div onclick="x()">{% if vip %}VIP{% endif %}'}})
    assert patched["content"]["html"] == "<div>{% if vip %}VIP{% endif %}</div>"

    # An edit of other fields leaves the stored HTML exactly as it is (it is not repaired again)
    document = ("<!doctype html><html><head><style>p { color: red }</style></head>"
                "<body><p>{{ first_name }}</body></html>")
    saved = await a_template(env.writer, "doc", {"subject": "Hi", "html": document, "html_i18n": {"de": document}})
    path = f"{TEMPLATES}/{saved['id']}"
    for subject in ("Hello", "Hey"):
        edited = await env.writer.call("PATCH", path, 200, json={"content": {"subject": subject}})
        assert edited["content"]["html"] == saved["content"]["html"]
        assert edited["content"]["html_i18n"] == saved["content"]["html_i18n"]


async def test_a_liquid_error_is_a_422_naming_the_field_and_the_line(env):
    cases = [
        ({"sms": {"body": "Hi {{ first_name }}\nthere\n{% if %}"}}, "content.sms.body"),
        ({"subject": "Hi", "subject_i18n": {"de": "Hallo {{ name | nope }}"}}, "content.subject_i18n.de"),
        ({"whatsapp": {"template_name": "welcome", "parameters": {"1": "{{ a }}", "2": "{% for %}"}}},
         "content.whatsapp.parameters.2"),
        ({"telegram": {"text": "*Hi* {{ first_name }}\n{% if %}"}}, "content.telegram.text"),
        ({"telegram": {"text": "*Hi*", "action_label_i18n": {"pt-BR": "{% endif %}"}}},
         "content.telegram.action_label_i18n.pt-BR"),
        ({"webhook": {"payload": {"event": "x", "items": [{"name": "{{ a"}]}}}, "content.webhook.payload.items[0].name"),
        ({"push": {"title": "t", "data": {"deep_link": "{% if %}"}}}, "content.push.data.deep_link"),
    ]
    for content, field in cases:
        error = await invalid(env, content)
        assert error["field"] == field and "line" in error["reason"], (content, error)
    assert (await invalid(env, cases[0][0]))["reason"].endswith("on line 3")
    # A PATCH is checked on the merged content, and saves nothing
    template = await a_template(env.writer)
    path = f"{TEMPLATES}/{template['id']}"
    body = await env.writer.problem("PATCH", path, 422, json={"content": {"text": "ok\n{% if %}"}})
    assert error_fields(body) == ["content.text"] and "line 2" in body["errors"][0]["reason"]
    assert await env.writer.call("GET", path, 200) == template


async def test_a_template_past_a_message_limit_is_a_422(env):
    loop = "{% for i in (1..6000) %}x{% endfor %}"
    error = await invalid(env, {"subject": "{% for i in (1..20000) %}x{% endfor %}"})
    assert error["field"] == "content.subject" and "loop iterations" in error["reason"]
    # Each of subject and text is within the limit, but one message renders both
    error = await invalid(env, {"subject": loop, "text_i18n": {"de": loop}})
    assert error["field"] == "content.text_i18n.de" and "other fields" in error["reason"]


async def test_locale_keys_are_tags_and_at_most_twenty(env):
    ok = await a_template(env.writer, content={"subject": "Hi", "subject_i18n": {"de": "Hallo", "pt-BR": "Olá",
                                                                                 "zh-Hant-TW": "你好", "gsw": "Hoi"}})
    assert set(ok["content"]["subject_i18n"]) == {"de", "pt-BR", "zh-Hant-TW", "gsw"}
    for key in ("pt_BR", "d", "english", "de-", "de-A", "12", "de-AT-abcdefghi"):
        error = await invalid(env, {"subject": "Hi", "subject_i18n": {key: "x"}})
        assert error["field"] == f"content.subject_i18n.{key}", (key, error)
    error = await invalid(env, {"sms": {"body": "x", "body_i18n": {"de": "a", "DE": "b"}}})
    assert error["field"] == "content.sms.body_i18n.DE"
    many = {f"l{chr(97 + i // 26)}{chr(97 + i % 26)}": "x" for i in range(21)}
    assert (await invalid(env, {"subject": "Hi", "subject_i18n": many}))["field"] == "content.subject_i18n"


async def test_the_other_checks_name_their_field(env):
    deep: dict[str, Any] = {"leaf": "{{ x }}"}
    for _ in range(10):
        deep = {"a": deep}
    cases = [
        ({"telegram": {"text": "x", "media_url": "https://cdn.example.com/a.png"}}, "content.telegram.media_type"),
        ({"telegram": {"text": "x", "media_type": "photo"}}, "content.telegram.media_url"),
        ({"subject": "Hi", "action_url": "javascript:alert(1)"}, "content.action_url"),
        ({"push": {"title": "t", "url": "ftp://example.com/x"}}, "content.push.url"),
        ({"subject": "Hi", "from_email": "not an address"}, "content.from_email"),
        ({"subject": "Hi", "reply_to": "Ann <ann@>"}, "content.reply_to"),
        ({"whatsapp": {"template_name": "Welcome"}}, "content.whatsapp.template_name"),
        ({"whatsapp": {"template_name": "w", "parameters": {"a-b": "x"}}}, "content.whatsapp.parameters.a-b"),
        ({"whatsapp": {"template_name": "w", "parameters": {str(i): "x" for i in range(21)}}},
         "content.whatsapp.parameters"),
        ({"webhook": {"payload": deep}}, "content.webhook.payload" + ".a" * 10),
        ({"webhook": {"payload": {"a": "x" * 70_000}}}, "content.webhook.payload"),
        ({"webhook": {"payload": {"a\u0000": 1}}}, "content.webhook.payload.a\\u0000"),
        ({"sms": {"body": "x" * 1601}}, "content.sms.body"),
        ({"subject": "a\nb"}, "content.subject"),
        ({"html": "x" * 500_000, "html_i18n": {"de": "y" * 500_000}}, "content"),
    ]
    for content, field in cases:
        assert (await invalid(env, content))["field"] == field, content
    # URLs may be Liquid, or hold it
    ok = {"subject": "Hi", "action_url": "{{ link }}", "push": {"title": "t", "url": "https://x.example/{{ id }}"},
          "telegram": {"text": "x", "media_url": "https://cdn.example.com/a.mp4", "media_type": "video"}}
    assert (await a_template(env.writer, content=ok))["content"] == ok


async def test_sms_segments_are_shown(env):
    gsm = await a_template(env.writer, "gsm", {"sms": {"body": "a" * 161}})
    assert gsm["sms_segments"] == {"encoding": "GSM-7", "characters": 161, "segments": 2}
    one = await a_template(env.writer, "one", {"sms": {"body": "a" * 160}})
    assert one["sms_segments"] == {"encoding": "GSM-7", "characters": 160, "segments": 1}
    emoji = await a_template(env.writer, "emoji", {"sms": {"body": "Party time 🎉"}})
    assert emoji["sms_segments"]["encoding"] == "UCS-2" and emoji["sms_segments"]["segments"] == 1
    long_emoji = await a_template(env.writer, "long", {"sms": {"body": "🎉" + "a" * 70}})
    assert long_emoji["sms_segments"] == {"encoding": "UCS-2", "characters": 71, "segments": 2}
    assert (await env.writer.call("GET", f"{TEMPLATES}/{gsm['id']}", 200))["sms_segments"]["segments"] == 2


def test_merge_content_replaces_what_is_given_and_removes_what_is_null():
    current = kernel.Content(subject="a", from_email="x@example.com", sms=kernel.SmsPart(body="s"),
                             subject_i18n={"de": "b"})
    patch = msgspec.convert({"sms": None, "from_email": None, "text": "t"}, schemas.ContentPatch)
    assert schemas.merge_content(current, patch) == kernel.Content(subject="a", text="t", subject_i18n={"de": "b"})


async def test_the_stored_and_the_sent_html_are_both_shown(env):
    # Given an email with a style block, a preheader and a button, without a text part
    created = await a_template(env.writer, content={
        "subject": "Hi", "preheader": "Spring is here", "action_label": "Shop", "action_url": "https://shop.example.com",
        "html": "<style>p { color: red }</style><p>Hello {{ first_name }}</p>"})
    # Then the stored HTML is the author's (repaired), and the HTML as sent is a document with the CSS
    # inlined, the preheader hidden at its top and the button; the text part is derived from it
    assert created["content"]["html"] == "<style>p { color: red }</style><p>Hello {{ first_name }}</p>"
    sent = created["email_as_sent"]
    assert sent["html"].lower().startswith("<!doctype html>")
    assert 'style="color: red' in sent["html"] and "Spring is here" in sent["html"]
    assert 'href="https://shop.example.com"' in sent["html"]
    assert sent["text"] == "Hello {{ first_name }}\n\nShop (https://shop.example.com)"
    # An SMS-only template has no email to show
    assert (await a_template(env.writer, "texts", content={"sms": {"body": "Hi"}}))["email_as_sent"] is None
