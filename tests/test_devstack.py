"""`crier dev` as a real process: SIGTERM (docker stop, systemd, `timeout`) stops everything it
started, the API, the sender, Postgres and nats-server, as Ctrl-C does."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from shared.tooling.embedded import free_port

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180  # a first start runs initdb and every migration
STOP_TIMEOUT_S = 10  # docker stop's grace before SIGKILL; it takes about 3 s (the API's shutdown, pg_ctl stop)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, from /proc; None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = raw.rsplit(")", 1)[1].split()[:2]  # the name, in parentheses, may hold spaces
    return state, int(ppid)


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has exited; only its parent has not reaped it


def descendants(root: int) -> set[int]:
    parents = {int(p.name): s[1] for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))}
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until_healthy(dev: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert dev.poll() is None, f"crier dev exited with {dev.returncode}:\n{log.read_text()}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no /healthz after {START_TIMEOUT_S}s:\n{log.read_text()}"
        time.sleep(0.2)


@pytest.fixture
def dev_root():
    # Not pytest's tmp_path: run as root, embedded Postgres widens the permissions of its data
    # dir's parents for the server's own user, and pytest's base directory should keep its own.
    root = Path(tempfile.mkdtemp(prefix="crier-dev-test-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(START_TIMEOUT_S + 60)
def test_sigterm_stops_the_api_the_sender_postgres_and_nats(dev_root: Path):
    api_port = free_port()
    data = dev_root / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRIER_")}  # embedded servers, default settings
    env.update(CRIER_DATA_DIR=str(data), CRIER_API_PORT=str(api_port), CRIER_LOG_LEVEL="warning")
    log = dev_root / "dev.log"
    started: set[int] = set()
    with open(log, "wb") as out:
        # A session of its own, as under docker or systemd: the signal reaches `crier dev` alone,
        # which must pass it on; and a failed test can still kill what is left.
        dev = subprocess.Popen([sys.executable, "-m", "shared.tooling.cli", "dev"], cwd=REPO, env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Given `crier dev` answering on its API
        wait_until_healthy(dev, api_port, log)
        # pg_ctl started Postgres in a session of its own: not a descendant, found by its pid file
        postmaster_pid, _, _, pg_port = (data / "pg" / "postmaster.pid").read_text().splitlines()[:4]
        postmaster = int(postmaster_pid)
        started = descendants(dev.pid) | {postmaster} | descendants(postmaster)
        commands = [cmdline(pid) for pid in started]
        for part in ("shared.tooling.cli api", "shared.tooling.cli sender", "nats-server", "postgres"):
            assert any(part in c for c in commands), f"no {part!r} among {commands}"
        ports = [api_port, int(pg_port)]
        ports += [int(c.split(" -p ")[1].split()[0]) for c in commands if "nats-server" in c]

        # When it gets SIGTERM
        dev.send_signal(signal.SIGTERM)
        code = dev.wait(STOP_TIMEOUT_S)  # TimeoutExpired if it takes longer

        # Then it stopped in order, within seconds, and nothing it started is left running
        assert code == 0, log.read_text()
        assert "stopped." in log.read_text()
        assert [(pid, cmdline(pid)) for pid in started if alive(pid)] == []
        assert [port for port in ports if listening(port)] == []
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()
        for pid in started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
