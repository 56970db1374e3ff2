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
    # How long JetStream waits for a job's ack before redelivering it; workers heartbeat well within it.
    job_ack_wait_s: float = 60.0
    # Whether this process (API or sender) competes for the relay/projector/scheduler/progress leader
    # locks. At least one process of a deployment must.
    run_background: bool = True

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


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
