"""What a delivery receipt does to a ledger row: pure, no I/O.

A message the provider took is `sent`; its receipts then move it on, never back:

    sent ─▶ delivered ─▶ read
      │         │          │
      ├─────────┴──▶ bounced          (terminal)
      └─────────┴──────────┴──▶ complained   (terminal)

- `delivered` moves only a `sent` message; `read` a `sent` or `delivered` one (a read message was
  delivered: `delivered_at` is set too if it was not).
- `bounced` moves a `sent` or `delivered` one (a bounce after a delivery report is the later, final
  word; a `read` message did arrive, so a bounce after it changes nothing).
- `complained` moves any of `sent`, `delivered`, `read` (a complaint also proves delivery).
- `bounced` and `complained` are final: nothing moves them, so a `delivered` that comes after a
  bounce (out of order, or replayed) does not undo it.

The same receipt twice changes nothing the second time (so a replay counts once), and
`delivered` and `read` end at `read` in whichever order they come.

Every status here counts as `sent` wherever the ledger is read for "was it handed over"
(HANDED_OVER): the send counters (broadcast_counters) never move on a receipt, and a top-up
never sends a delivered or bounced message again.
"""
from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

# Ledger statuses of a message the provider took: `sent`, and what its receipts made of it.
HANDED_OVER: tuple[str, ...] = ("sent", "delivered", "read", "bounced", "complained")
TERMINAL = frozenset({"bounced", "complained"})
ReceiptStatus = Literal["delivered", "read", "bounced", "complained"]
RECEIPT_STATUSES: tuple[str, ...] = ("delivered", "read", "bounced", "complained")
ERROR_CHARS = 300  # as the senders cut a provider's error for the ledger

# From which statuses each receipt moves a message (see the module's docstring).
_MOVES_FROM: dict[str, frozenset[str]] = {
    "delivered": frozenset({"sent"}),
    "read": frozenset({"sent", "delivered"}),
    "bounced": frozenset({"sent", "delivered"}),
    "complained": frozenset({"sent", "delivered", "read"}),
}


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """One provider status, in Crier's words. `hard`: the address will never take a message (a hard
    bounce, a number that does not exist), so it is suppressed; `error` goes to the ledger."""

    provider_message_id: str
    status: ReceiptStatus
    at: datetime
    error: str | None = None
    hard: bool = False


class LedgerState(msgspec.Struct, frozen=True, kw_only=True):
    """The parts of a ledger row a receipt may change."""

    status: str
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    error: str | None = None


class Moved(msgspec.Struct, frozen=True, kw_only=True):
    """What a row's receipts did: its new state, the engagement counters to add (each 0 or 1: a
    message counts once), and what to suppress."""

    state: LedgerState
    delivered: int = 0
    read: int = 0
    bounced: int = 0
    complained: int = 0
    suppress: Literal["bounced", "complained"] | None = None


def step(state: LedgerState, receipt: Receipt) -> LedgerState:
    """The state after one receipt (the same state when it does not move the message)."""
    if state.status not in _MOVES_FROM[receipt.status]:
        return state
    at = receipt.at
    if receipt.status == "delivered":
        return msgspec.structs.replace(state, status="delivered", delivered_at=state.delivered_at or at)
    if receipt.status == "read":
        return msgspec.structs.replace(state, status="read", delivered_at=state.delivered_at or at,
                                       read_at=state.read_at or at)
    if receipt.status == "complained":
        return msgspec.structs.replace(state, status="complained", delivered_at=state.delivered_at or at)
    error = (receipt.error or ("bounced (hard)" if receipt.hard else "bounced"))[:ERROR_CHARS]
    return msgspec.structs.replace(state, status="bounced", error=error)


def fold(state: LedgerState, receipts: list[Receipt]) -> Moved | None:
    """A row's receipts (in the order they came) applied to it; None when nothing changed."""
    if state.status not in HANDED_OVER:
        return None  # not handed over (failed, unknown ...): no receipt is applied to it
    suppress: Literal["bounced", "complained"] | None = None
    now = state
    for receipt in receipts:
        after = step(now, receipt)
        if after.status != now.status and after.status in TERMINAL:
            if after.status == "complained":
                suppress = "complained"
            elif receipt.hard:
                suppress = "bounced"
        now = after
    if now == state:
        return None
    return Moved(
        state=now,
        delivered=int(state.delivered_at is None and now.delivered_at is not None),
        read=int(state.read_at is None and now.read_at is not None),
        bounced=int(state.status != "bounced" and now.status == "bounced"),
        complained=int(state.status != "complained" and now.status == "complained"),
        suppress=suppress,
    )
