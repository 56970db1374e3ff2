"""`Idempotency-Key` on POST: the first response to a key is stored and replayed to every retry.

A pure ASGI middleware behind authentication and the rate limiter. Keys are per token: one token
is never replayed another's answer. A retry with the same key and another request is a 422; a retry
while the first request is still running is a 409. Responses of 5xx are not kept, so a retry after a
server error runs the command again (which the deciders make harmless: commands are idempotent);
refusals (401, 403, 429) are not kept either, so a refused request leaves its key unused.

The body is buffered here (to fingerprint it) only for a request that may run: a read token's POST
passes straight on to the route, whose guard refuses it before anything reads the body, and a body
over the app's `request_max_body_size` is a 413 from its Content-Length, or as soon as the bytes
read pass the cap. A route that streams its body (`opt={STREAMED_BODY: True}`, the contact import:
any size, never buffered) is passed on unread and keeps its own keys.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

from litestar.middleware.base import DefineMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from api_service.problems import send_problem

HEADER = b"idempotency-key"
MAX_KEY_LENGTH = 255
KEPT_HOURS = 24  # a key may be reused for another request after this
ABANDONED_AFTER_S = 300  # a first request without an answer this long ago died with its replica
PURGE_CHANCE = 0.01  # share of new keys after which the tenant's expired keys are deleted
NOT_KEPT = frozenset({401, 403, 429})  # refusals: the key stays free for the request once allowed
STREAMED_BODY = "crier_streamed_body"  # a route handler `opt` key: its body is streamed, not buffered here


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = _header(scope, HEADER) if scope["type"] == "http" and scope["method"] == "POST" else None
        user = scope.get("user")
        handler = scope.get("route_handler")
        if key is None or user is None or (handler is not None and handler.opt.get(STREAMED_BODY)):
            await self.app(scope, receive, send)
            return
        if not user.can_write:  # refused by the route's guard, unread: nothing to buffer or keep
            await self.app(scope, receive, send)
            return
        if not key or len(key) > MAX_KEY_LENGTH:
            await _problem(send, 422, "Idempotency-Key", f"must be 1 to {MAX_KEY_LENGTH} characters")
            return
        try:
            body = await _read_body(scope, receive)
        except _ClientGone:  # nothing to answer, and a cut-off body must not run nor take the key
            return
        if body is None:
            await send_problem(send, 413, f"the request body is larger than {_max_body(scope)} bytes")
            return
        fingerprint = fingerprint_of(scope["path"], body)
        pool = scope["app"].state.services.pool
        async with pool.acquire() as con:
            # A key is free again once it expired, or when its first request was abandoned in
            # flight (the replica died before storing an answer).
            claimed = await con.fetchval(
                f"""INSERT INTO idempotency_keys (tenant_id, token_id, key, fingerprint) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (tenant_id, token_id, key) DO UPDATE
                       SET fingerprint = EXCLUDED.fingerprint, status_code = NULL, content_type = NULL,
                           body = NULL, created_at = now()
                       WHERE idempotency_keys.created_at < now() - interval '{KEPT_HOURS} hours'
                          OR (idempotency_keys.status_code IS NULL
                              AND idempotency_keys.created_at < now() - interval '{ABANDONED_AFTER_S} seconds')
                   RETURNING true""",
                user.tenant_id, user.token_id, key, fingerprint,
            )
            stored = None if claimed else await con.fetchrow(
                "SELECT * FROM idempotency_keys WHERE tenant_id = $1 AND token_id = $2 AND key = $3",
                user.tenant_id, user.token_id, key,
            )
        if stored is not None:
            await _replay(send, stored, fingerprint)
            return
        if random.random() < PURGE_CHANCE:  # now and then, rather than a housekeeping task of its own
            async with pool.acquire() as con:
                await con.execute(
                    f"DELETE FROM idempotency_keys WHERE tenant_id = $1 AND created_at < now() - interval '{KEPT_HOURS} hours'",
                    user.tenant_id,
                )
        await self._first(scope, body, send, pool, (user.tenant_id, user.token_id, key))

    async def _first(self, scope: Scope, body: bytes, send: Send, pool: Any, ident: tuple[Any, Any, str]) -> None:
        sent_body = False

        async def replay_receive() -> Message:
            nonlocal sent_body
            if sent_body:
                return {"type": "http.disconnect"}
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}

        status, content_type, chunks = 500, None, []

        async def capture(message: Message) -> None:
            nonlocal status, content_type
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = next((v.decode() for k, v in message.get("headers", []) if k == b"content-type"), None)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_receive, capture)
        finally:
            async with pool.acquire() as con:
                if status >= 500 or status in NOT_KEPT:  # not kept: a retry runs the command again
                    await con.execute(
                        "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND token_id = $2 AND key = $3", *ident
                    )
                else:
                    await con.execute(
                        """UPDATE idempotency_keys SET status_code = $4, content_type = $5, body = $6
                           WHERE tenant_id = $1 AND token_id = $2 AND key = $3""",
                        *ident, status, content_type, b"".join(chunks),
                    )


class _ClientGone(Exception):
    pass


def _max_body(scope: Scope) -> int | None:
    """The cap Litestar applies when a handler reads the body (the route's, else the app's)."""
    handler = scope.get("route_handler")
    if handler is not None:
        return handler.resolve_request_max_body_size()
    return scope["app"].request_max_body_size


async def _read_body(scope: Scope, receive: Receive) -> bytes | None:
    """The whole body, or None as soon as it is known to pass the cap (declared or read so far)."""
    cap = _max_body(scope)
    if cap is not None:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return None
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if cap is not None and size > cap:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def fingerprint_of(path: str, body: bytes) -> str:
    """What makes two requests with one key "the same request"."""
    return hashlib.sha256(b"POST " + path.encode() + b"\n" + body).hexdigest()


async def _replay(send: Send, stored: Any, fingerprint: str) -> None:
    if stored["fingerprint"] != fingerprint:
        await _problem(send, 422, "Idempotency-Key", "was used for a different request")
        return
    if stored["status_code"] is None:
        await _problem(send, 409, "Idempotency-Key", "the first request with this key is still being processed")
        return
    headers = [(b"idempotent-replayed", b"true")]
    if stored["content_type"]:
        headers.append((b"content-type", stored["content_type"].encode()))
    await send({"type": "http.response.start", "status": stored["status_code"], "headers": headers})
    await send({"type": "http.response.body", "body": bytes(stored["body"] or b"")})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1").strip()
    return None


async def _problem(send: Send, status: int, field: str, reason: str) -> None:
    await send_problem(send, status, f"{field}: {reason}", errors=[{"field": field, "reason": reason}])


def idempotency_middleware() -> DefineMiddleware:
    return DefineMiddleware(IdempotencyMiddleware)
