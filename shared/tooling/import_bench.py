"""The import step of `crier bench --import-rows N`: a CSV of N contacts (external_id, email, first_name,
plan, city: ~95 bytes a row) written to a file first, then streamed by HTTP to a `crier api` process
on a database of its own, twice (all new, then all unchanged). Reports the times, the CPU the API
process and Postgres spent, and the API's peak memory (VmHWM), which a body of any size must not move
much: it is parsed as it arrives.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx

from shared.platform import db
from shared.tenants import store as tenants
from shared.tooling.embedded import free_port, wait_for_port

_FIRST = ["Anna", "Bernd", "Chloe", "Dmitri", "Emma", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Karla", "Liam"]
_CITIES = ["Berlin", "Hamburg", "Munich", "Cologne", "Frankfurt am Main", "Stuttgart", "Leipzig", "Dresden"]
_PLANS = ["free", "pro", "business", "enterprise"]
PIECE = 1024 * 1024


def write_csv(path: Path, rows: int) -> int:
    """The file the bench imports; returns its size."""
    with open(path, "w") as f:
        f.write("external_id,email,first_name,plan,city\n")
        for start in range(0, rows, 10_000):
            f.write("".join(
                f"customer-{i:010d},{_FIRST[i % 12].lower()}.mustermann{i:08d}@newsletter.example-shop.com,"
                f"{_FIRST[i % 12]},{_PLANS[i % 4]},{_CITIES[i % 8]}\n"
                for i in range(start, min(start + 10_000, rows))
            ))
    return path.stat().st_size


def _status(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def _backends_cpu(con: asyncpg.Connection, dbname: str) -> float:
    """CPU seconds of the Postgres backends serving the database (on this machine)."""
    pids = await con.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", dbname)
    return sum(_cpu_s(r["pid"]) for r in pids)


async def _pieces(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(PIECE):
            yield piece


async def run_once(admin_url: str, nats_url: str, rows: int) -> dict:
    dbname = f"crier_bench_import_{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="crier-bench-import-"))
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    database_url = admin_url.rsplit("/", 1)[0] + "/" + dbname
    api = None
    try:
        size = write_csv(work / "contacts.csv", rows)
        await db.migrate(database_url)
        con = await db.connect(database_url)
        tenant = await tenants.create_tenant(con, "bench")
        token = (await tenants.create_token(con, tenant.id, "write")).token
        port = free_port()
        env = dict(os.environ, CRIER_DATABASE_URL=database_url, CRIER_NATS_URL=nats_url, CRIER_API_PORT=str(port),
                   CRIER_NATS_PREFIX=f"i{uuid.uuid4().hex[:8]}", CRIER_LOG_LEVEL="warning")
        api = subprocess.Popen([sys.executable, "-m", "shared.tooling.cli", "api"], env=env)
        wait_for_port(port, timeout=60)
        rss_before = _status(api.pid, "VmRSS:")
        result: dict = {"import_rows": rows, "import_mb": round(size / 2**20)}
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "text/csv", "Content-Length": str(size)}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=None) as http:
            for label in ("import", "reimport"):  # all new, then all unchanged
                api_cpu, pg_cpu, t0 = _cpu_s(api.pid), await _backends_cpu(con, dbname), time.perf_counter()
                r = await http.post("/v1/contacts/imports", content=_pieces(work / "contacts.csv"), headers=headers)
                took = time.perf_counter() - t0
                r.raise_for_status()
                done = r.json()
                assert done["status"] == "completed" and done["rows_read"] == rows and not done["rejected"], done
                result[f"{label}_s"] = round(took, 2)
                result[f"{label}_rows_per_s"] = round(rows / took)
                result[f"{label}_api_cpu_s"] = round(_cpu_s(api.pid) - api_cpu, 2)
                result[f"{label}_postgres_cpu_s"] = round(await _backends_cpu(con, dbname) - pg_cpu, 2)
        result["import_api_rss_mb"] = {"before": round(rss_before), "peak": round(_status(api.pid, "VmHWM:"))}
        await con.close()
        return result
    finally:
        if api is not None:
            api.terminate()
            try:
                api.wait(20)
            except subprocess.TimeoutExpired:
                api.kill()
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()


def run(admin_url: str, nats_url: str, rows: int) -> dict:
    return asyncio.run(run_once(admin_url, nats_url, rows))
