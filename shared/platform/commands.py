"""The service layer's command handler: load a stream, fold it, decide, append with the expected
version, and update the inline views in the same transaction."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import asyncpg
import msgspec

from shared.platform import codec, eventstore
from shared.platform.eventstore import RecordedEvent, WrongExpectedVersion
from shared.platform.logging import get_logger
from shared.platform.projections import Projection

log = get_logger(__name__)
S = TypeVar("S")
C = TypeVar("C")

_MAX_ATTEMPTS = 8


class Decider(msgspec.Struct, Generic[S, C], frozen=True):
    """An aggregate's pure parts, bundled so one handler serves every aggregate."""

    event_union: Any
    initial: S
    evolve: Callable[[S, Any], S]
    decide: Callable[[C, S], list[Any]]


class Outcome(msgspec.Struct, Generic[S], frozen=True):
    state: S
    events: list[RecordedEvent]  # empty when the command had already taken effect
    version: int


async def load(con: asyncpg.Connection, decider: Decider[S, Any], stream: str) -> tuple[S, int]:
    state = decider.initial
    recorded = await eventstore.read_stream(con, stream)
    for r in recorded:
        state = decider.evolve(state, codec.from_recorded(r, decider.event_union))
    return state, len(recorded)


async def handle(
    pool: asyncpg.Pool,
    decider: Decider[S, C],
    stream: str,
    command: C,
    metadata: dict[str, Any],
    inline: Sequence[Projection] = (),
    *,
    con: asyncpg.Connection | None = None,
) -> Outcome[S]:
    """Decide and append; on a concurrent writer, fold again and re-decide on fresh state.

    With `con`, runs in the caller's open transaction (and does not retry: the caller owns it).
    """
    if con is not None:
        return await _attempt(con, decider, stream, command, metadata, inline)
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            async with pool.acquire() as c, c.transaction():
                return await _attempt(c, decider, stream, command, metadata, inline)
        except WrongExpectedVersion:
            if attempt == _MAX_ATTEMPTS:
                raise
            log.debug("concurrent write, deciding again", stream=stream, attempt=attempt)
    raise AssertionError("unreachable")


async def _attempt(
    con: asyncpg.Connection,
    decider: Decider[S, C],
    stream: str,
    command: C,
    metadata: dict[str, Any],
    inline: Sequence[Projection],
) -> Outcome[S]:
    state, version = await load(con, decider, stream)
    new = decider.decide(command, state)
    if not new:
        return Outcome(state, [], version)
    recorded = await eventstore.append(
        con, stream, [codec.to_new_event(e, metadata) for e in new], expected_version=version
    )
    for event in new:
        state = decider.evolve(state, event)
    for projection in inline:
        for r in recorded:
            if projection.categories is None or r.category in projection.categories:
                await projection.apply(con, r)
    return Outcome(state, recorded, version + len(recorded))
