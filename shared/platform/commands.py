"""The service layer's command handler: load a stream, fold it, decide, append with the expected
version, and update the inline views, all on one connection in one transaction (one trip)."""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
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
R = TypeVar("R")

_MAX_ATTEMPTS = 8


class Decider(msgspec.Struct, Generic[S, C], frozen=True):
    """An aggregate's pure parts, bundled so one handler serves every aggregate."""

    event_union: Any
    initial: S
    evolve: Callable[[S, Any], S]
    decide: Callable[[C, S], list[Any]]


class Outcome(msgspec.Struct, Generic[S], frozen=True):
    state: S
    events: list[RecordedEvent]  # empty when the commands had already taken effect
    version: int


async def load(con: asyncpg.Connection, decider: Decider[S, Any], stream: str) -> tuple[S, int]:
    state = decider.initial
    recorded = await eventstore.read_stream(con, stream)
    for r in recorded:
        state = decider.evolve(state, codec.from_recorded(r, decider.event_union))
    return state, len(recorded)


async def decide_and_append(
    con: asyncpg.Connection,
    decider: Decider[S, C],
    stream: str,
    state: S,
    version: int,
    commands: Sequence[C],
    metadata: dict[str, Any],
    inline: Sequence[Projection] = (),
) -> Outcome[S]:
    """Decide each command on the state the ones before it left, append all their events at once
    (after `version`), and fold them into the inline views, in the caller's transaction."""
    new: list[Any] = []
    for command in commands:
        decided = decider.decide(command, state)
        for event in decided:
            state = decider.evolve(state, event)
        new += decided
    if not new:
        return Outcome(state, [], version)
    recorded = await eventstore.append(
        con, stream, [codec.to_new_event(e, metadata) for e in new], expected_version=version
    )
    for projection in inline:
        for r in recorded:
            if projection.categories is None or r.category in projection.categories:
                await projection.apply(con, r)
    return Outcome(state, recorded, version + len(recorded))


async def handle_in(
    con: asyncpg.Connection,
    decider: Decider[S, C],
    stream: str,
    command: C,
    metadata: dict[str, Any],
    inline: Sequence[Projection] = (),
) -> Outcome[S]:
    """Load, decide and append in the caller's open transaction (which owns any retry)."""
    state, version = await load(con, decider, stream)
    return await decide_and_append(con, decider, stream, state, version, [command], metadata, inline)


async def in_one_trip(pool: asyncpg.Pool, trip: Callable[[asyncpg.Connection], Awaitable[R]]) -> R:
    """Run `trip` on one connection in one transaction; when a concurrent writer appended to the
    same stream first, run it again on fresh state."""
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            async with pool.acquire() as con, con.transaction():
                return await trip(con)
        except WrongExpectedVersion:
            if attempt == _MAX_ATTEMPTS:
                raise
            log.debug("concurrent write, deciding again", attempt=attempt)
    raise AssertionError("unreachable")


async def handle(
    pool: asyncpg.Pool,
    decider: Decider[S, C],
    stream: str,
    command: C,
    metadata: dict[str, Any],
    inline: Sequence[Projection] = (),
) -> Outcome[S]:
    """Decide and append in a transaction of its own, again on fresh state after a concurrent write."""
    return await in_one_trip(pool, lambda con: handle_in(con, decider, stream, command, metadata, inline))
