"""Which language variant of a text a contact gets, from their BCP 47 locale."""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable

__all__ = ["choose_locale", "fallback_chain"]


def _subtags(tag: str) -> list[str]:
    return [subtag for subtag in tag.strip().replace("_", "-").lower().split("-") if subtag]


@lru_cache(maxsize=4096)
def fallback_chain(locale: str) -> tuple[str, ...]:
    """The tags to try for `locale`, most specific first, lowercased: `zh-Hant-TW` gives
    ("zh-hant-tw", "zh-hant", "zh"). RFC 4647 lookup: drop the last subtag each time, and a
    single-letter subtag (an extension's `u-`, a private use `x-`) with what follows it, since it
    means nothing alone. POSIX spellings (`de_AT`) count as `de-AT`.

    Cached: a broadcast asks for the same few locales once per recipient."""
    subtags = _subtags(locale)
    chain = []
    while subtags:
        chain.append("-".join(subtags))
        subtags.pop()
        while subtags and len(subtags[-1]) == 1:
            subtags.pop()
    return tuple(chain)


def choose_locale(locale: str | None, available: Iterable[str]) -> str | None:
    """The key of `available` that best fits a contact's `locale`, spelled as in `available`:
    the locale itself (any case), then ever shorter prefixes of it (`de-AT` -> `de`). None when
    nothing fits or the contact has no locale: the caller uses the default text. A more specific
    variant never answers a less specific locale (`pt` does not get `pt-BR`): it is a guess."""
    if not locale:
        return None
    keys: dict[str, str] = {}
    for key in available:
        keys.setdefault("-".join(_subtags(key)), key)  # of two spellings of one tag, the first wins
    for tag in fallback_chain(locale):
        if tag in keys:
            return keys[tag]
    return None
