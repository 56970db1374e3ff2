"""Several providers for one channel of a run (a broadcast's `provider_ids`): which of them sends a
batch, and which the batch goes on with when that one fails.

Load is shared by each provider's `weight` (its config; 1 when not set): batch `seq` goes first to
the provider whose share of [0, 1) holds frac(seq * g), g the golden ratio's fraction. That
sequence is spread as evenly as any over [0, 1), so any run of consecutive batches splits close to
the weights (not only the whole run), and a redelivered batch goes where it went first. Nothing is
shared between senders to do it: the batch number is all it takes.

A provider that fails (it cannot be reached, its TLS or login is refused: nothing was handed over,
FAIL_OVER_FAILURES) is skipped by this sender for SKIP_S, its batches going to the next provider
in the pool, so one down SMTP server costs one refused connection per sender, not one per batch.
Another sender finds it failing on its own the same way; after SKIP_S it is tried again.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from shared.channels.provider import (
    AUTH_FAILED,
    REFUSED_PRIVATE_ADDRESS,
    TLS_FAILED,
    TLS_UNAVAILABLE,
    UNREACHABLE,
)

# Failures that say the provider, not the message, is the trouble, and that nothing was handed
# over: the message can go to another provider of the pool without a chance of arriving twice.
FAIL_OVER_FAILURES = frozenset({UNREACHABLE, TLS_FAILED, TLS_UNAVAILABLE, AUTH_FAILED, REFUSED_PRIVATE_ADDRESS})
SKIP_S = 30.0
_GOLDEN = 0.6180339887498949  # (sqrt(5) - 1) / 2


def first_choice(seq: int, weights: Sequence[int]) -> int:
    """The index of the provider batch `seq` goes to first, by `weights` (each at least 1)."""
    point = (seq * _GOLDEN) % 1.0 * sum(weights)
    for i, weight in enumerate(weights):
        point -= weight
        if point < 0:
            return i
    return len(weights) - 1  # float rounding at the very end of the range


def order(seq: int, pool: Sequence[uuid.UUID], weights: Sequence[int], failing: set[uuid.UUID]) -> list[uuid.UUID]:
    """The pool's providers in the order batch `seq` tries them: its weighted choice, then the
    others in the pool's order after it; those known to be failing go last (tried only when every
    other failed too)."""
    start = first_choice(seq, weights)
    turn = list(pool[start:]) + list(pool[:start])
    return [p for p in turn if p not in failing] + [p for p in turn if p in failing]


class FailingProviders:
    """The providers this sender saw fail, each skipped until SKIP_S after its failure."""

    def __init__(self, clock=time.monotonic) -> None:
        self._until: dict[uuid.UUID, float] = {}
        self._clock = clock

    def mark(self, provider_id: uuid.UUID) -> None:
        self._until[provider_id] = self._clock() + SKIP_S

    def clear(self, provider_id: uuid.UUID) -> None:
        self._until.pop(provider_id, None)

    def now(self) -> set[uuid.UUID]:
        """The providers to skip now (those whose time is up are forgotten)."""
        now = self._clock()
        for provider_id in [p for p, until in self._until.items() if until <= now]:
            del self._until[provider_id]
        return set(self._until)
