"""Settings: every knob comes from a CRIER_* environment variable, loaded into one struct."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import msgspec


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # Empty URLs mean "start the embedded servers" (crier dev) or are an error (crier api/sender).
    database_url: str = ""
    nats_url: str = ""
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    data_dir: str = ".crier"
    log_format: Literal["json", "console"] = "json"
    log_level: str = "info"
    # Prefixes every JetStream stream and subject, so several deployments (or tests) share a server.
    nats_prefix: str = ""
    # How long JetStream remembers Nats-Msg-Id values; the relay's own resume check covers longer gaps.
    nats_duplicate_window_s: float = 600.0
    db_pool_size: int = 10
    # Background tasks (relay, projector, scheduler) poll at most this long between wake-ups.
    poll_interval_s: float = 1.0
    # Jobs one sender process works on at once (each holds a Postgres connection while it runs).
    sender_concurrency: int = 4
    # Runs one sender plans (snapshots) at once, so one large audience never holds up another's.
    planner_concurrency: int = 4
    # Fair sending: the job queue holds about this many seconds of work (at the rate workers take
    # jobs; 2 to 64 jobs), so a new broadcast's first job is never far from the front.
    send_backlog_s: float = 0.1
    # Jobs a run may have unfinished in JetStream at most, and a tenant over all its runs.
    send_window_jobs: int = 256
    send_window_jobs_per_tenant: int = 512
    # How long JetStream waits for a job's (or a planning's) ack before redelivering it: how soon
    # another sender takes over from one that died or froze. Work in progress is kept alive with
    # in_progress() every quarter of it.
    job_ack_wait_s: float = 6.0
    # Whether this process (API or sender) competes for the relay/projector/scheduler/progress leader
    # locks. At least one process of a deployment must.
    run_background: bool = True
    # /readyz answers 503 when the relay or the projector is further behind than this: the oldest
    # committed event it has not taken yet is older than this many seconds.
    ready_max_lag_s: float = 60.0
    # Request rate limits (GCRA in Postgres, shared by every API replica): per token and per tenant,
    # a steady rate per second and a burst. A tenant may override each (`crier tenant limits`).
    rate_limits: bool = True  # false: no request limits at all (the switch for measuring their cost)
    rate_limit_per_s: float = 20.0
    rate_limit_burst: int = 40
    tenant_rate_limit_per_s: float = 50.0
    tenant_rate_limit_burst: int = 100
    # Open progress streams (SSE) at once, per token and per tenant, across replicas.
    progress_streams_per_token: int = 5
    progress_streams_per_tenant: int = 20
    # A progress stream forwards what the projector publishes on NATS, and reads Postgres again
    # this often in case a message was lost (core NATS is at most once); an idle stream gets a
    # heartbeat comment as often.
    progress_reread_s: float = 5.0
    # Failed authentications per client address per minute (a burst of this many) before 429s.
    auth_failures_per_minute: int = 10
    # Whether provider hosts (SMTP servers) may be private, loopback, link-local ... addresses
    # (shared/platform/netguard.py). Off: tenants reach only the public internet, not this network.
    # On in `crier dev` and the tests, whose SMTP peers listen on 127.0.0.1.
    allow_private_networks: bool = False
    # A recurring broadcast's cron may not fire more often than this (seconds, wall-clock; 0: any):
    # every occurrence is a run to the whole audience, and `* * * * *` is more likely a mistake.
    min_cron_interval_s: int = 3600
    # Where people reach this deployment's public pages (unsubscribe links in every message):
    # empty means http://{api_host}:{api_port}, which only suits a local setup.
    public_url: str = ""
    # Fernet keys that seal provider secrets at rest (shared/platform/secrets.py), comma-separated:
    # the first seals, all open. Never logged: __repr__ below hides it.
    secret_key: str = ""
    # Without a secret key, `crier api` / `crier sender` refuse to start unless this says that
    # storing provider secrets in clear is meant.
    allow_plaintext_secrets: bool = False

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{n}={v!r}' for n, v in self.__rich_repr__())})"

    def __rich_repr__(self):  # type: ignore[no-untyped-def]  # what repr() and rich show: no secret
        for name in self.__struct_fields__:
            value = getattr(self, name)
            yield name, ("<hidden>" if name in _HIDDEN and value else value)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def public_base_url(self) -> str:
        """CRIER_PUBLIC_URL without a final slash, or the API's own address."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.api_host}]" if ":" in self.api_host else self.api_host
        return f"http://{host}:{self.api_port}"


_HIDDEN = frozenset({"secret_key"})
_ENV_PREFIX = "CRIER_"


def load_settings(env: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Build Settings from CRIER_* variables; unknown CRIER_* names are ignored, bad values raise."""
    env = dict(os.environ if env is None else env)
    raw: dict[str, object] = {}
    for field in msgspec.structs.fields(Settings):
        value = env.get(_ENV_PREFIX + field.name.upper())
        if value is not None and value != "":
            raw[field.name] = value
    raw.update(overrides)
    return msgspec.convert(raw, Settings, strict=False)
