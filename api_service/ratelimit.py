"""Request rate limits per token and per tenant, progress stream slots, and a slowdown for failed
authentication per client address: pure ASGI middleware around authentication.

    AuthFailureGate -> auth -> RateLimitMiddleware -> idempotency -> route

- The gate comes first: an address that failed authentication too often (`auth_failures_per_minute`,
  counted in Postgres across replicas) gets a 429 with Retry-After before its token is even looked
  up. The replica that saw the failure over the limit remembers the block in memory for its
  Retry-After; another replica learns it at that address's next failure there (which the shared
  count answers with a 429, too).
- The rate limiter needs the principal, so it sits right behind authentication and ahead of
  idempotency (a 429 is never stored under an Idempotency-Key). One statement per request
  (shared/tenants/limits.py). A token or tenant refused is then answered from memory until the
  moment it may pass again (exact: the shared arrival time only moves forward), so a flood of
  refused requests costs Postgres nothing. Routes whose handler has `opt={STREAM_SLOT: True}` (the
  progress stream) also hold a stream slot, a lease refreshed while they run.

Answers carry the RateLimit and RateLimit-Policy fields as in draft-ietf-httpapi-ratelimit-headers-11
(May 2026): `RateLimit-Policy: "token";q=40;w=2, "tenant";q=100;w=2` (q: the burst, w: seconds in
which a spent burst comes back) and `RateLimit: "token";r=39;t=1, "tenant";r=99;t=1` (r: requests
that may come now, t: seconds until the whole burst is back). Stream slots are the policy
`"streams";q=5;qu="concurrent-requests"`. The health checks and /schema are never limited.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

from litestar.exceptions import NotAuthorizedException
from litestar.middleware.base import DefineMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from api_service.auth import PUBLIC_PATHS
from api_service.problems import send_problem
from shared.platform.logging import get_logger
from shared.platform.settings import Settings
from shared.tenants import limits
from shared.tenants.limits import Budget, Limits

log = get_logger(__name__)

STREAM_SLOT = "crier_stream_slot"  # a route handler `opt` key: the request holds a progress stream slot
STREAM_RETRY_AFTER_S = 5  # a slot frees when a stream ends, which nobody can foretell
FORGET_CHANCE = 0.01  # share of counted auth failures after which idle rate_limits rows are deleted
_MAX_BLOCKED = 10_000  # addresses a replica remembers as blocked before it drops the expired ones


class Limiter:
    """What the middleware share across every route's instance: the defaults and the addresses this
    replica knows to be blocked (address -> monotonic time the block ends)."""

    def __init__(self, settings: Settings) -> None:
        self.limits: Limits = limits.defaults(settings)
        self.blocked: dict[str, float] = {}
        # token or tenant -> (monotonic time it may pass again, its 429's fields): a caller over its
        # rate gets its 429s from memory until then, so a flood costs Postgres nothing. Exact, not
        # a guess: the shared TAT only moves forward, so the database would say no until then too.
        self.denied: dict[Any, tuple[float, list[str], list[tuple[bytes, bytes]]]] = {}

    def blocked_for(self, address: str) -> int:
        until = self.blocked.get(address)
        if until is None:
            return 0
        left = until - time.monotonic()
        if left <= 0:
            self.blocked.pop(address, None)
            return 0
        return max(1, int(left + 0.999))

    def block(self, address: str, seconds: int) -> None:
        if len(self.blocked) >= _MAX_BLOCKED:
            now = time.monotonic()
            self.blocked = {a: u for a, u in self.blocked.items() if u > now}
        self.blocked[address] = time.monotonic() + seconds

    def still_denied(self, *keys: Any) -> tuple[float, list[str], list[tuple[bytes, bytes]]] | None:
        now = time.monotonic()
        for key in keys:
            if (hit := self.denied.get(key)) is not None:
                if hit[0] > now:
                    return hit
                del self.denied[key]
        return None

    def deny(self, key: Any, seconds: float, over: list[str], fields: list[tuple[bytes, bytes]]) -> None:
        if len(self.denied) >= _MAX_BLOCKED:
            now = time.monotonic()
            self.denied = {k: v for k, v in self.denied.items() if v[0] > now}
        self.denied[key] = (time.monotonic() + seconds, over, fields)


def _exempt(scope: Scope) -> bool:
    return scope["type"] != "http" or scope["path"].startswith(tuple(PUBLIC_PATHS))


def _address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _too_many(retry_after: int) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(retry_after).encode())]


class AuthFailureGate:
    def __init__(self, app: ASGIApp, limiter: Limiter) -> None:
        self.app, self.limiter = app, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _exempt(scope):
            await self.app(scope, receive, send)
            return
        address = _address(scope)
        if blocked := self.limiter.blocked_for(address):
            await _refuse_failures(send, blocked)
            return
        try:
            await self.app(scope, receive, send)
        except NotAuthorizedException:
            pool = scope["app"].state.services.pool
            async with pool.acquire() as con:
                retry_after = await limits.record_auth_failure(con, address, self.limiter.limits.auth_failures_per_minute)
                if random.random() < FORGET_CHANCE:  # addresses are many: now and then forget idle ones
                    await limits.forget_idle(con)
            if retry_after is None:
                raise
            self.limiter.block(address, retry_after)
            log.warning("authentication failures over the limit", address=address, retry_after=retry_after)
            await _refuse_failures(send, retry_after)


async def _refuse_failures(send: Send, retry_after: int) -> None:
    await send_problem(send, 429, "too many failed authentications from this address; retry later",
                       headers=_too_many(retry_after), retry_after=retry_after)


async def _refuse_rate(send: Send, retry_after: int, over: list[str], fields: list[tuple[bytes, bytes]]) -> None:
    await send_problem(send, 429, f"too many requests for this {' and '.join(over)}; retry after {retry_after} s",
                       headers=[*_too_many(retry_after), *fields], retry_after=retry_after, violated_policies=over)


def _fields(budgets: list[Budget]) -> list[tuple[bytes, bytes]]:
    policy = ", ".join(f'"{b.policy}";q={b.quota};w={b.window_s}' for b in budgets)
    state = ", ".join(f'"{b.policy}";r={b.remaining};t={b.reset_s}' for b in budgets)
    return [(b"ratelimit-policy", policy.encode()), (b"ratelimit", state.encode())]


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: Limiter) -> None:
        self.app, self.limiter = app, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user")
        if _exempt(scope) or user is None:
            await self.app(scope, receive, send)
            return
        if (hit := self.limiter.still_denied(("token", user.token_id), ("tenant", user.tenant_id))) is not None:
            until, over, fields = hit
            await _refuse_rate(send, max(1, int(until - time.monotonic() + 0.999)), over, fields)
            return
        pool = scope["app"].state.services.pool
        async with pool.acquire() as con:
            decision = await limits.take_request(con, user.tenant_id, user.token_id, self.limiter.limits)
        fields = _fields(decision.budgets)
        if not decision.allowed:
            over = [b.policy for b in decision.budgets if b.retry_after_s is not None]
            key = ("token", user.token_id) if over == ["token"] else ("tenant", user.tenant_id)
            self.limiter.deny(key, decision.wait_s, over, fields)
            await _refuse_rate(send, decision.retry_after_s, over, fields)
            return
        handler = scope.get("route_handler")
        if handler is not None and handler.opt.get(STREAM_SLOT):
            await self._stream(scope, receive, send, pool, user, fields)
            return
        await self.app(scope, receive, _adding(send, fields))

    async def _stream(self, scope: Scope, receive: Receive, send: Send, pool: Any, user: Any,
                      fields: list[tuple[bytes, bytes]]) -> None:
        lease = uuid.uuid4()
        async with pool.acquire() as con:
            grant = await limits.open_stream(con, lease, user.tenant_id, user.token_id, self.limiter.limits)
        policy = f'"streams";q={grant.limit};qu="concurrent-requests"'.encode()
        if not grant.granted:
            await send_problem(
                send, 429, f"{grant.open} progress streams are open for this {grant.policy}, the most it may hold",
                headers=[*_too_many(STREAM_RETRY_AFTER_S), (b"ratelimit-policy", policy),
                         (b"ratelimit", f'"streams";r=0;t={STREAM_RETRY_AFTER_S}'.encode())],
                retry_after=STREAM_RETRY_AFTER_S, violated_policies=["streams"],
            )
            return
        keeper = asyncio.create_task(_keep_lease(pool, lease))
        try:
            await self.app(scope, receive, _adding(send, [*fields, (b"ratelimit-policy", policy)]))
        finally:
            keeper.cancel()
            try:
                async with pool.acquire() as con:
                    await limits.close_stream(con, lease)
            except Exception as exc:  # it expires on its own
                log.warning("could not release a stream slot", lease=str(lease), error=str(exc))


async def _keep_lease(pool: Any, lease: uuid.UUID) -> None:
    while True:
        await asyncio.sleep(limits.STREAM_REFRESH_S)
        try:
            async with pool.acquire() as con:
                await limits.refresh_stream(con, lease)
        except Exception as exc:  # try again at the next round, well within the lease's time
            log.warning("could not refresh a stream slot", lease=str(lease), error=str(exc))


def _adding(send: Send, fields: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *fields]}
        await send(message)

    return wrapped


def rate_limited(settings: Settings, auth: DefineMiddleware) -> list[DefineMiddleware]:
    """Authentication with the limits around it (or alone, with CRIER_RATE_LIMITS=false)."""
    if not settings.rate_limits:
        return [auth]
    limiter = Limiter(settings)
    return [DefineMiddleware(AuthFailureGate, limiter=limiter), auth, DefineMiddleware(RateLimitMiddleware, limiter=limiter)]
