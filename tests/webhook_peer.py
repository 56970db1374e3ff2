"""A local webhook receiver (stdlib ThreadingHTTPServer on 127.0.0.1, in a thread of the test
process) that checks every request the Standard Webhooks way, with the standardwebhooks package a
real receiver would use, and records what it accepts.

    with WebhookPeer(fail_transiently=1) as peer:
        ... send through peer.provider_config()
        assert peer.received[0].body["data"]["payload"] == {...}

A bad or missing signature, or a timestamp more than 5 minutes off, is a 401 and not recorded.
The server and its bookkeeping are tests/http_peer.py's. Run `python -m tests.webhook_peer --port
8098` for a standalone receiver that prints its provider config, then one JSON line per delivery.
"""
from __future__ import annotations

import binascii
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from shared.channels.webhook import new_secret
from tests.http_peer import KEEP, Answer, HttpPeer, argument_parser, serve

TOLERANCE_S = 5 * 60  # Standard Webhooks: refuse a timestamp further off than this (replays)
PATH = "/hooks/crier"


@dataclass(frozen=True)
class Delivery:
    """One request the peer accepted (answered 2xx)."""

    id: str  # webhook-id
    timestamp: int  # webhook-timestamp
    body: Any  # the JSON body, parsed
    raw: bytes
    headers: dict[str, str]  # names in lower case
    path: str
    at: float = field(default_factory=time.time)


class WebhookPeer(HttpPeer[Delivery]):
    """Behaviour, checked in this order for a request whose signature verifies:
    - `gone_after=n` → the first n requests are answered as usual, every later one is a 410;
    - `status_for={webhook_id: status}` → that status for that id, every time;
    - `rate_limit=n` → 429 (`Retry-After: retry_after`) for the next n requests;
    - `fail_transiently=n` → 500 for the next n requests;
    - `redirect="/elsewhere"` → 307 to it for every request (a request that follows it is counted
      in `requests` like any other);
    else 200 and recorded. `delay` seconds are spent on each request after it was taken (an
    accepted one is recorded first) and before it is answered. Change it while running with
    `configure(...)`. Its recipients (received_by, attempts) are webhook-ids."""

    name = "webhook"
    recorded = "deliveries"
    recipient = "id"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        secret: str | None = None,
        gone_after: int | None = None,
        status_for: dict[str, int] | None = None,
        rate_limit: int = 0,
        retry_after: str = "1",
        fail_transiently: int = 0,
        redirect: str | None = None,
        delay: float = 0.0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.secret = secret or new_secret()
        self._verifier = Webhook(self.secret)
        self._ids: list[str] = []  # the webhook-id of every request that verified, in order
        self._refused: list[str] = []  # why each request that did not verify was refused
        self._duplicates = 0
        self.configure(gone_after=gone_after, status_for=status_for or {}, rate_limit=rate_limit,
                       retry_after=retry_after, fail_transiently=fail_transiently, redirect=redirect, delay=delay)

    def configure(
        self,
        *,
        gone_after: int | None | EllipsisType = KEEP,  # None: never gone
        status_for: dict[str, int] | EllipsisType = KEEP,
        rate_limit: int | EllipsisType = KEEP,
        retry_after: str | EllipsisType = KEEP,
        fail_transiently: int | EllipsisType = KEEP,
        redirect: str | None | EllipsisType = KEEP,  # None: no redirect
        delay: float | EllipsisType = KEEP,
    ) -> None:
        """Changes what is given; the rest stays as it is."""
        self._set(gone_after=gone_after, _status_for=status_for, _rate_limit=rate_limit, retry_after=retry_after,
                  _fail_transiently=fail_transiently, redirect=redirect, delay=delay)

    @property
    def url(self) -> str:
        return f"{self.base_url}{PATH}"

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """A webhook provider config that reaches this peer (plain http, which needs allow_insecure)."""
        return {"url": self.url, "secret": self.secret, "allow_insecure": True, "timeout_s": 10.0, **overrides}

    # -- what was received -------------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)

    @property
    def refused(self) -> list[str]:
        """Why each request that failed verification was refused (401)."""
        with self._lock:
            return list(self._refused)

    @property
    def duplicates(self) -> int:
        """Accepted deliveries whose webhook-id an earlier accepted one had (what a receiver drops)."""
        with self._lock:
            return self._duplicates

    def clear(self) -> None:
        super().clear()
        with self._lock:
            self._ids.clear()
            self._refused.clear()
            self._duplicates = 0

    # -- called on the peer's threads --------------------------------------------------------------

    def verify(self, raw: bytes, headers: dict[str, str]) -> str | None:
        """Why this request is not authentic, or None."""
        stamp = headers.get("webhook-timestamp", "")
        try:
            if abs(time.time() - int(stamp)) > TOLERANCE_S:
                return "timestamp outside the tolerance"
        except ValueError:
            return "no webhook-timestamp"
        try:
            self._verifier.verify(raw, headers)
        except WebhookVerificationError as exc:
            return str(exc)
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:  # a malformed signature header or body
            return f"malformed: {type(exc).__name__}"
        return None

    def answer(self, path: str, headers: Any, raw: bytes, number: int) -> Answer:
        """As a Standard Webhooks receiver would answer it."""
        headers = {k.lower(): v for k, v in headers.items()}
        if (why := self.verify(raw, headers)) is not None:
            with self._lock:
                self._refused.append(why)
            return 401, {"error": "invalid signature", "detail": why}, {}
        webhook_id, stamp = headers["webhook-id"], int(headers["webhook-timestamp"])
        with self._lock:
            self._ids.append(webhook_id)
            self._attempt(webhook_id)
            if self.gone_after is not None and number > self.gone_after:
                return 410, {"error": "this endpoint was removed"}, {}
            if webhook_id in self._status_for:
                status = self._status_for[webhook_id]
                return status, {"error": f"told to answer {status}"}, {}
            if self._rate_limit > 0:
                self._rate_limit -= 1
                return 429, {"error": "slow down"}, {"Retry-After": self.retry_after}
            if self._fail_transiently > 0:
                self._fail_transiently -= 1
                return 500, {"error": "internal error"}, {}
            if self.redirect is not None:
                return 307, {}, {"Location": self.redirect}
            self._duplicates += any(d.id == webhook_id for d in self._received)
            self._received.append(Delivery(id=webhook_id, timestamp=stamp, body=json.loads(raw), raw=raw,
                                           headers=headers, path=path))
        return 200, {"ok": True}, {}


@pytest.fixture
def webhook_peer() -> Iterator[WebhookPeer]:
    """A started peer with no failures configured; reconfigure it with `webhook_peer.configure(...)`."""
    with WebhookPeer() as peer:
        yield peer


def main() -> None:
    parser = argument_parser("a recording Standard Webhooks receiver: prints one JSON line per delivery", 8098)
    parser.add_argument("--secret", help="the whsec_ signing secret (default: a new one, printed)")
    args = parser.parse_args()
    peer = WebhookPeer(host=args.host, port=args.port, secret=args.secret, delay=args.delay).start()
    ids: set[str] = set()

    def line(d: Delivery) -> dict[str, Any]:
        shown = {"id": d.id, "timestamp": d.timestamp, "duplicate": d.id in ids, "body": d.body}
        ids.add(d.id)
        return shown

    serve(peer, line)


if __name__ == "__main__":
    main()
