"""`crier dev`: the whole stack on one machine with nothing installed but Crier.

Starts (or reuses, under .crier/) an embedded Postgres and nats-server unless CRIER_DATABASE_URL /
CRIER_NATS_URL point elsewhere, migrates, makes a dev tenant and write token (and, unless
CRIER_SECRET_KEY is set, a key that seals provider secrets), and runs the API and one sender as
child processes until Ctrl-C (or SIGTERM, what `docker stop`, systemd and `timeout` send, or
SIGHUP, a closed terminal), then stops everything it started.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from shared.platform import db
from shared.platform.settings import Settings
from shared.tenants import store as tenants
from shared.tooling.embedded import (
    start_nats,
    start_postgres,
    stop_postgres,
    wait_for_port,
)

DEV_TENANT = uuid.UUID("00000000-0000-4000-8000-00000000de00")
# Signals that end `crier dev` the way Ctrl-C does. Python's default for SIGTERM and SIGHUP ends the
# process at once, without a `finally`: the API, the sender, Postgres and nats-server ran on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def _dev_token(database_url: str, token_file: Path) -> str:
    """The dev tenant's write token: reused from the token file while it still works."""
    await db.migrate(database_url)
    con = await db.connect(database_url)
    try:
        if token_file.exists():
            token = token_file.read_text().strip()
            if await tenants.authenticate(con, token) is not None:
                return token
        if await tenants.get_tenant(con, DEV_TENANT) is None:
            await tenants.create_tenant(con, "dev", DEV_TENANT)
        issued = await tenants.create_token(con, DEV_TENANT, "write")
    finally:
        await con.close()
    token_file.write_text(issued.token + "\n")
    token_file.chmod(0o600)
    return issued.token


def dev_secret_key(key_file: Path) -> str:
    """The key that seals the dev stack's provider secrets: made on the first start, kept beside the
    data it seals and reused on every later one (a new key would leave the stored secrets unreadable)."""
    from cryptography.fernet import Fernet

    try:
        # Created with its mode (0600) in one step: there is no moment when others may read it.
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return key_file.read_text().strip()
    with os.fdopen(fd, "w") as out:
        key = Fernet.generate_key().decode()
        out.write(key + "\n")
    return key


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the one way out: the `finally` of run_dev stops everything


def _on_stop_signals(handler: object) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)  # type: ignore[arg-type]


def run_dev(settings: Settings) -> None:
    data = settings.data_path.resolve()
    data.mkdir(parents=True, exist_ok=True)
    stops: list = []
    children: list[subprocess.Popen] = []
    env = dict(os.environ)
    _on_stop_signals(_interrupt)
    try:
        database_url = settings.database_url
        if not database_url:
            print(f"starting embedded Postgres (data in {data / 'pg'}) ...", flush=True)
            # Registered before the start: a signal while the server starts still stops it.
            stops.append(lambda: stop_postgres(data / "pg"))
            database_url = start_postgres(data / "pg").url
        nats_url = settings.nats_url
        if not nats_url:
            ns = start_nats(data / "nats", log_file=data / "nats.log")
            stops.append(ns.stop)
            nats_url = ns.url
        env.update(CRIER_DATABASE_URL=database_url, CRIER_NATS_URL=nats_url, CRIER_LOG_FORMAT=settings.log_format)
        # A local stack talks to local servers (an SMTP sink on localhost): private hosts allowed,
        # unless CRIER_ALLOW_PRIVATE_NETWORKS says otherwise.
        env.setdefault("CRIER_ALLOW_PRIVATE_NETWORKS", "true")
        if not settings.secret_key:  # the API and the sender refuse to start without one
            env["CRIER_SECRET_KEY"] = dev_secret_key(data / "secret-key")
        token = asyncio.run(_dev_token(database_url, data / "dev-token"))

        crier = [sys.executable, "-m", "shared.tooling.cli"]
        children.append(subprocess.Popen([*crier, "api"], env=env))
        children.append(subprocess.Popen([*crier, "sender"], env=env))
        wait_for_port(settings.api_port, timeout=60)
        base = f"http://{settings.api_host}:{settings.api_port}"
        print(
            "\n"
            f"  Crier is running.\n"
            f"  API:        {base}/v1\n"
            f"  API docs:   {base}/schema  (Swagger UI: {base}/schema/swagger)\n"
            f"  Token:      {token}\n"
            f"              (also in {data / 'dev-token'})\n"
            f"  Secrets:    provider secrets sealed with "
            f"{'CRIER_SECRET_KEY' if settings.secret_key else data / 'secret-key'}\n"
            f"  Postgres:   {database_url}\n"
            f"  NATS:       {nats_url}\n"
            f"  Try:        curl -H 'Authorization: Bearer {token}' {base}/v1/broadcasts\n"
            f"  Ctrl-C stops everything.\n",
            flush=True,
        )
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
        print("a child process exited; stopping", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        # A second Ctrl-C or SIGTERM must not cut the stopping short and leave servers behind.
        _on_stop_signals(signal.SIG_IGN)
        _stop_children(children)
        for stop in reversed(stops):
            stop()
    print("stopped.")


def _stop_children(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 15
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
