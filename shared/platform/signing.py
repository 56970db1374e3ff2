"""Signed codes (unsubscribe links): HMAC-SHA256 under rotating keys kept in Postgres.

A code is base64url (no padding) of `purpose | kid | fields | mac`: the purpose byte says what kind
of code it is, so a code of one kind never reads as another (each kind checks its own byte and
length, and the MAC covers both); the kid names the key, so keys can rotate while older codes keep
working; the MAC is HMAC-SHA256 truncated to 128 bits (RFC 2104 allows truncation to half the hash
and more; 2^128 guesses are out of anyone's reach). The standard library only: `hmac.digest` and
`hmac.compare_digest` verify; the signer computes the same HMAC from hashlib states (see `Signer`).

Keys live in `signing_keys`: the first is made on first use (`secrets.token_bytes(32)`), so every
API and sender process shares them with no configuration. The newest live key signs; every live
key verifies; `rotate_key` adds one and `retire_key` makes a key's codes stop working (retire one
only once the mail it signed is old enough: unsubscribe links must keep working for 30 days after
sending under CAN-SPAM, and people click links in older mail). The secrets are stored as plain
bytea (see migration 018).

An unsubscribe code carries the tenant, broadcast, contact and channel: 60 bytes, 80 characters.
Signing one costs about 1.5 µs and no I/O (`Signer`, built once per job); verifying needs the
key, cached per process by a `KeyRing`, which reloads when a code names a kid it does not know.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec

PURPOSE_UNSUBSCRIBE = 1  # purpose bytes: append only, never reuse one
PURPOSE_CLICK = 2
PURPOSE_OPEN = 3
# The channel byte of a code: the position in this tuple. Append only, never reorder.
CODE_CHANNELS = ("email", "sms", "whatsapp", "telegram", "push", "webhook")
_CHANNEL_BYTE = {name: i for i, name in enumerate(CODE_CHANNELS)}
MAC_BYTES = 16
MAX_KID = 65535  # a code carries the kid in two bytes
SECRET_BYTES = 32
# purpose (1) + kid (2) + channel (1) + tenant (16) + broadcast (16) + contact (8) + mac (16) = 60
# bytes: a multiple of 3, so its base64 has no padding and no spare bits (every character counts).
_UNSUBSCRIBE_BYTES = 44 + MAC_BYTES
UNSUBSCRIBE_CODE_CHARS = _UNSUBSCRIBE_BYTES * 4 // 3
_CODE = re.compile(rf"[A-Za-z0-9_-]{{{UNSUBSCRIBE_CODE_CHARS}}}")
# A tracking code (click or open): purpose (1) + kid (2) + tracking key (6) + contact (6) + link (3)
# + mac (15) = 33 bytes, 44 characters. The tracking key names a run's content on one channel
# (shared/tracking: tenant, broadcast, run, content version, channel), so the code stays short for
# SMS; a contact id fits 48 bits, a link number 24; an open is link 0.
#
# Its MAC: one HMAC-SHA512 covers four links of a message, `link` 4b to 4b + 3 (its "block" b): the
# MAC of link n is the (n mod 4)-th 15 bytes of HMAC-SHA512(key, TRACKING_DOMAIN | kid | tracking key
# | n div 4 | contact). Each is a 120-bit slice of a PRF's output over an input that names the
# message and the block, so a code for another message, block or slot cannot be made from the codes
# one has (a recipient can only trade its link 2's code for its link 3's, which it already got).
# The point is the price: a message with an open pixel and three links costs one HMAC, not four
# (signing was 4.4 of the 7.2 µs a tracked message took to render; a tracked 1M send 1.45x).
# The layout serves it too: the head (9 bytes), the contact (6), a link's number (3) and its MAC
# (15) are each whole base64 groups, and the block comes before the contact in the MAC's input, so
# a message's codes need one HMAC from a state made per block, one encoding of the contact with
# the digest, and a join per link of text made once (see TrackingLinks._maker).
TRACKING_MAC_BYTES = 15
_TRACKING_MAC_CHARS = TRACKING_MAC_BYTES * 4 // 3
_TRACKING_BYTES = 18 + TRACKING_MAC_BYTES
TRACKING_CODE_CHARS = _TRACKING_BYTES * 4 // 3
_TRACKING_CODE = re.compile(rf"[A-Za-z0-9_-]{{{TRACKING_CODE_CHARS}}}")
MAX_TRACKING_KEY = 2**48 - 1
MAX_TRACKED_CONTACT = 2**48 - 1
TRACKING_DOMAIN = b"\x02"  # first byte of every tracking MAC's input: not an unsubscribe code's (b"\x01")
_SLOTS = 4  # links per HMAC-SHA512 (64 bytes: four 15-byte MACs)
MAX_TRACKED_LINK = 2**24 - 1
_BLOCK_512 = 128
_b64encode = base64.urlsafe_b64encode
# The tracking MAC's SHA-512 states: CPython's own implementation where it has one (`_sha2` from
# 3.12, `_sha512` before), whose copy() is a memcpy; OpenSSL's copies a context through its EVP
# layer. An HMAC from copied states took 0.91 µs against 1.24 (equal digests: tested against hmac).
try:
    from _sha2 import sha512 as _sha512_states  # type: ignore[import-not-found]
except ImportError:
    try:
        from _sha512 import sha512 as _sha512_states  # type: ignore[import-not-found,no-redef]
    except ImportError:
        _sha512_states = hashlib.sha512  # type: ignore[assignment]
_URLSAFE = bytes.maketrans(b"+/", b"-_")  # what urlsafe_b64encode does after b2a_base64, inlined
_BLOCK = 64  # SHA-256's block size: HMAC pads the key to it


class Unsubscribe(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified unsubscribe code says."""

    tenant_id: uuid.UUID
    broadcast_id: uuid.UUID
    contact_id: int
    channel: str
    kid: int  # the key that signed it (the caller checks it is still live: `key_is_live`)


class Tracked(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified click or open code says (an open's link is 0)."""

    purpose: int  # PURPOSE_CLICK or PURPOSE_OPEN
    key: int  # the tracking key: the run's content on one channel
    contact_id: int
    link: int
    kid: int


class Signer:
    """Signs with one key and no I/O: build one per job (`KeyRing.signer`, `load_signer`), then
    `unsubscribe_links` once per job and its `url` per recipient.

    The MAC is RFC 2104's HMAC with the key's two padded blocks hashed once here, so a code costs
    two SHA-256 compressions on copies of those states: 0.6 µs against hmac.digest's 1.7 µs, which
    hashes the pads again each time (equal to hmac.digest, tested; verifying uses hmac itself)."""

    __slots__ = ("kid", "base_url", "_inner", "_outer", "_secret")

    def __init__(self, kid: int, secret: bytes, base_url: str = "") -> None:
        if not 1 <= kid <= MAX_KID:
            raise ValueError(f"kid must be 1 to {MAX_KID}, not {kid}")
        self.kid, self.base_url = kid, base_url.rstrip("/")
        key = (hashlib.sha256(secret).digest() if len(secret) > _BLOCK else secret).ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        self._secret = secret  # for the tracking MAC's own states (HMAC-SHA512)

    def unsubscribe_code(self, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, contact_id: int, channel: str) -> str:
        """The code of an unsubscribe link: 80 URL-safe characters."""
        return self.unsubscribe_links(tenant_id, broadcast_id, channel).code(contact_id)

    def unsubscribe_url(self, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, contact_id: int, channel: str) -> str:
        """`{base_url}/u/{code}`: the page (GET) and the RFC 8058 one-click target (POST)."""
        return self.unsubscribe_links(tenant_id, broadcast_id, channel).url(contact_id)

    def unsubscribe_links(self, tenant_id: uuid.UUID, broadcast_id: uuid.UUID, channel: str) -> UnsubscribeLinks:
        """The links of one job's recipients: what they share is done here, once."""
        if channel not in _CHANNEL_BYTE:
            raise ValueError(f"unknown channel {channel!r}; known: {', '.join(CODE_CHANNELS)}")
        prefix = (bytes((PURPOSE_UNSUBSCRIBE,)) + self.kid.to_bytes(2, "big") + bytes((_CHANNEL_BYTE[channel],))
                  + tenant_id.bytes + broadcast_id.bytes)
        inner = self._inner.copy()
        inner.update(prefix)
        return UnsubscribeLinks(_b64encode(prefix).decode(), f"{self.base_url}/u/", inner, self._outer)


    def tracking_links(self, key: int, *, urls: bool = False) -> TrackingLinks:
        """The click and open codes of one tracking key's recipients (see TrackingLinks); with
        `urls`, their whole URLs: `{base_url}/r/{code}` and `{base_url}/o/{code}`."""
        if not 1 <= key <= MAX_TRACKING_KEY:
            raise ValueError(f"tracking key must be 1 to {MAX_TRACKING_KEY}, not {key}")
        secret = hashlib.sha512(self._secret).digest() if len(self._secret) > _BLOCK_512 else self._secret
        padded = secret.ljust(_BLOCK_512, b"\0")
        head = self.kid.to_bytes(2, "big") + key.to_bytes(6, "big")
        inner = _sha512_states(bytes(b ^ 0x36 for b in padded))
        inner.update(TRACKING_DOMAIN + head)
        outer = _sha512_states(bytes(b ^ 0x5C for b in padded))
        click, opened = (_b64encode(bytes((purpose,)) + head).decode() for purpose in (PURPOSE_CLICK, PURPOSE_OPEN))
        if urls:
            click, opened = f"{self.base_url}/r/{click}", f"{self.base_url}/o/{opened}"
        return TrackingLinks(click, opened, inner, outer)


class TrackingLinks:
    """Click and open codes (or URLs) that share their tracking key. `maker` writes out a function
    making all of a message's at once: one HMAC-SHA512 per four links (see the MAC above), from an
    inner state that has the domain, kid, key and block in it already. About 2 µs for an email with
    three links and its pixel."""

    __slots__ = ("_click", "_open", "_inner", "_outer", "_makers", "html_safe")

    def __init__(self, click_head: str, open_head: str, inner: Any, outer: Any) -> None:
        self._click, self._open, self._inner, self._outer = click_head, open_head, inner, outer
        self._makers: dict[tuple[int, ...], Callable[[int], tuple[str, ...]]] = {}
        # Whether the URLs hold nothing HTML escapes (the codes never do; the base URL is the
        # operator's): a render may then write them as they are (CompiledContent.render_given).
        self.html_safe = not any(c in click_head + open_head for c in "&<>'\"")

    def codes(self, contact_id: int, links: Sequence[int]) -> list[str]:
        """The codes (or URLs) of `links` of the message to `contact_id`, in that order; link 0 is
        the open pixel's."""
        return list(self.maker(tuple(links))(contact_id))

    def maker(self, links: tuple[int, ...]) -> Callable[[int], tuple[str, ...]]:
        """`make(contact_id)`: the codes (or URLs) of `links` of the message to `contact_id`, in
        that order (a message's links are made by the million: a renderer keeps it per variant)."""
        make = self._makers.get(links)
        if make is None:
            make = self._maker(links)
            if len(self._makers) < 64:  # a run's messages share a handful of link sets (one per variant)
                self._makers[links] = make
        return make

    def _maker(self, links: tuple[int, ...]) -> Callable[[int], tuple[str, ...]]:
        """`make` written out for `links` (as the templates' fast path is): for a pixel and three
        links a loop over them cost 3.1 µs and the function written for them 2.2 µs; the layout
        above and CPython's own SHA-512 states took a fifth off that (2.6 -> 2.1 µs, measured side
        by side)."""
        if not links:  # a variant with nothing tracked in it
            return lambda contact_id: ()
        if not all(0 <= link <= MAX_TRACKED_LINK for link in links):
            raise ValueError(f"links are numbered 0 to {MAX_TRACKED_LINK}")
        blocks = list(dict.fromkeys(link >> 2 for link in links))
        namespace: dict[str, Any] = {"outer": self._outer, "b2a": binascii.b2a_base64, "URLSAFE": _URLSAFE,
                                     "HC": self._click, "HO": self._open}
        lines = ["def make(contact_id):", "    contact = contact_id.to_bytes(6, 'big')"]
        digests = []
        for b, block in enumerate(blocks):
            namespace[f"I{b}"] = inner = self._inner.copy()
            inner.update(block.to_bytes(3, "big"))
            lines.append(f"    i = I{b}.copy(); i.update(contact); o = outer.copy(); o.update(i.digest())")
            if b < len(blocks) - 1:  # each block's 60 bytes of MACs
                lines.append(f"    d{b} = o.digest()[:{_SLOTS * TRACKING_MAC_BYTES}]")
                digests.append(f"d{b}")
            else:  # the last one's whole digest: its 4 spare bytes make characters past the last MAC's
                digests.append("o.digest()")
        # The contact's 8 characters, then 20 per MAC (b2a's newline comes after all of them). Each
        # link's code is its head, the contact's characters, its number's (made here) and its MAC's.
        lines += [f"    t = b2a(contact + {' + '.join(digests)}).translate(URLSAFE).decode()", "    c = t[:8]"]
        made = []
        for n, link in enumerate(links):
            at = 8 + (blocks.index(link >> 2) * _SLOTS + (link & 3)) * _TRACKING_MAC_CHARS
            namespace[f"L{n}"] = _b64encode(link.to_bytes(3, "big")).decode()
            head, mac = "HC" if link else "HO", f"t[{at}:{at + _TRACKING_MAC_CHARS}]"
            made.append(f"f'{{{head}}}{{c}}{{L{n}}}{{{mac}}}'")  # one string, made at once
        lines.append(f"    return ({', '.join(made)},)")
        exec("\n".join(lines), namespace)  # noqa: S102 - our own source, of numbers only
        return namespace["make"]  # type: ignore[no-any-return]

    def click(self, contact_id: int, link: int) -> str:
        """The code of link `link` (1 and up) in the message to `contact_id`."""
        if link < 1:
            raise ValueError("links are numbered from 1 (0 is the open pixel)")
        return self.codes(contact_id, (link,))[0]

    def open(self, contact_id: int) -> str:
        return self.codes(contact_id, (0,))[0]


class UnsubscribeLinks:
    """Unsubscribe links that differ only in the contact. The 36 bytes they share are a whole number
    of base64 groups, so their text is made once, and fed once into a copy of the MAC's inner state:
    each link then hashes and encodes just the contact and its MAC (about 1 µs, against 2)."""

    __slots__ = ("_code_head", "_url_head", "_inner", "_outer")

    def __init__(self, code_head: str, base: str, inner: Any, outer: Any) -> None:
        self._code_head, self._url_head = code_head, base + code_head
        self._inner, self._outer = inner, outer

    def _tail(self, contact_id: int) -> str:
        contact = contact_id.to_bytes(8, "big")
        inner = self._inner.copy()
        inner.update(contact)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return _b64encode(contact + outer.digest()[:MAC_BYTES]).decode()

    def code(self, contact_id: int) -> str:
        return self._code_head + self._tail(contact_id)

    def url(self, contact_id: int) -> str:
        return self._url_head + self._tail(contact_id)


def unsubscribe_kid(code: str) -> int | None:
    """The kid an unsubscribe code names, or None if it is not shaped like one (nothing verified)."""
    if len(code) != UNSUBSCRIBE_CODE_CHARS or not _CODE.fullmatch(code):
        return None
    raw = base64.urlsafe_b64decode(code)
    if raw[0] != PURPOSE_UNSUBSCRIBE:
        return None
    return int.from_bytes(raw[1:3], "big")


def read_unsubscribe(code: str, secret: bytes) -> Unsubscribe | None:
    """The fields of an unsubscribe code signed with `secret`, or None: wrong shape, purpose, channel
    or MAC. The alphabet and length are checked first (the decoder would skip stray characters), and
    with no spare bits every other string decodes to other bytes, so any change to a code fails."""
    if len(code) != UNSUBSCRIBE_CODE_CHARS or not _CODE.fullmatch(code):
        return None
    raw = base64.urlsafe_b64decode(code)
    payload, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.digest(secret, payload, "sha256")[:MAC_BYTES]):
        return None
    if payload[0] != PURPOSE_UNSUBSCRIBE or payload[3] >= len(CODE_CHANNELS):
        return None
    return Unsubscribe(
        kid=int.from_bytes(payload[1:3], "big"), channel=CODE_CHANNELS[payload[3]],
        tenant_id=uuid.UUID(bytes=payload[4:20]), broadcast_id=uuid.UUID(bytes=payload[20:36]),
        contact_id=int.from_bytes(payload[36:44], "big"),
    )


def tracking_kid(code: str) -> int | None:
    """The kid a click or open code names, or None if it is not shaped like one (nothing verified)."""
    if len(code) != TRACKING_CODE_CHARS or not _TRACKING_CODE.fullmatch(code):
        return None
    raw = base64.urlsafe_b64decode(code)
    if raw[0] not in (PURPOSE_CLICK, PURPOSE_OPEN):
        return None
    return int.from_bytes(raw[1:3], "big")


def read_tracking(code: str, secret: bytes) -> Tracked | None:
    """The fields of a click or open code signed with `secret`, or None: wrong shape, purpose or MAC
    (as read_unsubscribe: with no spare bits, any change to a code fails its MAC)."""
    if len(code) != TRACKING_CODE_CHARS or not _TRACKING_CODE.fullmatch(code):
        return None
    raw = base64.urlsafe_b64decode(code)
    purpose, head, contact, link = raw[0], raw[1:9], raw[9:15], int.from_bytes(raw[15:18], "big")
    if purpose not in (PURPOSE_CLICK, PURPOSE_OPEN) or (purpose == PURPOSE_OPEN) != (link == 0):
        return None
    digest = hmac.digest(secret, TRACKING_DOMAIN + head + (link >> 2).to_bytes(3, "big") + contact, "sha512")
    at = (link & 3) * TRACKING_MAC_BYTES
    if not hmac.compare_digest(raw[18:], digest[at:at + TRACKING_MAC_BYTES]):
        return None
    return Tracked(purpose=purpose, kid=int.from_bytes(head[:2], "big"), key=int.from_bytes(head[2:], "big"),
                   contact_id=int.from_bytes(contact, "big"), link=link)


# -- keys (a Postgres adapter) ----------------------------------------------------------------------

async def live_keys(con: asyncpg.Connection) -> dict[int, bytes]:
    """Every live key, kid -> secret (oldest first); makes the first one when there is none live."""
    for _ in range(2):
        rows = await con.fetch("SELECT kid, secret FROM signing_keys WHERE retired_at IS NULL ORDER BY kid")
        if rows:
            return {r["kid"]: bytes(r["secret"]) for r in rows}
        # Two processes starting at once compute the same kid: one insert wins, the other reads it.
        await con.execute(
            """INSERT INTO signing_keys (kid, secret) SELECT coalesce(max(kid), 0) + 1, $1 FROM signing_keys
               ON CONFLICT (kid) DO NOTHING""",
            secrets.token_bytes(SECRET_BYTES),
        )
    raise RuntimeError("no live signing key, and none could be made")


async def load_signer(con: asyncpg.Connection, base_url: str = "") -> Signer:
    """A Signer with the newest live key (one query): once per job, not per recipient."""
    keys = await live_keys(con)
    kid = max(keys)
    return Signer(kid, keys[kid], base_url)


async def rotate_key(con: asyncpg.Connection) -> int:
    """Add a key, which signs from now on (in each process once its cache reloads); returns its kid.
    Codes signed with the older keys keep working until those are retired."""
    async with con.transaction():
        # One rotation at a time: two would compute the same kid.
        await con.execute("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")
        kid = await con.fetchval("SELECT coalesce(max(kid), 0) + 1 FROM signing_keys")
        if kid > MAX_KID:
            raise ValueError(f"no kid left: kids go up to {MAX_KID}")
        await con.execute("INSERT INTO signing_keys (kid, secret) VALUES ($1, $2)", kid, secrets.token_bytes(SECRET_BYTES))
    return kid


async def retire_key(con: asyncpg.Connection, kid: int) -> bool:
    """Stop `kid`'s codes from working (at once in the API: each use checks `key_is_live`). False if
    there is no such live key. Retiring every key is allowed: the next signer makes a new one."""
    status = await con.execute("UPDATE signing_keys SET retired_at = now() WHERE kid = $1 AND retired_at IS NULL", kid)
    return status == "UPDATE 1"


async def key_is_live(con: asyncpg.Connection, kid: int) -> bool:
    return bool(await con.fetchval("SELECT retired_at IS NULL FROM signing_keys WHERE kid = $1", kid))


@asynccontextmanager
async def _connection(source: asyncpg.Pool | asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(source, asyncpg.Pool):
        async with source.acquire() as con:
            yield con
    else:
        yield source


class KeyRing:
    """One process's cache of the live keys. Verifying needs no I/O unless a code names a kid it
    does not know; then it reloads, at most once per `reload_every_s` however many such codes come
    (a forged kid costs a reload a second, not one per request). A retired key stays here until the
    next reload: callers check `key_is_live` before acting on a code. `signer()` reloads when its
    keys are older than `signer_max_age_s`, so a rotation reaches every sender within that time."""

    def __init__(self, *, reload_every_s: float = 1.0, signer_max_age_s: float = 60.0, base_url: str = "") -> None:
        self.reload_every_s, self.signer_max_age_s, self.base_url = reload_every_s, signer_max_age_s, base_url
        self._secrets: dict[int, bytes] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    async def reload(self, source: asyncpg.Pool | asyncpg.Connection) -> None:
        async with _connection(source) as con:
            self._secrets = await live_keys(con)
        self._loaded_at = time.monotonic()

    async def _reload_for(self, source: asyncpg.Pool | asyncpg.Connection, kid: int | None, max_age_s: float) -> None:
        loaded_at = self._loaded_at
        async with self._lock:  # concurrent callers share one reload
            if self._loaded_at != loaded_at or (kid is not None and kid in self._secrets):
                return
            if time.monotonic() - self._loaded_at >= max_age_s:
                await self.reload(source)

    async def signer(self, source: asyncpg.Pool | asyncpg.Connection) -> Signer:
        """A Signer with the newest live key: usually no I/O (see the class)."""
        if not self._secrets or time.monotonic() - self._loaded_at >= self.signer_max_age_s:
            await self._reload_for(source, None, self.signer_max_age_s)
        kid = max(self._secrets)
        return Signer(kid, self._secrets[kid], self.base_url)

    async def _secret(self, source: asyncpg.Pool | asyncpg.Connection, kid: int | None) -> bytes | None:
        """The secret of `kid` if this process knows it (after a reload if need be), else None."""
        if kid is None:
            return None
        if kid not in self._secrets:
            await self._reload_for(source, kid, self.reload_every_s)
        return self._secrets.get(kid)

    async def verify_unsubscribe(self, source: asyncpg.Pool | asyncpg.Connection, code: str) -> Unsubscribe | None:
        """The code's fields if its MAC verifies under a key this process knows, else None."""
        secret = await self._secret(source, unsubscribe_kid(code))
        return None if secret is None else read_unsubscribe(code, secret)

    async def verify_tracking(self, source: asyncpg.Pool | asyncpg.Connection, code: str) -> Tracked | None:
        """A click or open code's fields if its MAC verifies under a key this process knows, else None."""
        secret = await self._secret(source, tracking_kid(code))
        return None if secret is None else read_tracking(code, secret)
