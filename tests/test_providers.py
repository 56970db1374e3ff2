"""Providers: the /v1/providers API (validation, secrets, tenancy, scopes) and the SMTP and null providers
against a real SMTP peer on loopback."""
from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api_service.app import create_app
from shared.channels import accounts
from shared.channels.provider import (
    WITHDRAWN,
    CommitFailed,
    EmailContent,
    OutgoingMessage,
    ProviderUnavailable,
)
from shared.channels.registry import build_provider
from shared.channels.smtp import message_id_of
from shared.platform import db
from shared.tenants import store as tenants
from tests.smtp_peer import SmtpPeer, smtp_peer  # noqa: F401  (the fixture)

SMTP_BODY = {
    "name": "mailer", "channel": "email", "kind": "smtp", "host": "smtp.example.com", "port": 2525,
    "username": "mailer", "password": "hunter2-secret", "from_email": "News <news@example.com>",
}
NULL_BODY = {"name": "void", "channel": "email", "kind": "null", "from_email": "news@example.com"}


class Client:
    def __init__(self, http: AsyncTestClient, token: str) -> None:
        self.http, self.headers = http, {"Authorization": f"Bearer {token}"}

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        return await self.http.request(method, path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    async def create(self, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
        r = await self.request("POST", "/v1/providers", json=body)
        assert r.status_code == status, r.text
        return r.json()


class Env(msgspec.Struct):
    http: AsyncTestClient
    writer: Client
    reader: Client
    stranger: Client  # a writer of another tenant
    tenant_id: uuid.UUID
    database_url: str


@asynccontextmanager
async def env_for(settings) -> AsyncIterator[Env]:
    settings = msgspec.structs.replace(settings, run_background=False)
    con = await db.connect(settings.database_url)
    one = await tenants.create_tenant(con, "one")
    two = await tenants.create_tenant(con, "two")
    write = (await tenants.create_token(con, one.id, "write")).token
    read = (await tenants.create_token(con, one.id, "read")).token
    other = (await tenants.create_token(con, two.id, "write")).token
    await con.close()
    async with AsyncTestClient(app=create_app(settings)) as http:
        yield Env(http, Client(http, write), Client(http, read), Client(http, other), one.id, settings.database_url)


@pytest.fixture
async def env(settings):
    """The API as the tests run it: private networks allowed (the SMTP peers are on 127.0.0.1)."""
    async with env_for(settings) as e:
        yield e


@pytest.fixture
async def strict_env(settings):
    """The API of an installation as deployed by default: private networks not allowed."""
    async with env_for(msgspec.structs.replace(settings, allow_private_networks=False)) as e:
        yield e


async def stored_row(env: Env, provider_id: str) -> dict[str, Any]:
    con = await db.connect(env.database_url)
    try:
        return dict(await con.fetchrow("SELECT * FROM providers WHERE id = $1", uuid.UUID(provider_id)))
    finally:
        await con.close()


# -- the API --------------------------------------------------------------------------------------


async def test_create_smtp_provider_keeps_the_password_but_never_returns_it(env):
    created = await env.writer.create(SMTP_BODY)
    assert created["kind"] == "smtp" and created["channel"] == "email"
    assert created["host"] == "smtp.example.com" and created["port"] == 2525 and created["username"] == "mailer"
    assert created["password_set"] is True and created["starttls"] is True and created["implicit_tls"] is False
    assert (created["batch_size"], created["batch_delay_ms"], created["max_retries"]) == (50, 5000, 3)
    pid = created["id"]
    for r in (
        await env.writer.request("GET", f"/v1/providers/{pid}"),
        await env.writer.request("GET", "/v1/providers"),
        await env.reader.request("GET", f"/v1/providers/{pid}"),
        await env.writer.request("PATCH", f"/v1/providers/{pid}", json={"name": "renamed"}),
    ):
        assert r.status_code == 200, r.text
        assert "hunter2" not in r.text and '"password"' not in r.text
    row = await stored_row(env, pid)  # stored sealed (tests/test_secrets.py): the password is in no column
    assert "hunter2" not in repr(row) and set(row["config"]["password"]) == {"$sealed"}
    assert row["tenant_id"] == env.tenant_id
    con = await db.connect(env.database_url)
    loaded = await accounts.get(con, env.tenant_id, uuid.UUID(pid))
    await con.close()
    assert loaded is not None and loaded.kind == "smtp" and loaded.config["password"] == "hunter2-secret"


async def test_create_null_provider_with_defaults_and_pacing(env):
    created = await env.writer.create({"name": "bench", "kind": "null", "batch_size": 500, "batch_delay_ms": 0,
                                       "max_retries": 0})
    assert created["kind"] == "null" and created["channel"] == "email" and created["from_email"] is None
    assert (created["batch_size"], created["batch_delay_ms"], created["max_retries"]) == (500, 0, 0)
    assert "host" not in created


async def test_smtp_defaults_follow_the_tls_mode(env):
    plain = await env.writer.create(
        {"name": "a", "kind": "smtp", "host": "mx.example.com", "from_email": "a@example.com"}
    )
    assert (plain["port"], plain["starttls"], plain["password_set"], plain["username"]) == (587, True, False, None)
    tls = await env.writer.create({"name": "b", "kind": "smtp", "host": "mx.example.com", "implicit_tls": True,
                                   "from_email": "a@example.com"})
    assert (tls["port"], tls["starttls"], tls["implicit_tls"]) == (465, False, True)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"host": None}, "host"),
        ({"from_email": None}, "from_email"),
        ({"from_email": "not-an-address"}, "from_email"),
        ({"from_email": "News <nobody@localhost>"}, "from_email"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 10001}, "batch_size"),
        ({"batch_delay_ms": -1}, "batch_delay_ms"),
        ({"max_retries": 11}, "max_retries"),
        ({"name": ""}, "name"),
        ({"channel": "sms"}, "channel"),
        ({"kind": "carrier-pigeon"}, "kind"),
        ({"api_key": "x"}, "api_key"),
        ({"password_set": True}, "password_set"),
        ({"id": str(uuid.uuid4())}, "id"),
        ({"username": None}, "username"),  # a password without a username
        ({"password": None}, "password"),  # a username without a password
        ({"implicit_tls": True, "starttls": True}, "starttls"),
        ({"host": "smtp.example.com/evil path"}, "host"),
    ],
)
async def test_invalid_smtp_provider_is_422_naming_the_field(env, change, field):
    body = {k: v for k, v in {**SMTP_BODY, **change}.items() if v is not None}
    r = await env.writer.request("POST", "/v1/providers", json=body)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert problem["code"] == "validation_error"
    assert field in problem["detail"], problem


@pytest.mark.parametrize(("change", "field"), [({"host": "mx.example.com"}, "host"), ({"password": "x"}, "password")])
async def test_a_setting_of_another_kind_is_an_unknown_field(env, change, field):
    r = await env.writer.request("POST", "/v1/providers", json={**NULL_BODY, **change})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == field


async def test_missing_kind_is_422(env):
    r = await env.writer.request("POST", "/v1/providers", json={"name": "x", "host": "mx.example.com"})
    assert r.status_code == 422 and "kind" in r.json()["detail"], r.text


async def test_patch_merges_settings_and_keeps_secrets(env):
    pid = (await env.writer.create(SMTP_BODY))["id"]
    r = await env.writer.request("PATCH", f"/v1/providers/{pid}", json={"port": 587, "password": "new-secret",
                                                                        "batch_size": 200})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["host"], got["port"], got["batch_size"], got["password_set"]) == ("smtp.example.com", 587, 200, True)
    assert got["updated_at"] >= got["created_at"]
    row = await stored_row(env, pid)
    assert "new-secret" not in repr(row) and row["config"]["username"] == "mailer"
    con = await db.connect(env.database_url)
    loaded = await accounts.get(con, env.tenant_id, uuid.UUID(pid))
    await con.close()
    assert loaded is not None and loaded.config["password"] == "new-secret"
    r = await env.writer.request("PATCH", f"/v1/providers/{pid}", json={"username": None, "password": None})
    assert r.status_code == 200 and r.json()["password_set"] is False and r.json()["username"] is None
    assert (await env.writer.request("PATCH", f"/v1/providers/{pid}", json={})).status_code == 200


@pytest.mark.parametrize(
    ("patch", "field", "status"),
    [
        ({"kind": "null"}, "kind", 422),
        ({"channel": "sms"}, "channel", 422),
        ({"password": None}, "password", 422),  # the username stays: it needs a password
        ({"port": 0}, "port", 422),
        ({"from_email": "nope"}, "from_email", 422),
        ({"from_email": None}, "from_email", 422),  # required for smtp
        ({"secret_sauce": 1}, "secret_sauce", 422),
        ({"implicit_tls": True, "starttls": True}, "starttls", 422),
    ],
)
async def test_invalid_patch_is_422_and_changes_nothing(env, patch, field, status):
    pid = (await env.writer.create(SMTP_BODY))["id"]
    before = await stored_row(env, pid)
    r = await env.writer.request("PATCH", f"/v1/providers/{pid}", json=patch)
    assert r.status_code == status, r.text
    assert field in r.json()["detail"], r.json()
    assert await stored_row(env, pid) == before


async def test_patch_of_a_null_provider_rejects_smtp_settings(env):
    pid = (await env.writer.create(NULL_BODY))["id"]
    r = await env.writer.request("PATCH", f"/v1/providers/{pid}", json={"host": "mx.example.com"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "host", r.text
    r = await env.writer.request("PATCH", f"/v1/providers/{pid}", json={"kind": "null", "from_email": None})
    assert r.status_code == 200 and r.json()["from_email"] is None, r.text


async def test_delete_is_soft_and_the_provider_is_gone_from_the_api(env):
    pid = (await env.writer.create(NULL_BODY))["id"]
    assert (await env.writer.request("DELETE", f"/v1/providers/{pid}")).status_code == 204
    for method, kw in (("GET", {}), ("PATCH", {"json": {"name": "x"}}), ("DELETE", {})):
        r = await env.writer.request(method, f"/v1/providers/{pid}", **kw)
        assert r.status_code == 404 and r.json()["code"] == "not_found", (method, r.text)
    assert (await env.writer.request("GET", "/v1/providers")).json()["total"] == 0
    assert (await stored_row(env, pid))["deleted"] is True
    con = await db.connect(env.database_url)
    assert await accounts.get(con, env.tenant_id, uuid.UUID(pid)) is None
    await con.close()


async def test_delete_while_a_broadcast_sends_through_it_is_409(env):
    pid = (await env.writer.create(NULL_BODY))["id"]
    broadcast_id = uuid.uuid4()
    con = await db.connect(env.database_url)
    await con.execute(
        """INSERT INTO broadcasts (id, tenant_id, name, channel, status, provider_id, content, version,
                                   created_at, updated_at)
           VALUES ($1, $2, 'b', 'email', 'sending', $3, '{}'::jsonb, 1, now(), now())""",
        broadcast_id, env.tenant_id, uuid.UUID(pid),
    )
    r = await env.writer.request("DELETE", f"/v1/providers/{pid}")
    assert r.status_code == 409 and r.json()["broadcasts"] == [str(broadcast_id)], r.text
    await con.execute("UPDATE broadcasts SET status = 'completed' WHERE id = $1", broadcast_id)
    await con.close()
    assert (await env.writer.request("DELETE", f"/v1/providers/{pid}")).status_code == 204


async def test_another_tenants_provider_is_404(env):
    pid = (await env.writer.create(SMTP_BODY))["id"]
    for method, kw in (("GET", {}), ("PATCH", {"json": {"name": "mine"}}), ("DELETE", {})):
        r = await env.stranger.request(method, f"/v1/providers/{pid}", **kw)
        assert r.status_code == 404, (method, r.text)
    assert (await env.stranger.request("GET", "/v1/providers")).json()["total"] == 0
    assert (await env.writer.request("GET", f"/v1/providers/{pid}")).json()["name"] == "mailer"


async def test_a_read_token_can_look_but_not_change(env):
    pid = (await env.writer.create(NULL_BODY))["id"]
    assert (await env.reader.request("GET", "/v1/providers")).status_code == 200
    assert (await env.reader.request("GET", f"/v1/providers/{pid}")).status_code == 200
    for method, path, kw in (
        ("POST", "/v1/providers", {"json": NULL_BODY}),
        ("PATCH", f"/v1/providers/{pid}", {"json": {"name": "x"}}),
        ("DELETE", f"/v1/providers/{pid}", {}),
    ):
        r = await env.reader.request(method, path, **kw)
        assert r.status_code == 403 and r.json()["code"] == "forbidden", (method, r.text)
    assert (await env.http.get("/v1/providers")).status_code == 401


async def test_list_pages_and_filters(env):
    for i in range(3):
        await env.writer.create({**NULL_BODY, "name": f"null-{i}"})
    await env.writer.create(SMTP_BODY)
    page = (await env.writer.request("GET", "/v1/providers", params={"limit": 2, "offset": 1})).json()
    assert (page["total"], page["limit"], page["offset"], len(page["items"])) == (4, 2, 1, 2)
    smtp = (await env.writer.request("GET", "/v1/providers", params={"kind": "smtp"})).json()
    assert smtp["total"] == 1 and smtp["items"][0]["kind"] == "smtp" and smtp["items"][0]["password_set"] is True
    r = await env.writer.request("GET", "/v1/providers", params={"limit": 0})
    assert r.status_code in (400, 422)


async def test_idempotency_key_makes_a_retried_create_return_the_first_provider(env):
    headers = {"Idempotency-Key": "create-mailer-1"}
    first = await env.writer.request("POST", "/v1/providers", json=SMTP_BODY, headers=headers)
    again = await env.writer.request("POST", "/v1/providers", json=SMTP_BODY, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    other = await env.stranger.request("POST", "/v1/providers", json=SMTP_BODY, headers=headers)
    assert other.json()["id"] != first.json()["id"]
    assert (await env.writer.request("GET", "/v1/providers")).json()["total"] == 1


async def test_openapi_documents_providers(env):
    r = await env.http.get("/schema/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert {"get", "post"} <= set(paths["/v1/providers"]) and {"get", "patch", "delete"} <= set(
        paths["/v1/providers/{provider_id}"]
    )
    assert "password_set" in r.text


async def test_a_provider_created_through_the_api_sends_in_the_sender(env, smtp_peer):
    body = {"name": "peer", "kind": "smtp", **smtp_peer.provider_config()}
    pid = (await env.writer.create(body))["id"]
    con = await db.connect(env.database_url)
    row = await accounts.get(con, env.tenant_id, uuid.UUID(pid))
    await con.close()
    assert row is not None
    provider = build_provider(row.kind, row.config, allow_private_networks=True)
    await provider.open()
    [result] = await provider.send([message(1)])
    await provider.close()
    assert result.ok and smtp_peer.received_by("user1@example.com")


# -- the SMTP provider against a real peer ------------------------------------------------------


def message(i: int, to: str | None = None, **kw: Any) -> OutgoingMessage:
    """An email to user{i}; `kw` overrides fields of its content."""
    fields: dict[str, Any] = dict(
        subject=f"Hello {i} — news", html=f"<p>Hi <b>{i}</b></p>", text=f"Hi {i}", from_email="News <news@example.com>",
    )
    return OutgoingMessage(contact_id=i, to=to or f"user{i}@example.com", content=EmailContent(**{**fields, **kw}),
                           idempotency_key=f"{uuid.UUID(int=7)}:1:{i}:email")


async def send_job(peer: SmtpPeer, messages: list[OutgoingMessage], commit=None, **config: Any):
    provider = build_provider("smtp", peer.provider_config(**config), allow_private_networks=True)
    await provider.open()
    try:
        return await provider.send(messages, commit)
    finally:
        await provider.close()


async def test_smtp_commits_each_message_when_all_but_its_end_is_written_and_a_withdrawn_one_never_arrives(smtp_peer):
    seen_at_commit: list[tuple[str, int]] = []

    async def commit(m: OutgoingMessage) -> bool:
        # Then at the commit the server has the whole message but not its end: nothing received yet
        await asyncio.sleep(0.05)
        seen_at_commit.append((m.to, len(smtp_peer.received_by(m.to))))
        return m.to != "withdrawn@example.com"

    # Given three messages, the second of which the commit withdraws
    results = await send_job(smtp_peer, [message(1), message(2, "withdrawn@example.com"), message(3)], commit)
    # Then the withdrawn one never arrives (its session was dropped before the end) and the others do
    assert [(r.ok, r.failure) for r in results] == [(True, None), (False, WITHDRAWN), (True, None)]
    assert seen_at_commit == [("user1@example.com", 0), ("withdrawn@example.com", 0), ("user3@example.com", 0)]
    assert smtp_peer.received_by("withdrawn@example.com") == []
    assert len(smtp_peer.received_by("user1@example.com")) == len(smtp_peer.received_by("user3@example.com")) == 1


async def test_a_commit_that_fails_withdraws_the_message_and_ends_the_call(smtp_peer):
    async def commit(m: OutgoingMessage) -> bool:
        raise ConnectionRefusedError("postgres is away")

    with pytest.raises(CommitFailed) as raised:
        await send_job(smtp_peer, [message(1), message(2)], commit)
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    await asyncio.sleep(0.2)
    assert smtp_peer.received == []


async def test_smtp_sends_a_job_on_one_connection(smtp_peer):
    n = 25
    results = await send_job(smtp_peer, [message(i, reply_to="help@example.com", headers={"X-Campaign": "c1"})
                                         for i in range(n)])
    assert [r.contact_id for r in results] == list(range(n))
    assert all(r.ok and r.error is None for r in results)
    assert smtp_peer.connections == 1
    assert len(smtp_peer.received) == n
    got = smtp_peer.received_by("user3@example.com")
    assert len(got) == 1
    mail = got[0]
    assert mail.message_id == message_id_of(message(3).idempotency_key) == f"<{uuid.UUID(int=7)}.1.3.email@crier>"
    assert results[3].provider_message_id == mail.message_id.strip("<>")
    assert mail.subject == "Hello 3 — news"
    assert mail.mail_from == "news@example.com" and mail.rcpt_tos == ("user3@example.com",)
    assert mail.headers["from"] == "News <news@example.com>" and mail.headers["reply-to"] == "help@example.com"
    assert mail.headers["x-campaign"] == "c1" and mail.headers["content-type"].startswith("multipart/alternative")
    assert mail.text.strip() == "Hi 3"
    assert mail.html.strip() == (
        '<!doctype html><html><head><meta charset="utf-8"></head><body><p>Hi <b>3</b></p></body></html>'
    )


async def test_full_html_documents_are_not_wrapped_again_and_html_only_gets_a_text_part(smtp_peer):
    document = (
        "<!DOCTYPE html>\n<html><body><h1>Big news</h1><p>Read <a href='https://x.example'>this</a></p></body></html>"
    )
    await send_job(smtp_peer, [message(1, html=document, text=""), message(2, html="", text="only text")])
    [full] = smtp_peer.received_by("user1@example.com")
    assert full.html.strip() == document
    assert "Big news" in full.text and "Read this" in full.text and "<" not in full.text
    [plain] = smtp_peer.received_by("user2@example.com")
    assert plain.html is None and plain.text.strip() == "only text"
    assert plain.headers["content-type"].startswith("text/plain")


async def test_smtp_4xx_is_retryable_and_5xx_is_permanent(smtp_peer):
    smtp_peer.configure(fail_permanently={"gone@example.com"}, fail_transiently={"busy@example.com": 1})
    messages = [message(1), message(2, "gone@example.com"), message(3, "busy@example.com"), message(4)]
    results = await send_job(smtp_peer, messages)
    assert [(r.contact_id, r.ok, r.retryable) for r in results] == [(1, True, False), (2, False, False),
                                                                    (3, False, True), (4, True, False)]
    assert results[1].error.startswith("smtp 550") and results[2].error.startswith("smtp 451")
    assert smtp_peer.connections == 1  # a refusal does not cost the connection
    [retry] = await send_job(smtp_peer, [messages[2]])
    assert retry.ok
    assert len(smtp_peer.received_by("busy@example.com")) == 1 and smtp_peer.attempts("busy@example.com") == 2
    assert smtp_peer.received_by("gone@example.com") == []


async def test_a_connection_dropped_before_data_is_reopened_once_and_the_message_sent_once(smtp_peer):
    smtp_peer.configure(drop_connection={"flaky@example.com": 1})
    results = await send_job(smtp_peer, [message(1), message(2, "flaky@example.com"), message(3)])
    assert all(r.ok for r in results), results
    assert len(smtp_peer.received_by("flaky@example.com")) == 1
    assert smtp_peer.connections == 2

    smtp_peer.configure(drop_connection={"flaky@example.com": 2})  # dropped again after the reconnect
    results = await send_job(smtp_peer, [message(4, "flaky@example.com"), message(5)])
    assert (results[0].ok, results[0].retryable) == (False, True) and results[1].ok


async def test_a_connection_lost_during_data_is_an_unknown_outcome_not_resent(smtp_peer):
    smtp_peer.configure(drop_after_data={"lost@example.com": 1})
    results = await send_job(smtp_peer, [message(1, "lost@example.com"), message(2)])
    assert results[0].ok is False and results[0].retryable is False and "outcome unknown" in results[0].error
    assert results[1].ok
    assert smtp_peer.attempts("lost@example.com") == 1


async def test_peer_restart_between_jobs_and_within_a_session(smtp_peer):
    assert all(r.ok for r in await send_job(smtp_peer, [message(1)]))
    smtp_peer.restart()
    assert all(r.ok for r in await send_job(smtp_peer, [message(2)]))

    provider = build_provider("smtp", smtp_peer.provider_config(), allow_private_networks=True)
    await provider.open()
    assert (await provider.send([message(3)]))[0].ok
    smtp_peer.restart()  # cuts the open connection
    assert (await provider.send([message(4), message(5)]))[0].ok
    await provider.close()
    assert provider.connections == 2
    assert {r.rcpt_tos[0] for r in smtp_peer.received} == {f"user{i}@example.com" for i in range(1, 6)}


async def test_an_unreachable_server_fails_open_and_sends_retryable_failures(smtp_peer):
    smtp_peer.stop()
    provider = build_provider("smtp", smtp_peer.provider_config(timeout_s=2.0), allow_private_networks=True)
    with pytest.raises(ProviderUnavailable) as raised:
        await provider.open()
    assert raised.value.retryable
    results = await provider.send([message(1), message(2)])  # never raises
    assert [(r.ok, r.retryable) for r in results] == [(False, True), (False, True)]
    await provider.close()


async def test_a_message_that_cannot_be_built_fails_alone(smtp_peer):
    results = await send_job(smtp_peer, [message(1, subject="evil\r\nBcc: victim@example.com"), message(2)])
    assert (results[0].ok, results[0].retryable) == (False, False) and "could not be built" in results[0].error
    assert results[1].ok and len(smtp_peer.received) == 1


async def test_international_addresses_use_smtputf8_and_bad_addresses_fail_alone(smtp_peer):
    results = await send_job(smtp_peer, [message(1, "jürgen@exämple.com"), message(2, "a b <c"), message(3)])
    assert results[0].ok and results[2].ok, results
    assert (results[1].ok, results[1].retryable) == (False, False)
    assert smtp_peer.received_by("jürgen@exämple.com")[0].subject == "Hello 1 — news"


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_login_with_credentials():
    with SmtpPeer(credentials={"mailer": "s3cret"}) as peer:
        assert (await send_job(peer, [message(1)], username="mailer", password="s3cret"))[0].ok
        provider = build_provider("smtp", peer.provider_config(username="mailer", password="wrong"),
                                  allow_private_networks=True)
        with pytest.raises(ProviderUnavailable) as raised:
            await provider.open()
        assert not raised.value.retryable and "login" in str(raised.value)
        assert len(peer.received) == 1


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> ssl.SSLContext:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    folder: Path = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_starttls(self_signed):
    with SmtpPeer(tls_context=self_signed, require_starttls=True) as peer:
        assert (await send_job(peer, [message(1)], starttls=True, tls_verify=False))[0].ok
        assert peer.connections == 1
        untrusted = build_provider("smtp", peer.provider_config(starttls=True), allow_private_networks=True)
        with pytest.raises(ProviderUnavailable) as raised:
            await untrusted.open()
        assert not raised.value.retryable
    with SmtpPeer() as plain:  # STARTTLS required by the provider but not offered: never send in clear
        provider = build_provider("smtp", plain.provider_config(starttls=True), allow_private_networks=True)
        with pytest.raises(ProviderUnavailable) as raised:
            await provider.open()
        assert not raised.value.retryable and plain.received == []


# -- the null provider and the factory -------------------------------------------------------------


async def test_null_provider_accepts_everything():
    provider = build_provider("null", {"from_email": "news@example.com"})
    assert provider.dedupes is True
    messages = [message(i) for i in range(1_000)]
    await provider.open()
    results = await provider.send(messages)
    await provider.close()
    assert len(results) == len(messages) and all(r.ok for r in results)
    assert results[5].contact_id == 5 and results[5].provider_message_id == messages[5].idempotency_key


def test_factory():
    assert build_provider("smtp", {"host": "mx.example.com"}).dedupes is False
    with pytest.raises(ValueError, match="unknown provider kind"):
        build_provider("pigeon", {})


# -- hosts outside the public internet, logins in clear, and what a test tells ---------------------

MARKER = "SECRET-7f3a"  # in every reply of the scripted server below: it must never reach a tenant
SERVER_WORDS = f"{MARKER} relay.corp.internal Exim 4.96"


class ScriptedSmtp:
    """A TCP server on 127.0.0.1 speaking just enough SMTP to say the lines it is given (a
    distinctive banner, EHLO and AUTH replies); counts the connections it accepts."""

    def __init__(self, greeting: str, ehlo: str = "250 ok", auth: str = "535 5.7.8 no") -> None:
        self.replies = {"greeting": greeting, "EHLO": ehlo, "HELO": ehlo.split("\r\n")[-1], "AUTH": auth}
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]

    def __enter__(self) -> ScriptedSmtp:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.sendall(self.replies["greeting"].encode() + b"\r\n")
            for line in lines:
                verb = line[:4].decode(errors="replace").upper()
                if verb == "QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                conn.sendall(self.replies.get(verb, "250 ok").encode() + b"\r\n")


@pytest.mark.parametrize("host", ["169.254.169.254", "10.0.0.1", "localhost", "127.0.0.1", "[::1]",
                                  "::ffff:127.0.0.1", "100.64.0.1", "127.1"])
async def test_a_host_outside_the_public_internet_is_422_when_private_networks_are_not_allowed(strict_env, host):
    r = await strict_env.writer.request("POST", "/v1/providers", json={**SMTP_BODY, "host": host})
    assert r.status_code == 422, r.text
    [error] = r.json()["errors"]
    assert error["field"] == "host" and "private networks are not allowed" in r.json()["detail"], r.text
    assert (await strict_env.writer.request("GET", "/v1/providers")).json()["total"] == 0


async def test_a_patch_to_a_private_host_is_422_and_public_hosts_are_saved(strict_env):
    public = await strict_env.writer.create({**SMTP_BODY, "host": "8.8.8.8"})
    # A name that does not resolve now is saved: the check when connecting decides.
    await strict_env.writer.create({**SMTP_BODY, "host": "smtp.does-not-exist.invalid"})
    before = await stored_row(strict_env, public["id"])
    r = await strict_env.writer.request("PATCH", f"/v1/providers/{public['id']}", json={"host": "10.0.0.1"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "host", r.text
    assert await stored_row(strict_env, public["id"]) == before


async def test_a_stored_private_host_is_refused_when_connecting(strict_env):
    with ScriptedSmtp(greeting=f"220 {SERVER_WORDS}") as server:
        config = {"host": "127.0.0.1", "port": server.port, "starttls": False, "from_email": "news@example.com"}
        con = await db.connect(strict_env.database_url)  # saved before the rule, or while it was off
        row = await accounts.create(con, tenant_id=strict_env.tenant_id, name="inside", kind="smtp", config=config)
        await con.close()

        r = await strict_env.writer.request("POST", f"/v1/providers/{row.id}/test")
        assert r.status_code == 200 and r.json() == {"ok": False, "failure": "refused_private_address"}, r.text
        broadcast = await strict_env.writer.request("POST", "/v1/broadcasts", json={
            "name": "b", "provider_id": str(row.id), "content": {"subject": "Hi", "text": "Hello"}})
        assert broadcast.status_code == 201, broadcast.text
        sent = await strict_env.writer.request("POST", f"/v1/broadcasts/{broadcast.json()['id']}/test",
                                               json={"emails": ["me@example.com"]})
        assert sent.status_code == 200, sent.text
        assert sent.json()["results"] == [{"address": "me@example.com", "ok": False,
                                           "error": "refused_private_address"}]

        provider = build_provider(row.kind, row.config)  # as a sender builds it, by default
        with pytest.raises(ProviderUnavailable) as raised:
            await provider.open()
        assert (raised.value.retryable, raised.value.failure) == (False, "refused_private_address")
        [result] = await provider.send([message(1)])
        assert (result.ok, result.retryable, result.failure) == (False, False, "refused_private_address")
        await provider.close()
        await asyncio.sleep(0.1)
        assert server.connections == 0  # nothing reached the host


@pytest.mark.parametrize(
    ("script", "login", "failure"),
    [
        ({"greeting": f"554 5.3.2 {SERVER_WORDS}"}, {}, "rejected"),
        ({"greeting": f"220 {SERVER_WORDS} ESMTP", "ehlo": f"250-{SERVER_WORDS}\r\n250 AUTH PLAIN LOGIN",
          "auth": f"535 5.7.8 {SERVER_WORDS}: bad credentials"},
         {"username": "mailer", "password": "s3cret", "allow_insecure_auth": True}, "auth_failed"),
    ],
)
async def test_a_test_tells_a_failure_class_never_the_servers_words(env, script, login, failure):
    with ScriptedSmtp(**script) as server:
        pid = (await env.writer.create({"name": "scripted", "kind": "smtp", "host": "127.0.0.1", "port": server.port,
                                        "starttls": False, "from_email": "news@example.com", **login}))["id"]
        r = await env.writer.request("POST", f"/v1/providers/{pid}/test")
        assert r.status_code == 200 and r.json() == {"ok": False, "failure": failure}, r.text
        broadcast = (await env.writer.request("POST", "/v1/broadcasts", json={
            "name": "b", "provider_id": pid, "content": {"subject": "Hi", "text": "Hello"}})).json()
        sent = await env.writer.request("POST", f"/v1/broadcasts/{broadcast['id']}/test",
                                        json={"emails": ["me@example.com"]})
        assert sent.status_code == 200 and sent.json()["results"][0]["error"] == failure, sent.text
        assert server.connections == 2
    for text in (r.text, sent.text):
        assert MARKER not in text and "corp.internal" not in text and "Exim" not in text


async def test_a_test_send_names_a_refused_recipient_by_class(env, smtp_peer):
    smtp_peer.configure(fail_permanently={"gone@example.com"}, fail_transiently={"busy@example.com": 5})
    pid = (await env.writer.create({"name": "peer", "kind": "smtp", **smtp_peer.provider_config()}))["id"]
    broadcast = (await env.writer.request("POST", "/v1/broadcasts", json={
        "name": "b", "provider_id": pid, "content": {"subject": "Hi", "text": "Hello"}})).json()
    sent = await env.writer.request("POST", f"/v1/broadcasts/{broadcast['id']}/test",
                                    json={"emails": ["gone@example.com", "busy@example.com", "me@example.com"]})
    assert sent.status_code == 200, sent.text
    assert {r["address"]: r["error"] for r in sent.json()["results"]} == {
        "gone@example.com": "rejected", "busy@example.com": "deferred", "me@example.com": None}
    assert "mailbox unavailable" not in sent.text and "try again" not in sent.text


async def test_the_provider_test_logs_in_and_sends_nothing(env, smtp_peer):
    pid = (await env.writer.create({"name": "peer", "kind": "smtp", **smtp_peer.provider_config()}))["id"]
    r = await env.writer.request("POST", f"/v1/providers/{pid}/test")
    assert r.status_code == 200 and r.json() == {"ok": True, "failure": None}, r.text
    assert smtp_peer.connections == 1 and smtp_peer.received == []
    assert (await env.reader.request("POST", f"/v1/providers/{pid}/test")).status_code == 403
    assert (await env.stranger.request("POST", f"/v1/providers/{pid}/test")).status_code == 404


async def test_a_login_without_tls_is_422_unless_said_to_be_in_clear(env):
    r = await env.writer.request("POST", "/v1/providers", json={**SMTP_BODY, "starttls": False})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "starttls" and "allow_insecure_auth" in r.json()["detail"]
    said = await env.writer.create({**SMTP_BODY, "starttls": False, "allow_insecure_auth": True})
    assert (said["starttls"], said["allow_insecure_auth"], said["password_set"]) == (False, True, True)
    assert (await env.writer.create({**SMTP_BODY, "implicit_tls": True}))["allow_insecure_auth"] is False
    no_login = {k: v for k, v in SMTP_BODY.items() if k not in ("username", "password")}
    assert (await env.writer.create({**no_login, "starttls": False}))["starttls"] is False

    pid = (await env.writer.create(SMTP_BODY))["id"]  # STARTTLS by default
    r = await env.writer.request("PATCH", f"/v1/providers/{pid}", json={"starttls": False})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "starttls", r.text
    r = await env.writer.request("PATCH", f"/v1/providers/{pid}", json={"starttls": False, "allow_insecure_auth": True})
    assert r.status_code == 200 and r.json()["allow_insecure_auth"] is True, r.text
    schema = (await env.http.get("/schema/openapi.json")).text
    assert "allow_insecure_auth" in schema and "sent in clear" in schema


async def test_tls_checks_the_host_name_while_connecting_to_the_checked_address(self_signed):
    names: list[str | None] = []
    self_signed.sni_callback = lambda sock, name, context: names.append(name)
    try:
        with SmtpPeer(tls_context=self_signed, require_starttls=True) as peer:  # listens on 127.0.0.1
            config = peer.provider_config(host="localhost", starttls=True)
            assert (await send_job_to(config, [message(1)], tls_verify=False))[0].ok
            assert names == ["localhost"]  # SNI: the name, though the socket went to 127.0.0.1
            verified = build_provider("smtp", config, allow_private_networks=True)  # the self-signed cert
            with pytest.raises(ProviderUnavailable) as raised:
                await verified.open()
            assert (raised.value.retryable, raised.value.failure) == (False, "tls_failed")
    finally:
        self_signed.sni_callback = None


async def send_job_to(config: dict[str, Any], messages: list[OutgoingMessage], **overrides: Any):
    provider = build_provider("smtp", {**config, **overrides}, allow_private_networks=True)
    await provider.open()
    try:
        return await provider.send(messages)
    finally:
        await provider.close()
