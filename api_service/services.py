"""What request handlers need from the outside world, built once by the composition root."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from shared.platform.bus import Names
from shared.platform.clock import utc_now
from shared.platform.settings import Settings


@dataclass
class Services:
    settings: Settings
    pool: asyncpg.Pool
    nats: NATS
    js: JetStreamContext
    names: Names
    clock: Callable[[], datetime] = utc_now
