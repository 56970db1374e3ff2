"""Send rates per provider account, held across every sender process together (a Postgres adapter).

A provider's `config` may hold `rate_limits: [{"limit": 30, "per": "second"}, {"limit": 100000,
"per": "day"}]` (per: second | minute | hour | day; at most 4 windows, one per `per`; limit 1..10^9;
optional `burst`, below). Without it, the kind's default applies (DEFAULT_RATE_LIMITS); `[]` means
no limit at all.

The arithmetic is GCRA (as the API's request limits, shared/tenants/limits.py), with one change.
Plain GCRA at `limit / per` with a burst of `limit` lets through up to 2 * limit - 1 sends in some
span of `per` (a full burst, then the refill), which is what a provider counting a sliding window
answers with 429s. Here a window of `limit` L per P seconds with burst B uses the emission interval
T = P / (L - B + 1) (rounded up to the nanosecond) and tolerance tau = (B - 1) * T. Sends j..m that
GCRA admits satisfy a_m - a_j >= (m - j + 1 - B) * T, so k sends inside a span shorter than P need
(k - B) * T < P, i.e. k < B + P / T <= L + 1: never more than L in any P. The price of a burst is
rate: the steady pace is (L - B + 1) / P. B = 1 paces sends evenly at exactly L / P; the default,
L // 20 (at least 1), lets a caller take small batches at once for at most 5% of the rate; a day
quota that should go out in bursts is worth a larger explicit `burst`.

State: provider_rate_limits (one TAT per provider and window) and provider_holds (blocked_until,
set from a provider's 429) in Postgres (migration 024), because every sender already holds a pool
there, and one call (a plpgsql function, one round trip) locks the provider's row, reads the
database clock and moves every window's TAT: concurrent takers on any machine queue on that row
lock, in order, instead of racing. NATS KV would need a get plus a compare-and-set update (two
round trips) retried on every conflict, which is exactly what many senders on one account cause,
and it offers no shared clock to compute arrival times with (each sender's own clock would do).

A take reserves even when it must wait (the next taker is planned after it, so takers are served
in the order they asked), but never further ahead than `max_wait_s`: then nothing is reserved and
RateLimited tells the caller when to come back, so a job is handed back rather than sleeping for
hours on an exhausted day window. Planned times are what the guarantee is about; a caller's own
latency (the round trip, its event loop) shifts its actual sends by milliseconds.

Known limits: reservations already handed out still go when a 429 sets a hold-off afterwards; a
provider without windows is asked nothing (SMTP, null: free), so a hold-off recorded by another
process is seen only by that process's limiter until this one records its own.
"""
from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

import msgspec

PERIODS_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
MAX_WINDOWS = 4
MAX_LIMIT = 10**9
BURST_SHARE = 20  # default burst: limit // 20, so a burst costs at most 5% of the steady rate
MAX_HOLD_OFF_S = 86400.0  # a longer Retry-After is cut to a day (a later 429 holds off again)
DEFAULT_MAX_WAIT_S = 60.0
_NS = 1_000_000_000


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """At most `limit` sends in any span of one `per`; up to `burst` of them at the same instant."""

    limit: int
    per: str
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.per not in PERIODS_S:
            raise ValueError(f"per must be one of {', '.join(PERIODS_S)}, not {self.per!r}")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ValueError(f"limit must be 1..{MAX_LIMIT}, not {self.limit}")
        if self.burst is not None and not 1 <= self.burst <= self.limit:
            raise ValueError(f"burst must be 1..limit ({self.limit}), not {self.burst}")

    @property
    def at_once(self) -> int:
        return self.burst if self.burst is not None else max(1, self.limit // BURST_SHARE)

    @property
    def interval_ns(self) -> int:
        # rounded up: a hair slower than asked, never faster (the bound above stays exact)
        return -(-PERIODS_S[self.per] * _NS // (self.limit - self.at_once + 1))

    @property
    def tolerance_ns(self) -> int:
        return (self.at_once - 1) * self.interval_ns


# Each API's documented ceiling for one account (what a provider row is).
DEFAULT_RATE_LIMITS: dict[str, list[Window]] = {
    # Bot API FAQ: about 30 messages per second to different chats. Its other limits are per chat
    # (1/second; 20/minute in one group), which a broadcast reaches once per run: not counted here.
    "telegram_bot": [Window(limit=30, per="second")],
    # Cloud API throughput: 80 messages per second per business phone number (a provider row is one
    # number); Meta raises it to 1,000 for eligible numbers: configure `[{"limit": 1000, ...}]`.
    "whatsapp_cloud": [Window(limit=80, per="second")],
    # A US/CA long code: 1 message segment per second. Raise it to what the sender is provisioned
    # for: a toll-free number `[{"limit": 3, "per": "second"}]` (more on request), a short code
    # `[{"limit": 100, "per": "second"}]`, an A2P 10DLC number its campaign's MPS, a messaging
    # service the sum of its senders' MPS. Twilio queues what exceeds it (up to 4 hours) rather
    # than refusing it, so the limit here keeps that queue, and its latency, short.
    "twilio": [Window(limit=1, per="second")],
    # HTTP v1 API: 600,000 messages per minute per project.
    "fcm": [Window(limit=600_000, per="minute")],
    "webhook": [],  # the tenant's own endpoint: it says 429 with Retry-After if it must (hold_off)
    "smtp": [],
    "null": [],
}


def parse_windows(value: Any) -> list[Window]:
    """Stored or submitted `rate_limits` as windows; ValueError saying what is wrong."""
    try:
        windows = msgspec.convert(value, list[Window])
    except msgspec.ValidationError as exc:
        raise ValueError(f"rate_limits: {exc}") from None
    if len(windows) > MAX_WINDOWS:
        raise ValueError(f"rate_limits: at most {MAX_WINDOWS} windows, not {len(windows)}")
    pers = [w.per for w in windows]
    if len(set(pers)) != len(pers):
        raise ValueError("rate_limits: one window per `per` (the smaller limit would bind anyway)")
    return windows


def windows_of(kind: str, config: dict[str, Any] | None) -> list[Window]:
    """The windows a provider is held to: its own `rate_limits` if set, else its kind's default."""
    configured = (config or {}).get("rate_limits")
    if configured is None:
        return list(DEFAULT_RATE_LIMITS.get(kind, []))
    return parse_windows(configured)


def max_batch(windows: list[Window]) -> int | None:
    """The most sends one take may reserve at once (None: no limit)."""
    return min((w.at_once for w in windows), default=None)


class RateLimited(Exception):
    """The sends could not go within max_wait_s; nothing was reserved. Come back in retry_after_s."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"provider rate limit: next send in {retry_after_s:.3f} s")
        self.retry_after_s = retry_after_s


class Reservation(msgspec.Struct, frozen=True):
    now_ns: int  # the database clock when the reservation was made
    start_ns: int  # when the sends may go

    @property
    def wait_s(self) -> float:
        return (self.start_ns - self.now_ns) / _NS


_TAKE = "SELECT now_ns, start_ns, reserved FROM provider_rate_take($1, $2, $3, $4, $5, $6, $7)"
_HOLD_OFF = """
INSERT INTO provider_holds AS h (provider_id, blocked_until)
VALUES ($1, (extract(epoch FROM clock_timestamp()) * 1000000000)::bigint + $2)
ON CONFLICT (provider_id) DO UPDATE SET blocked_until = greatest(h.blocked_until, EXCLUDED.blocked_until)
"""


class AccountLimiter:
    """One per process: `con_or_pool` is an asyncpg connection (outside a transaction) or pool."""

    def __init__(self, max_wait_s: float = DEFAULT_MAX_WAIT_S) -> None:
        self.max_wait_s = max_wait_s
        # provider -> monotonic end of a hold-off this process recorded: what makes a provider
        # without windows worth a query
        self._held: dict[uuid.UUID, float] = {}

    async def reserve(self, con_or_pool: Any, provider_id: uuid.UUID, windows: list[Window], n: int = 1,
                      *, at_ns: int | None = None) -> Reservation:
        """Reserve `n` sends at one instant in every window, or raise RateLimited having reserved
        nothing; always asks Postgres. `at_ns` replaces the database clock (tests)."""
        most = max_batch(windows)
        if n < 1 or (most is not None and n > most):
            raise ValueError(f"n must be 1..{most or 'any'} for these windows (split the batch), not {n}")
        if getattr(con_or_pool, "is_in_transaction", lambda: False)():
            # the provider's row stays locked until the transaction ends: every sender would wait
            raise ValueError("take outside a transaction: it would hold the provider's lock until it ends")
        row = await con_or_pool.fetchrow(
            _TAKE, provider_id, [w.per for w in windows], [w.interval_ns for w in windows],
            [w.tolerance_ns for w in windows], n, int(self.max_wait_s * _NS), at_ns,
        )
        reservation = Reservation(row["now_ns"], row["start_ns"])
        if not row["reserved"]:
            raise RateLimited(reservation.wait_s)
        return reservation

    async def take(self, con_or_pool: Any, provider_id: uuid.UUID, windows: list[Window], n: int = 1) -> float:
        """Seconds to wait before sending the `n` (0.0: now), reserved; RateLimited past max_wait_s."""
        if not windows and not self.holding(provider_id):
            return 0.0
        return (await self.reserve(con_or_pool, provider_id, windows, n)).wait_s

    async def acquire(self, con_or_pool: Any, provider_id: uuid.UUID, windows: list[Window], n: int = 1) -> float:
        """take(), then sleep until the sends may go; returns the time slept."""
        wait = await self.take(con_or_pool, provider_id, windows, n)
        if wait > 0:
            await asyncio.sleep(wait)
        return wait

    async def hold_off(self, con_or_pool: Any, provider_id: uuid.UUID, seconds: float) -> None:
        """A provider's 429: no sender sends on this account for `seconds` (an earlier, longer hold stays)."""
        if not seconds > 0:  # also NaN
            return
        seconds = min(seconds, MAX_HOLD_OFF_S)
        await con_or_pool.execute(_HOLD_OFF, provider_id, math.ceil(seconds * _NS))
        now = time.monotonic()
        if len(self._held) > 1000:
            self._held = {p: t for p, t in self._held.items() if t > now}
        self._held[provider_id] = max(self._held.get(provider_id, 0.0), now + seconds)

    def holding(self, provider_id: uuid.UUID) -> bool:
        """This process recorded a hold-off of the provider that has not ended yet."""
        until = self._held.get(provider_id)
        if until is not None and until <= time.monotonic():
            del self._held[provider_id]
            return False
        return until is not None
