"""Test fixtures: one embedded Postgres and nats-server per session (or CRIER_TEST_* servers),
a fresh database cloned from a migrated template per test, and per-test JetStream names."""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import pytest
from cryptography.fernet import Fernet

from shared.platform import secrets
from shared.platform.db import migrate
from shared.platform.logging import configure_logging
from shared.platform.settings import Settings
from shared.tooling.embedded import start_nats, start_postgres

configure_logging("console", os.environ.get("CRIER_TEST_LOG_LEVEL", "warning"))

# One key seals provider secrets for the whole session. It is in the environment too: the senders
# tests start as processes (tests/stack.py, tests/test_faults.py) inherit it and open what the
# in-process API sealed.
TEST_SECRET_KEY = Fernet.generate_key().decode()
os.environ["CRIER_SECRET_KEY"] = TEST_SECRET_KEY


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


class Infra:
    def __init__(self, admin_url: str, nats_url: str, template: str) -> None:
        self.admin_url, self.nats_url, self.template = admin_url, nats_url, template


@pytest.fixture(scope="session")
def infra():
    root = Path(tempfile.mkdtemp(prefix="crier-test-"))
    stops = []
    admin_url = os.environ.get("CRIER_TEST_DATABASE_URL")
    nats_url = os.environ.get("CRIER_TEST_NATS_URL")
    if not admin_url:
        pg = start_postgres(root / "pg", fsync=False)
        stops.append(pg.stop)
        admin_url = pg.url
    if not nats_url:
        ns = start_nats(root / "nats", log_file=root / "nats.log")
        stops.append(ns.stop)
        nats_url = ns.url
    template = f"crier_tpl_{uuid.uuid4().hex[:8]}"

    async def make_template() -> None:
        con = await asyncpg.connect(admin_url)
        await con.execute(f'CREATE DATABASE "{template}"')
        await con.close()
        await migrate(_with_database(admin_url, template))

    asyncio.run(make_template())
    try:
        yield Infra(admin_url, nats_url, template)
    finally:
        async def drop_template() -> None:
            con = await asyncpg.connect(admin_url)
            await con.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
            await con.close()

        try:
            asyncio.run(drop_template())
        except Exception:
            pass
        for stop in reversed(stops):
            stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def db_url(infra):
    """A database of this test's own, already migrated."""
    name = f"crier_t_{uuid.uuid4().hex[:12]}"
    con = await asyncpg.connect(infra.admin_url)
    await con.execute(f'CREATE DATABASE "{name}" TEMPLATE "{infra.template}"')
    await con.close()
    yield _with_database(infra.admin_url, name)
    con = await asyncpg.connect(infra.admin_url)
    await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await con.close()


@pytest.fixture
async def nats_prefix(infra):
    """A JetStream name prefix of this test's own; its streams are deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield prefix
    nc = await nats.connect(infra.nats_url)
    js = nc.jetstream()
    for name in await js.streams_info():
        if name.config.name.startswith(prefix):
            await js.delete_stream(name.config.name)
    await nc.close()


@pytest.fixture
def settings(infra, db_url, nats_prefix) -> Settings:
    settings = Settings(
        database_url=db_url,
        nats_url=infra.nats_url,
        nats_prefix=nats_prefix,
        poll_interval_s=0.2,
        log_level="warning",
        # The suite makes many requests quickly from one token and one address: limits far above
        # it (tests/test_rate_limits.py sets its own small ones)
        rate_limit_per_s=100_000.0, rate_limit_burst=100_000,
        tenant_rate_limit_per_s=100_000.0, tenant_rate_limit_burst=100_000,
        auth_failures_per_minute=10_000,
        allow_private_networks=True,  # the SMTP peers listen on 127.0.0.1
        secret_key=TEST_SECRET_KEY,
    )
    # What `crier api` / `crier sender` do at start; create_app and run_sender in a test use this box.
    secrets.install(secrets.SecretBox.from_settings(settings))
    return settings
