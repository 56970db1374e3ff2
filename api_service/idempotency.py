"""`Idempotency-Key` on POST: the first response to a key is stored and replayed to every retry.

A pure ASGI middleware behind authentication (keys are per tenant). A retry with the same key and
another request is a 422; a retry while the first request is still running is a 409. Responses of
5xx are not kept, so a retry after a server error runs the command again (which the deciders make
harmless: commands are idempotent).
"""
from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from litestar.middleware.base import DefineMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"idempotency-key"
MAX_KEY_LENGTH = 255
KEPT_HOURS = 24  # a key may be reused for another request after this
ABANDONED_AFTER_S = 300  # a first request without an answer this long ago died with its replica
PURGE_CHANCE = 0.01  # share of new keys after which the tenant's expired keys are deleted


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = _header(scope, HEADER) if scope["type"] == "http" and scope["method"] == "POST" else None
        user = scope.get("user")
        if key is None or user is None:
            await self.app(scope, receive, send)
            return
        if not key or len(key) > MAX_KEY_LENGTH:
            await _problem(send, 422, "Idempotency-Key", f"must be 1 to {MAX_KEY_LENGTH} characters")
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        fingerprint = fingerprint_of(scope["path"], body)
        pool = scope["app"].state.services.pool
        async with pool.acquire() as con:
            # A key is free again once it expired, or when its first request was abandoned in
            # flight (the replica died before storing an answer).
            claimed = await con.fetchval(
                f"""INSERT INTO idempotency_keys (tenant_id, key, fingerprint) VALUES ($1, $2, $3)
                   ON CONFLICT (tenant_id, key) DO UPDATE
                       SET fingerprint = EXCLUDED.fingerprint, status_code = NULL, content_type = NULL,
                           body = NULL, created_at = now()
                       WHERE idempotency_keys.created_at < now() - interval '{KEPT_HOURS} hours'
                          OR (idempotency_keys.status_code IS NULL
                              AND idempotency_keys.created_at < now() - interval '{ABANDONED_AFTER_S} seconds')
                   RETURNING true""",
                user.tenant_id, key, fingerprint,
            )
            stored = None if claimed else await con.fetchrow(
                "SELECT * FROM idempotency_keys WHERE tenant_id = $1 AND key = $2", user.tenant_id, key
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
        await self._first(scope, body, send, pool, user.tenant_id, key)

    async def _first(self, scope: Scope, body: bytes, send: Send, pool: Any, tenant_id: Any, key: str) -> None:
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
                if status >= 500:  # not kept: a retry runs the command again
                    await con.execute("DELETE FROM idempotency_keys WHERE tenant_id = $1 AND key = $2", tenant_id, key)
                else:
                    await con.execute(
                        """UPDATE idempotency_keys SET status_code = $3, content_type = $4, body = $5
                           WHERE tenant_id = $1 AND key = $2""",
                        tenant_id, key, status, content_type, b"".join(chunks),
                    )


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
    title = {409: "Conflict", 422: "Unprocessable Entity"}[status]
    body = json.dumps({
        "type": "about:blank", "title": title, "status": status, "detail": f"{field}: {reason}",
        "errors": [{"field": field, "reason": reason}],
    }).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/problem+json")]})
    await send({"type": "http.response.body", "body": body})


def idempotency_middleware() -> DefineMiddleware:
    return DefineMiddleware(IdempotencyMiddleware)
