"""Which of a broadcast's channels a recipient gets, by the broadcast's channel policy.

The planner applies the same rule in SQL (sender_service.planner); this is the rule for the preview
and test sends, and the statement of it the tests check both against.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class ChannelChoice(NamedTuple):
    chosen: tuple[str, ...]  # sent on, in the broadcast's order
    skipped: tuple[str, ...]  # no address on them, and the policy would have used them


def choose_channels(channels: tuple[str, ...], policy: str, addresses: Mapping[str, str | None]) -> ChannelChoice:
    """`all`: every channel with an address; the others are skipped. `first_available`: the first
    channel with an address; those before it are skipped (all of them when none has one)."""
    chosen: list[str] = []
    skipped: list[str] = []
    for channel in channels:
        if addresses.get(channel):
            chosen.append(channel)
            if policy == "first_available":
                break
        else:
            skipped.append(channel)
    return ChannelChoice(tuple(chosen), tuple(skipped))
