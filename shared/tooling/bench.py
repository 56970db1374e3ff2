"""`crier bench`: the whole pipeline on the embedded stack, measured end to end, beside the bare pipeline.

Imports N contacts through the REST API, builds a list, and sends a broadcast through the `null`
provider with two sender processes. Prints contacts imported/s, recipients/s from the `send` call
to `completed` as the progress stream announces it (then checked: every ledger row written,
counters exact), and peak memory per process. After each send, the bare pipeline
(shared.tooling.rawpipe) moves as many recipients on the same servers, and the ratio of the two
is printed: the machine's speed drifts, the ratio measured in one run does not.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

from shared.platform import db
from shared.tenants import store as tenants
from shared.tooling import import_bench, rawpipe
from shared.tooling.embedded import free_port, start_nats, start_postgres, wait_for_port

CHUNK = 10_000


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [0] is the state, [1] the parent's pid, [11:15] the CPU ticks."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """utime + stime of `pid`; with `reaped`, plus those of the children it has waited for."""
    fields = _stat_fields(pid)
    try:
        ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if reaped else 0)
    except (IndexError, ValueError):
        return 0.0
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Servers:
    """The Postgres and nats-server a bench runs on. `postgres_pid` (the postmaster) and `nats_pid`:
    set when the bench started them, so that their CPU can be told apart from any other Postgres or
    nats-server on the machine (a test suite running beside the bench)."""

    admin_url: str
    nats_url: str
    postgres_pid: int | None = None
    nats_pid: int | None = None

    def cpu(self) -> dict[str, float] | None:
        """CPU seconds used so far by the bench's own Postgres (the postmaster, its live processes and
        those it reaped) and nats-server; None unless the bench started both."""
        if self.postgres_pid is None or self.nats_pid is None:
            return None
        postgres = _cpu_seconds(self.postgres_pid, reaped=True)
        for entry in Path("/proc").iterdir():
            fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else []
            if fields and fields[1] == str(self.postgres_pid):  # a backend, a worker: the postmaster's children
                postgres += _cpu_seconds(int(entry.name))
        return {"postgres": postgres, "nats": _cpu_seconds(self.nats_pid)}


@contextlib.contextmanager
def embedded_servers() -> Iterator[Servers]:
    """The servers CRIER_DATABASE_URL and CRIER_NATS_URL name, else embedded ones in a temporary
    directory, stopped and removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="crier-bench-"))
    stops = []
    servers = Servers(os.environ.get("CRIER_DATABASE_URL", ""), os.environ.get("CRIER_NATS_URL", ""))
    try:
        if not servers.admin_url:
            pg = start_postgres(root / "pg")
            stops.append(pg.stop)
            servers.admin_url = pg.url
            with contextlib.suppress(OSError, ValueError, IndexError):
                servers.postgres_pid = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
        if not servers.nats_url:
            ns = start_nats(root / "nats")
            stops.append(ns.stop)
            servers.nats_url = ns.url
            servers.nats_pid = ns.process.pid
        yield servers
    finally:
        for stop in reversed(stops):
            stop()
        shutil.rmtree(root, ignore_errors=True)


def _cpu_by_part(procs: dict[str, subprocess.Popen], servers: Servers | None = None) -> dict[str, float]:
    """CPU seconds used so far by each Crier process, and by Postgres and nats-server: the bench's
    own servers when `servers` knows them, else every Postgres and nats-server process on the machine."""
    cpu = {name: _cpu_seconds(p.pid) for name, p in procs.items()}
    if servers is not None and (own := servers.cpu()) is not None:
        return {**cpu, **own}
    cpu["postgres"] = cpu["nats"] = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm in ("postgres", "nats-server"):
                cpu["postgres" if comm == "postgres" else "nats"] += _cpu_seconds(int(entry.name))
    return cpu


def _contacts(start: int, count: int) -> list[dict]:
    return [
        {
            "external_id": f"u{i}",
            "email": f"user{i:08d}@example.com",
            "attributes": {"first_name": f"First{i % 97}", "last_name": f"Last{i % 89}", "plan": "pro"},
            "locale": _LOCALES[i % len(_LOCALES)],
        }
        for i in range(start, start + count)
    ]


# -- the steps of a run, shared with the channel bench (shared/tooling/bench_channels.py) -------------


@dataclass
class Stack:
    """A database of its own on the bench's servers, with a tenant and a write token, and the `crier
    api` and `crier sender` processes running on it."""

    database_url: str
    con: asyncpg.Connection
    token: str
    port: int
    procs: dict[str, subprocess.Popen]

    def api(self, timeout: float = 300) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}",
                                 headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout)

    def peak_rss_mb(self) -> dict[str, int]:
        return {name: round(_peak_rss_mb(p.pid)) for name, p in self.procs.items()}


@contextlib.asynccontextmanager
async def crier_stack(admin_url: str, nats_url: str, senders: int,
                      env: dict[str, str] | None = None) -> AsyncIterator[Stack]:
    """A fresh database (migrated, a tenant, a write token) with a `crier api` and `senders` `crier
    sender` processes on it (`env` added to their environment); all stopped and the database dropped
    at the end."""
    dbname = f"crier_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await admin.close()
    database_url = admin_url.rsplit("/", 1)[0] + "/" + dbname
    await db.migrate(database_url)
    con = await db.connect(database_url)
    tenant = await tenants.create_tenant(con, "bench")
    token = (await tenants.create_token(con, tenant.id, "write")).token
    stack = Stack(database_url, con, token, free_port(), {})
    child_env = {
        **os.environ,
        "CRIER_DATABASE_URL": database_url,
        "CRIER_NATS_URL": nats_url,
        "CRIER_API_PORT": str(stack.port),
        "CRIER_NATS_PREFIX": f"b{uuid.uuid4().hex[:8]}",
        "CRIER_LOG_LEVEL": "warning",
        **(env or {}),
    }
    crier = [sys.executable, "-m", "shared.tooling.cli"]
    stack.procs["api"] = subprocess.Popen([*crier, "api"], env=child_env)
    for i in range(senders):
        stack.procs[f"sender{i + 1}"] = subprocess.Popen([*crier, "sender"], env=child_env)
    try:
        wait_for_port(stack.port, timeout=60)
        yield stack
    finally:
        for p in stack.procs.values():
            p.terminate()
        for p in stack.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        await con.close()
        admin = await asyncpg.connect(admin_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


async def import_contacts(api: httpx.AsyncClient, contacts: Callable[[int, int], list[dict]], n: int) -> float:
    """`n` contacts (`contacts(start, count)` makes them) POSTed in chunks of CHUNK, two at once; the seconds taken."""
    bodies = [json.dumps(contacts(s, min(CHUNK, n - s))).encode() for s in range(0, n, CHUNK)]
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(2)

    async def post(body: bytes) -> None:
        async with sem:
            r = await api.post("/v1/contacts", content=body, headers={"content-type": "application/json"})
            r.raise_for_status()

    await asyncio.gather(*(post(b) for b in bodies))
    return time.perf_counter() - t0


async def list_of_everyone(api: httpx.AsyncClient, con: asyncpg.Connection) -> tuple[dict, float]:
    """A list of every contact in the database, and the seconds adding its members took."""
    ids = [r["id"] for r in await con.fetch("SELECT id FROM contacts ORDER BY id")]
    lst = (await api.post("/v1/lists", json={"name": "everyone"})).json()
    t1 = time.perf_counter()
    for s in range(0, len(ids), CHUNK):
        r = await api.post(f"/v1/lists/{lst['id']}/members", json={"contact_ids": ids[s : s + CHUNK]})
        r.raise_for_status()
    return lst, time.perf_counter() - t1


async def send_and_watch(
    api: httpx.AsyncClient, stack: Stack, broadcast_id: str, *, servers: Servers | None = None,
    extra_cpu: dict[str, Callable[[], float]] | None = None,
) -> tuple[float, dict[str, float]]:
    """Sends the broadcast and follows its progress stream to the end: the seconds from the `send`
    call to the finished event, and the CPU seconds each part used meanwhile (`_cpu_by_part`, and
    `extra_cpu`: more parts, each a function giving its CPU seconds so far)."""

    def cpu_now() -> dict[str, float]:
        return {**_cpu_by_part(stack.procs, servers), **{name: f() for name, f in (extra_cpu or {}).items()}}

    await stack.con.execute("CHECKPOINT")
    cpu_before = cpu_now()
    t2 = time.perf_counter()
    r = await api.post(f"/v1/broadcasts/{broadcast_id}/send")
    r.raise_for_status()
    # Watched as a user would: the live progress stream, which ends on a finished status.
    async with api.stream("GET", f"/v1/broadcasts/{broadcast_id}/progress", timeout=None) as progress:
        async for line in progress.aiter_lines():
            if line.startswith("event: finished"):
                break
    send_s = time.perf_counter() - t2
    cpu_after = cpu_now()
    return send_s, {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 1) for k in cpu_after}


async def _one_run(
    admin_url: str, nats_url: str, n: int, senders: int, audience: str = "list", content: str = "inline",
) -> dict:
    async with crier_stack(admin_url, nats_url, senders) as stack:
        con = stack.con
        async with stack.api() as api:
            import_s = await import_contacts(api, _contacts, n)
            lst, list_s = await list_of_everyone(api, con)
            provider = (
                await api.post(
                    "/v1/providers",
                    json={"name": "null", "channel": "email", "kind": "null", "from_email": "news@example.com",
                          "batch_size": 500, "batch_delay_ms": 0, "max_retries": 0},
                )
            ).json()
            # The same people either way: every contact is in the list and on the pro plan.
            if audience == "segment":
                segment = (await api.post("/v1/segments", json={"name": "pro", "rules": _PRO})).json()
                target: dict = {"audience": {"segments": [segment["id"]]}}
            else:
                target = {"list_id": lst["id"]}
            if content == "i18n":  # a template with three locales and a preheader
                template = (await api.post("/v1/templates", json={"name": "i18n", "content": _I18N})).json()
                body: dict = {"template_id": template["id"]}
            elif content in ("links", "tracked"):  # three links; `tracked`: their clicks and opens tracked
                body = {"content": {"subject": "Hello {{ first_name }}", "html": _HTML + _LINKS, "text": _TEXT},
                        "track_opens": content == "tracked", "track_clicks": content == "tracked"}
            else:
                body = {"content": {"subject": "Hello {{ first_name }}", "html": _HTML, "text": _TEXT}}
            broadcast = (
                await api.post("/v1/broadcasts", json={"name": "bench", **target, "provider_id": provider["id"], **body})
            ).json()
            send_s, send_cpu = await send_and_watch(api, stack, broadcast["id"])
            got = (await api.get(f"/v1/broadcasts/{broadcast['id']}")).json()
        ledger = await con.fetchval("SELECT count(*) FROM messages WHERE status = 'sent'")
        phases = await _phases(con)
        assert got["status"] == "completed", got
        assert ledger == n == got["counters"]["sent"] == got["counters"]["total"], (ledger, got["counters"])
        peaks = stack.peak_rss_mb()
    return {
        "audience": audience,
        "content": content,
        "recipients": n,
        "import_s": round(import_s, 2),
        "contacts_per_s": round(n / import_s),
        "list_build_s": round(list_s, 2),
        "send_to_completed_s": round(send_s, 2),
        "recipients_per_s": round(n / send_s),
        "peak_rss_mb": peaks,
        "phases_s": phases,
        "send_cpu_s": send_cpu,
    }


async def _phases(con: asyncpg.Connection) -> dict[str, float]:
    """Where the send → completed time went, from the commit times of the run's events."""
    row = await con.fetchrow(
        """SELECT min(created_at) FILTER (WHERE type = 'BroadcastStarted') AS started,
                  min(created_at) FILTER (WHERE type = 'AudienceSnapshotted') AS snapshotted,
                  min(created_at) FILTER (WHERE type = 'BatchCompleted') AS first_batch,
                  max(created_at) FILTER (WHERE type = 'BatchCompleted') AS last_batch,
                  min(created_at) FILTER (WHERE type = 'BroadcastCompleted') AS completed
           FROM events"""
    )
    t0 = row["started"]
    return {k: round((row[k] - t0).total_seconds(), 2) for k in ("snapshotted", "first_batch", "last_batch", "completed")}


_HTML = (
    "<h1>Hello {{ first_name }} {{ last_name }},</h1>"
    + "<p>We are writing to let you know about the upcoming changes to your subscription and the new features "
    "that are now available to everyone on our platform.</p>" * 3
    + "<p>Your current plan: <b>{{ plan }}</b>.</p><p>This message was sent to {{ email }}.</p>"
)
_LINKS = ('<p><a href="https://shop.example.com/new">What is new</a> · <a href="https://shop.example.com/plans'
          '?from=mail&amp;plan=pro">Your plan</a> · <a href="https://help.example.com/">Help</a></p>')
_TEXT = "Hello {{ first_name }} {{ last_name }}, your plan is {{ plan }}. Sent to {{ email }}."
_PRO = {"field": "attributes.plan", "op": "eq", "value": "pro"}
# The contacts' locales: a quarter each gets the default, de (by fallback from de-DE), fr, pt-BR.
_LOCALES = ("en", "de-DE", "fr", "pt-BR")
_I18N = {
    "subject": "Hello {{ first_name }}", "preheader": "What is new for {{ plan }}", "html": _HTML, "text": _TEXT,
    **{f"{field}_i18n": {locale: f"[{locale}] {source}" for locale in ("de", "fr", "pt-BR")}
       for field, source in (("subject", "Hello {{ first_name }}"), ("preheader", "What is new for {{ plan }}"),
                             ("html", _HTML), ("text", _TEXT))},
}


def run_bench(
    n: int, runs: int, senders: int, audiences: tuple[str, ...] = ("list",), import_rows: int = 0,
    contents: tuple[str, ...] = ("inline",),
) -> None:
    """`runs` times: for each audience kind (a list, a segment of the same people) and content (inline,
    or a template in three locales with a preheader) a send, each followed by the bare pipeline on the
    same servers."""
    with embedded_servers() as servers:
        admin_url, nats_url = servers.admin_url, servers.nats_url
        results = []
        for i in range(runs):
            if import_rows:  # a CSV streamed to POST /v1/contacts/imports (shared/tooling/import_bench.py)
                print(json.dumps({"run": i + 1, **import_bench.run(admin_url, nats_url, import_rows)}), flush=True)
            for audience, content in [(a, c) for a in audiences for c in contents] if n else ():
                result = asyncio.run(_one_run(admin_url, nats_url, n, senders, audience, content))
                # The pair interleaved: the bare pipeline right after the send, on the same servers.
                result["bare_pipeline_s"] = round(asyncio.run(rawpipe.run_once(admin_url, nats_url, n)), 2)
                result["send_over_bare"] = round(result["send_to_completed_s"] / result["bare_pipeline_s"], 2)
                results.append(result)
                print(json.dumps({"run": i + 1, **result}), flush=True)
        if runs > 1 and len(audiences) == len(contents) == 1 and results:
            med = {k: round(statistics.median(r[k] for r in results), 2)
                   for k in ("import_s", "contacts_per_s", "send_to_completed_s", "recipients_per_s",
                             "bare_pipeline_s", "send_over_bare")}
            print(f"median of {runs}: import {med['import_s']} s ({med['contacts_per_s']:,.0f} contacts/s), "
                  f"send → completed {med['send_to_completed_s']} s ({med['recipients_per_s']:,.0f} recipients/s), "
                  f"bare pipeline {med['bare_pipeline_s']} s, send / bare {med['send_over_bare']}")
