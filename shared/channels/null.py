"""The null provider: every message succeeds and nothing leaves the process (load tests, dry runs)."""
from __future__ import annotations

from typing import Any

from shared.channels.provider import WITHDRAWN, Commit, OutgoingMessage, SendResult


class NullProvider:
    dedupes = True  # no side effects: a resend cannot reach anyone twice

    def __init__(self, config: dict[str, Any] | None = None, *, allow_private_networks: bool = False) -> None:
        self.sent = 0

    async def open(self) -> None:
        pass

    async def send(self, messages: list[OutgoingMessage], commit: Commit | None = None) -> list[SendResult]:
        if commit is None:  # the fast path the workers take: null dedupes, so nothing is committed
            self.sent += len(messages)
            return [SendResult(contact_id=m.contact_id, ok=True, provider_message_id=m.idempotency_key)
                    for m in messages]
        results = []
        for m in messages:
            if await commit(m):
                self.sent += 1
                results.append(SendResult(contact_id=m.contact_id, ok=True, provider_message_id=m.idempotency_key))
            else:
                results.append(SendResult(contact_id=m.contact_id, ok=False, error="withdrawn", failure=WITHDRAWN))
        return results

    async def close(self) -> None:
        pass
