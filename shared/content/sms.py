"""How many SMS segments a text takes, and in which encoding (what a provider bills)."""
from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = ["SmsSegments", "count_segments"]

# GSM 03.38 basic character set (3GPP TS 23.038, 6.2.1): one septet each. 0x1B is the escape to
# the extension table, not a character, so it is left out.
_GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# The extension table: sent as escape + character, two septets each (form feed is in it too).
_GSM_EXTENSION = frozenset("^{}\\[~]|€\f")

# A single message carries 140 bytes: 160 septets or 70 UTF-16 code units. A concatenated
# message loses 6 bytes of each segment to the user data header that numbers the parts: 153
# septets or 67 code units.
_SINGLE = {"GSM-7": 160, "UCS-2": 70}
_CONCATENATED = {"GSM-7": 153, "UCS-2": 67}


class SmsSegments(NamedTuple):
    """`characters` are code points as a person counts them; `units` what the encoding counts
    (septets for GSM-7, UTF-16 code units for UCS-2)."""

    encoding: Literal["GSM-7", "UCS-2"]
    characters: int
    units: int
    segments: int


def _unit_costs(text: str) -> tuple[Literal["GSM-7", "UCS-2"], list[int]]:
    """The encoding and what each character costs in it."""
    costs = []
    for char in text:
        if char in _GSM_BASIC:
            costs.append(1)
        elif char in _GSM_EXTENSION:
            costs.append(2)
        else:  # one character outside GSM 03.38 sends the whole text as UCS-2
            return "UCS-2", [2 if ord(char) > 0xFFFF else 1 for char in text]
    return "GSM-7", costs


def count_segments(text: str) -> SmsSegments:
    """The encoding, length and segment count of `text` sent as one SMS (0 segments if empty)."""
    encoding, costs = _unit_costs(text)
    units = sum(costs)
    if units == 0:
        segments = 0
    elif units <= _SINGLE[encoding]:
        segments = 1
    else:
        # Filled the way phones and providers split: a character whose units do not fit in what
        # is left of a segment (a surrogate pair, an escape + extension character) starts the next
        # one, so a segment may end a unit short and the count can exceed ceil(units / 153).
        size = _CONCATENATED[encoding]
        segments, used = 1, 0
        for cost in costs:
            if used + cost > size:
                segments, used = segments + 1, 0
            used += cost
    return SmsSegments(encoding, len(text), units, segments)
