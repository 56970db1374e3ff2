"""Provider secrets sealed at rest (shared/platform/secrets.py, shared/channels/accounts.py): stored
sealed, used plain, legacy plaintext rows, key rotation with `crier secrets seal`, a key that opens
nothing, no key at all, and the key `crier dev` keeps."""
from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from sender_service.job_context import JobContextLoader
from shared.channels import accounts
from shared.channels.registry import build_provider
from shared.platform import db, secrets
from shared.platform.logging import configure_logging
from shared.platform.secrets import SecretBox, SecretKeyMissing
from shared.platform.settings import Settings, load_settings
from shared.sending.jobs import Job
from shared.tenants import store as tenants
from shared.tooling.cli import main
from shared.tooling.devstack import dev_secret_key
from tests.smtp_peer import SmtpPeer
from tests.tenant_env import tenant_env

PASSWORD = "correct-horse-battery-staple"
TWILIO_TOKEN = "tw-secret-token-0042"
REPO = Path(__file__).resolve().parent.parent
KEY_A, KEY_B, KEY_C = (Fernet.generate_key().decode() for _ in range(3))


@pytest.fixture(autouse=True)
def restore_box():
    """Tests here install boxes of their own, and `main` configures logging: both as they were after."""
    previous = secrets.install(None)
    secrets.install(previous)
    yield
    secrets.install(previous)
    configure_logging("console", os.environ.get("CRIER_TEST_LOG_LEVEL", "warning"))


async def raw_row(database_url: str, provider_id: uuid.UUID) -> tuple[str, dict[str, Any]]:
    """The whole stored row as JSON text (every column), and its config."""
    con = await db.connect(database_url)
    try:
        text = await con.fetchval("SELECT row_to_json(p)::text FROM providers p WHERE id = $1", provider_id)
        config = await con.fetchval("SELECT config FROM providers WHERE id = $1", provider_id)
    finally:
        await con.close()
    return text, config


def smtp_config(**overrides: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": 2525, "username": "mailer", "password": PASSWORD, "starttls": False,
            "allow_insecure_auth": True, "from_email": "news@example.com", **overrides}


def twilio_config() -> dict[str, Any]:
    return {"account_sid": "AC" + "0" * 32, "auth_token": TWILIO_TOKEN, "api_key_sid": None, "api_key_secret": None,
            "from_number": "+14155550100", "base_url": "https://api.twilio.com"}


async def seed(database_url: str, box: SecretBox) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """A tenant with an SMTP and a Twilio provider, sealed with `box`."""
    con = await db.connect(database_url)
    try:
        tenant = await tenants.create_tenant(con, "one")
        smtp = await accounts.create(con, tenant_id=tenant.id, name="mail", kind="smtp", config=smtp_config(), box=box)
        sms = await accounts.create(con, tenant_id=tenant.id, name="sms", kind="twilio", channel="sms",
                                    config=twilio_config(), box=box)
    finally:
        await con.close()
    return tenant.id, smtp.id, sms.id


async def read(database_url: str, tenant_id: uuid.UUID, provider_id: uuid.UUID, box: SecretBox) -> dict[str, Any]:
    con = await db.connect(database_url)
    try:
        row = await accounts.get(con, tenant_id, provider_id, box=box)
    finally:
        await con.close()
    assert row is not None
    return row.config


async def seal_command(database_url: str, key: str) -> tuple[str, str, int]:
    """`crier secrets seal` run as an operator runs it, with CRIER_SECRET_KEY=key: (stdout, stderr, status)."""
    env = {**os.environ, "CRIER_DATABASE_URL": database_url, "CRIER_SECRET_KEY": key, "CRIER_LOG_LEVEL": "warning"}
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "shared.tooling.cli", "secrets", "seal"],
                                   env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr, done.returncode


# -- stored sealed, used plain ---------------------------------------------------------------------


async def test_a_provider_created_through_the_api_is_stored_sealed_and_sends_with_the_plain_password(settings):
    with SmtpPeer(credentials={"mailer": PASSWORD}) as peer:
        async with tenant_env(settings) as env:
            body = {"name": "mailer", "kind": "smtp", **smtp_config(port=peer.port)}
            created = await env.writer.call("POST", "/v1/providers", 201, json=body)
            pid = uuid.UUID(created["id"])
            # Stored sealed: the password is in no column, the config holds a token
            text, config = await raw_row(settings.database_url, pid)
            assert PASSWORD not in text
            assert set(config["password"]) == {"$sealed"} and config["username"] == "mailer"
            # Never returned
            for path in (f"/v1/providers/{pid}", "/v1/providers"):
                got = await env.writer.http.get(path, headers=env.writer.headers)
                assert got.status_code == 200 and PASSWORD not in got.text and "$sealed" not in got.text
            # Used plain: the peer requires exactly this password, and the test login passes
            assert await env.writer.call("POST", f"/v1/providers/{pid}/test", 200) == {"ok": True, "failure": None}
            # The sender's own loading: the provider it builds has the plain password
            job = Job(tenant_id=env.tenant_id, broadcast_id=uuid.uuid4(), run=1, seq=0, channel="email", provider_id=pid)
            con = await db.connect(settings.database_url)
            try:
                row = await JobContextLoader(allow_private_networks=True)._provider(con, job.tenant_id, job.provider_id)
            finally:
                await con.close()
            assert row is not None and row.config["password"] == PASSWORD
            assert build_provider(row.kind, row.config, allow_private_networks=True).config.password == PASSWORD
            # A PATCH seals the new password (and the merge saw the old one plain)
            await env.writer.call("PATCH", f"/v1/providers/{pid}", 200, json={"password": "a-new-one-77"})
            text, config = await raw_row(settings.database_url, pid)
            assert "a-new-one-77" not in text and set(config["password"]) == {"$sealed"}
            assert (await read(settings.database_url, env.tenant_id, pid, secrets.process_box()))["password"] == \
                "a-new-one-77"


async def test_a_secret_that_is_not_a_string_comes_back_as_it_was(settings):
    headers = {"Authorization": "Bearer hook-credential-9", "X-Api-Key": "k-77"}
    con = await db.connect(settings.database_url)
    try:
        tenant = await tenants.create_tenant(con, "one")
        row = await accounts.create(con, tenant_id=tenant.id, name="hook", kind="webhook", channel="webhook",
                                    config={"url": "https://hooks.example.com/in", "secret": "whsec_abc",
                                            "headers": headers})
        text = await con.fetchval("SELECT config::text FROM providers WHERE id = $1", row.id)
        again = await accounts.get(con, tenant.id, row.id)
        listed, _ = await accounts.page(con, tenant.id, 10, 0)
    finally:
        await con.close()
    assert "hook-credential-9" not in text and "whsec_abc" not in text and "hooks.example.com" in text
    expected = {"url": "https://hooks.example.com/in", "secret": "whsec_abc", "headers": headers}
    assert row.config == expected and again is not None and again.config == expected
    assert listed[0].config == expected


async def test_an_input_shaped_like_a_sealed_value_is_sealed_not_opened(settings):
    """Only rows read from the table are trusted to hold tokens: a token given in a config (someone
    who read another row's) is sealed like any value, never opened for them."""
    box = secrets.process_box()
    someone_elses = box.seal('"their-password"')
    con = await db.connect(settings.database_url)
    try:
        tenant = await tenants.create_tenant(con, "one")
        row = await accounts.create(con, tenant_id=tenant.id, name="m", kind="smtp",
                                    config=smtp_config(password={"$sealed": someone_elses}))
        stored = await con.fetchval("SELECT config FROM providers WHERE id = $1", row.id)
        again = await accounts.get(con, tenant.id, row.id)
    finally:
        await con.close()
    assert stored["password"]["$sealed"] != someone_elses
    assert again is not None and again.config["password"] == {"$sealed": someone_elses}


# -- legacy plaintext rows -------------------------------------------------------------------------


async def test_a_plaintext_row_from_before_sealing_works_and_the_command_seals_it(settings):
    con = await db.connect(settings.database_url)
    try:
        tenant = await tenants.create_tenant(con, "one")
        pid = uuid.uuid4()
        await con.execute("INSERT INTO providers (id, tenant_id, name, channel, kind, config) "
                          "VALUES ($1, $2, 'old', 'email', 'smtp', $3)", pid, tenant.id, smtp_config())
    finally:
        await con.close()
    box = secrets.process_box()
    assert (await read(settings.database_url, tenant.id, pid, box))["password"] == PASSWORD
    # When `crier secrets seal` runs
    out, err, code = await seal_command(settings.database_url, settings.secret_key)
    assert code == 0 and "sealed 1 value(s) stored in clear" in out, (out, err)
    text, config = await raw_row(settings.database_url, pid)
    assert PASSWORD not in text and set(config["password"]) == {"$sealed"}
    assert (await read(settings.database_url, tenant.id, pid, box))["password"] == PASSWORD
    # Run again, nothing is left to do
    out, _, code = await seal_command(settings.database_url, settings.secret_key)
    assert code == 0 and "sealed 0 value(s)" in out and "re-sealed 0" in out and "1 already under it" in out


# -- rotation --------------------------------------------------------------------------------------


async def test_rotation_new_key_first_then_seal_then_the_new_key_alone(settings):
    a, b, b_then_a = SecretBox([KEY_A]), SecretBox([KEY_B]), SecretBox([KEY_B, KEY_A])
    tenant_id, smtp_id, sms_id = await seed(settings.database_url, a)
    con = await db.connect(settings.database_url)
    try:  # a deleted provider is re-sealed too: nothing may need the old key once it is dropped
        gone = await accounts.create(con, tenant_id=tenant_id, name="gone", kind="smtp", config=smtp_config(), box=a)
        await accounts.delete(con, tenant_id, gone.id)
    finally:
        await con.close()
    before = {p: (await raw_row(settings.database_url, p))[1] for p in (smtp_id, sms_id)}
    # B,A opens what A sealed
    assert (await read(settings.database_url, tenant_id, smtp_id, b_then_a))["password"] == PASSWORD
    assert (await read(settings.database_url, tenant_id, sms_id, b_then_a))["auth_token"] == TWILIO_TOKEN
    with pytest.raises(accounts.ProviderSecretsUnreadable):
        await read(settings.database_url, tenant_id, smtp_id, b)
    # `crier secrets seal` under B,A re-seals every value under B
    out, err, code = await seal_command(settings.database_url, f"{KEY_B},{KEY_A}")
    assert code == 0 and "re-sealed 3 under the first key" in out, (out, err)
    for pid in (smtp_id, sms_id):
        text, config = await raw_row(settings.database_url, pid)
        assert PASSWORD not in text and TWILIO_TOKEN not in text and config != before[pid]
    # B alone opens all; A alone no longer does
    assert (await read(settings.database_url, tenant_id, smtp_id, b))["password"] == PASSWORD
    assert (await read(settings.database_url, tenant_id, sms_id, b))["auth_token"] == TWILIO_TOKEN
    con = await db.connect(settings.database_url)
    try:
        deleted = await con.fetchval("SELECT config FROM providers WHERE id = $1", gone.id)
    finally:
        await con.close()
    assert Fernet(KEY_B).decrypt(deleted["password"]["$sealed"].encode()) == f'"{PASSWORD}"'.encode()
    with pytest.raises(accounts.ProviderSecretsUnreadable):
        await read(settings.database_url, tenant_id, sms_id, a)
    # New writes under B,A are sealed with B
    con = await db.connect(settings.database_url)
    try:
        fresh = await accounts.create(con, tenant_id=tenant_id, name="new", kind="smtp", config=smtp_config(),
                                      box=b_then_a)
    finally:
        await con.close()
    assert (await read(settings.database_url, tenant_id, fresh.id, b))["password"] == PASSWORD


# -- a key that opens nothing, no key ----------------------------------------------------------------


async def test_a_value_no_key_opens_is_a_clear_error_naming_the_provider_not_the_value(settings):
    tenant_id, smtp_id, _ = await seed(settings.database_url, SecretBox([KEY_A]))
    _, stored = await raw_row(settings.database_url, smtp_id)
    token = stored["password"]["$sealed"]
    with pytest.raises(accounts.ProviderSecretsUnreadable) as caught:
        await read(settings.database_url, tenant_id, smtp_id, SecretBox([KEY_C]))
    message = str(caught.value)
    assert str(smtp_id) in message and "password" in message and "CRIER_SECRET_KEY" in message
    assert PASSWORD not in message + repr(caught.value) and token not in message
    assert caught.value.provider_id == smtp_id and caught.value.__cause__ is None
    # The sender meets the same exception when it loads the provider for a job
    secrets.install(SecretBox([KEY_C]))
    job = Job(tenant_id=tenant_id, broadcast_id=uuid.uuid4(), run=1, seq=0, channel="email", provider_id=smtp_id)
    con = await db.connect(settings.database_url)
    try:
        with pytest.raises(accounts.ProviderSecretsUnreadable):
            await JobContextLoader()._provider(con, job.tenant_id, job.provider_id)
    finally:
        await con.close()
    # `crier secrets seal` with that key leaves such rows alone, names them, and fails
    out, err, code = await seal_command(settings.database_url, KEY_C)
    assert code == 1 and str(smtp_id) in err and PASSWORD not in err + out and token not in err + out
    assert (await raw_row(settings.database_url, smtp_id))[1] == stored


async def test_without_a_key_secrets_are_refused_unless_plaintext_is_allowed(settings):
    con = await db.connect(settings.database_url)
    try:
        tenant = await tenants.create_tenant(con, "one")
        with pytest.raises(SecretKeyMissing):
            await accounts.create(con, tenant_id=tenant.id, name="m", kind="smtp", config=smtp_config(), box=SecretBox())
        assert await con.fetchval("SELECT count(*) FROM providers") == 0
        # A provider without secrets needs no key
        await accounts.create(con, tenant_id=tenant.id, name="n", kind="null", config={}, box=SecretBox())
        clear = await accounts.create(con, tenant_id=tenant.id, name="m", kind="smtp", config=smtp_config(),
                                      box=SecretBox(allow_plaintext=True))
        assert (await con.fetchval("SELECT config FROM providers WHERE id = $1", clear.id))["password"] == PASSWORD
    finally:
        await con.close()


@pytest.mark.parametrize("command", ["api", "sender"])
def test_the_services_refuse_to_start_without_a_key(monkeypatch, command):
    monkeypatch.setenv("CRIER_LOG_LEVEL", "warning")
    monkeypatch.setenv("CRIER_DATABASE_URL", "postgresql://127.0.0.1:1/none")
    monkeypatch.setenv("CRIER_NATS_URL", "nats://127.0.0.1:1")
    monkeypatch.delenv("CRIER_SECRET_KEY", raising=False)
    monkeypatch.delenv("CRIER_ALLOW_PLAINTEXT_SECRETS", raising=False)
    with pytest.raises(SystemExit) as caught:
        main([command])
    assert "CRIER_SECRET_KEY" in str(caught.value.code) and "CRIER_ALLOW_PLAINTEXT_SECRETS" in str(caught.value.code)
    # A key that is not one is named by its position, never shown
    monkeypatch.setenv("CRIER_SECRET_KEY", f"{KEY_A},not-a-fernet-key")
    with pytest.raises(SystemExit) as caught:
        main([command])
    assert "key 2 of 2" in str(caught.value.code) and "not-a-fernet-key" not in str(caught.value.code)


def test_the_key_is_never_in_the_settings_repr():
    settings = load_settings({"CRIER_SECRET_KEY": f"{KEY_A},{KEY_B}"})
    assert settings.secret_key == f"{KEY_A},{KEY_B}"
    for shown in (repr(settings), str(settings), repr(SecretBox.from_settings(settings))):
        assert KEY_A not in shown and KEY_B not in shown
    assert "secret_key=''" in repr(Settings())  # an empty one is shown as what it is


# -- crier dev's key ----------------------------------------------------------------------------------


def test_crier_dev_makes_its_key_once_private_and_reuses_it(tmp_path):
    key_file = tmp_path / "secret-key"
    key = dev_secret_key(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    Fernet(key)  # a valid key
    inode = key_file.stat().st_ino
    assert dev_secret_key(key_file) == key and key_file.stat().st_ino == inode  # reused, not rewritten
    assert SecretBox.from_settings(load_settings({"CRIER_SECRET_KEY": key})).can_seal


async def test_the_api_answers_503_for_a_provider_no_configured_key_opens(settings):
    async with tenant_env(settings) as env:
        # Given a provider sealed under a key this deployment does not have
        con = await db.connect(settings.database_url)
        try:
            stranger = await accounts.create(con, tenant_id=env.tenant_id, name="old", kind="smtp",
                                             config=smtp_config(), box=SecretBox([KEY_A]))
        finally:
            await con.close()
        # Then reading it is a 503 that says why, not a 500, and shows no secret
        problem = await env.writer.problem("GET", f"/v1/providers/{stranger.id}", 503, "secrets_unreadable")
    assert "CRIER_SECRET_KEY" in problem["detail"] and PASSWORD not in str(problem)
