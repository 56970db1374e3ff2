"""Send rates per provider account, held across every sender process together (a Postgres adapter).

A provider's `config` may hold `rate_limits: [{"limit": 30, "per": "second"}, {"limit": 100000,
"per": "day"}]` (per: second | minute | hour | day; at most 4 windows, one per `per`; limit 1..10^9;
optional `burst`, below). Without it, the kind's default applies (DEFAULT_RATE_LIMITS); `[]` means
no limit at all.

The arithmetic is GCRA (as the API's request limits, shared/tenants/limits.py), with two changes.
Plain GCRA at `limit / per` with a burst of `limit` lets through up to 2 * limit - 1 sends in some
span of `per` (a full burst, then the refill), which is what a provider counting a sliding window
answers with 429s. Here a window of `limit` L per P seconds with burst B uses the emission interval
T = (P + J) / (L - B + 1) (rounded up to the nanosecond) and tolerance tau = (B - 1) * T, where J =
SEND_JITTER_NS (50 ms) is how much later than planned a send may reach the provider. Sends j..m that
GCRA admits are planned p_m - p_j >= (m - j + 1 - B) * T apart. None goes before its plan, but each
goes a little after it (the take's answer, the caller's event loop, its work before the request,
the request itself; measured at a local peer on the 2-core test machine with other work on both
cores: 1-5 ms typically, 30 ms at the 99th percentile, more now and then), and a provider counts
arrivals, not plans. With every send within J of its plan, arrivals satisfy a_m - a_j >= (m - j + 1 - B) * T - J, so k sends inside a
span shorter than P need (k - B) * T - J < P, i.e. k < B + (P + J) / T = L + 1: never more than L
in any P as the provider sees them. (T = P / (L - B + 1) kept that for the plans only: two senders
a few ms apart put L + 1 arrivals into one P.) The price of J is J / P of the rate: 5% for a
per-second window, 0.08% per minute, nothing to speak of per hour or day. The price of a burst is
rate too: the steady pace is (L - B + 1) / (P + J). B = 1 paces sends evenly; the default, L // 20
(at least 1), lets a caller take small batches at once for at most 5% of the rate; a day quota that
should go out in bursts is worth a larger explicit `burst`.

The second change: a process's first sends on an account go later than J after their plan, because
the way out is cold (the connection to the provider, TCP and TLS, is opened on the way; the
process's own connections, statements and code paths are not warm yet; measured: 20-95 ms late on
the loaded test machine, where the sends after them kept within J). So take() counts the sends of a
process that has taken nothing on the account for COLD_AFTER_S (or ever) COLD_START_NS (C, 150 ms)
late: the next sends are planned C further on (TAT' = max(TAT, s) + n * T + C), and the bound above
holds for a cold send within J + C of its plan. Every take the process starts before its first one
is answered is cold (any of them may be the one that opens a connection): a start costs the account
at most C per job the process sends at once (4 by default), once.

The part of J the limiter can keep itself: acquire() sleeps until the start, and a process that
wakes more than MISSED_NS (20 ms) after it (its event loop busy, a garbage collection, the machine
overloaded: tens of ms now and then) would send late; so it leaves that reservation unused (an empty
slot only slows the account) and takes another, planned after everything reserved meanwhile, up to
MAX_MISSES times in a row. The rest of J, 30 ms, is for what comes after acquire() returns: the
caller's own work before the request goes out, and the way there.

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
hours on an exhausted day window.

Known limits: the guarantee is for sends within J (a cold one J + C) of their plan. A process that
stalls longer after acquire() returned (swapped out, or waiting on Postgres) can still put L + 1
into one P, and so does a caller that sends later than its reservations say: n sends reserved one
at a time and sent together at the last one's start are up to (n - 1) * T late, so a caller must
send each message as its own reservation says, and do nothing slow between the two. (The worker,
sender_service/worker.py, takes each message's slot after its ledger claim, right before its
request; tests/test_rate_limit_e2e.py holds two senders to 20/s that way.)
Reservations already handed out still go when a 429 sets a hold-off afterwards. A provider without
windows is asked nothing (SMTP, null: free), so a hold-off recorded by another process is seen only
by that process's limiter until this one records its own.
"""
from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

import msgspec

from shared.platform.logging import get_logger

PERIODS_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
MAX_WINDOWS = 4
MAX_LIMIT = 10**9
BURST_SHARE = 20  # default burst: limit // 20, so a burst costs at most 5% of the steady rate
MAX_HOLD_OFF_S = 86400.0  # a longer Retry-After is cut to a day (a later 429 holds off again)
DEFAULT_MAX_WAIT_S = 60.0
SEND_JITTER_NS = 50_000_000  # J: how much later than planned a send may reach the provider (docstring)
COLD_START_NS = 150_000_000  # C: how much later still a process's first sends on an account may go (docstring)
COLD_AFTER_S = 10.0  # a process that sent nothing on an account for this long is cold on it again
MISSED_NS = 20_000_000  # acquire() woken later than this after the start leaves the slot unused (docstring)
MAX_MISSES = 3  # ... this many times in a row at most; then the sends go late
_NS = 1_000_000_000

log = get_logger(__name__)


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
        # T = (P + J) / (L - B + 1), rounded up: a hair slower than that, never faster (the bound
        # in the module's docstring stays exact)
        return -(-(PERIODS_S[self.per] * _NS + SEND_JITTER_NS) // (self.limit - self.at_once + 1))

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
        # provider -> monotonic time of this process's latest planned send on it (warm while recent)
        self._sent: dict[uuid.UUID, float] = {}

    async def reserve(self, con_or_pool: Any, provider_id: uuid.UUID, windows: list[Window], n: int = 1,
                      *, late_ns: int = 0, at_ns: int | None = None) -> Reservation:
        """Reserve `n` sends at one instant in every window, or raise RateLimited having reserved
        nothing; always asks Postgres. `late_ns`: the sends may go that much later than planned (on
        top of SEND_JITTER_NS), so every window counts them that much later. `at_ns` replaces the
        database clock (tests)."""
        most = max_batch(windows)
        if n < 1 or (most is not None and n > most):
            raise ValueError(f"n must be 1..{most or 'any'} for these windows (split the batch), not {n}")
        if late_ns < 0:
            raise ValueError(f"late_ns must be >= 0, not {late_ns}")
        if getattr(con_or_pool, "is_in_transaction", lambda: False)():
            # the provider's row stays locked until the transaction ends: every sender would wait
            raise ValueError("take outside a transaction: it would hold the provider's lock until it ends")
        # TAT' = max(TAT, s) + n * T': with T' = T + late / n (rounded up) the next sends are planned
        # `late` further on; the start of a batch (n > 1) moves on by (n - 1) * late / n too: later, never sooner
        extra = -(-late_ns // n)
        row = await con_or_pool.fetchrow(
            _TAKE, provider_id, [w.per for w in windows], [w.interval_ns + extra for w in windows],
            [w.tolerance_ns for w in windows], n, int(self.max_wait_s * _NS), at_ns,
        )
        reservation = Reservation(row["now_ns"], row["start_ns"])
        if not row["reserved"]:
            raise RateLimited(reservation.wait_s)
        return reservation

    async def take(self, con_or_pool: Any, provider_id: uuid.UUID, windows: list[Window], n: int = 1) -> float:
        """Seconds to wait before sending the `n` (0.0: now), reserved; RateLimited past max_wait_s.
        While this process has no send on the account planned within COLD_AFTER_S before now (its
        first take on it, or the first after a pause, and any it starts before that one is answered)
        the sends are counted COLD_START_NS late: see the module's docstring."""
        if not windows and not self.holding(provider_id):
            return 0.0
        now = time.monotonic()
        last = self._sent.get(provider_id)
        cold = last is None or now - last >= COLD_AFTER_S
        reservation = await self.reserve(con_or_pool, provider_id, windows, n,
                                         late_ns=COLD_START_NS if cold and windows else 0)
        if len(self._sent) > 1000:
            self._sent = {p: t for p, t in self._sent.items() if now - t < COLD_AFTER_S}
        planned = time.monotonic() + reservation.wait_s
        self._sent[provider_id] = max(planned, self._sent.get(provider_id, planned))
        return reservation.wait_s

    async def acquire(self, con_or_pool: Any, provider_id: uuid.UUID, windows: list[Window], n: int = 1) -> float:
        """take(), then sleep until the sends may go; returns the time slept. Woken more than
        MISSED_NS after the sends' start (this process stalled), it leaves that reservation unused
        and takes another, up to MAX_MISSES times (then they go late): see the module's docstring."""
        loop = asyncio.get_running_loop()
        slept = 0.0
        for missed in range(MAX_MISSES + 1):
            wait = await self.take(con_or_pool, provider_id, windows, n)
            due = loop.time() + max(wait, 0.0)  # the start, on this process's clock, as of the answer
            if wait > 0:
                await asyncio.sleep(wait)
            slept += max(wait, 0.0)
            late = loop.time() - due
            if late * _NS <= MISSED_NS or missed == MAX_MISSES or not windows:
                return slept
            log.info("rate limit: woke too late for the reserved start; taking another", provider_id=str(provider_id),
                     late_ms=round(late * 1000, 1))
        return slept

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
