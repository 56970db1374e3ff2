"""Secrets at rest: provider credentials are sealed with Fernet before they reach Postgres.

CRIER_SECRET_KEY holds one or more Fernet keys, comma-separated: the first seals, every one opens
(MultiFernet). A key is rotated by putting a new one first, re-sealing every row with it (`crier
secrets seal`) and then dropping the old one; a database dump alone then reveals no credential.

A sealed value is stored as the JSON object {"$sealed": "<Fernet token>"}, not as a string with a
prefix: every secret field is a string in the API's schemas, so no tenant input can ever look
sealed (a prefixed string could be typed in as a password, and the server would then decrypt a
token of the tenant's choosing and send the result to the tenant's server), and a value written
before sealing existed (a plain string) is told apart from a sealed one without guessing.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from shared.platform.settings import Settings, load_settings

MARKER = "$sealed"


class SecretKeyMissing(RuntimeError):
    """A secret is to be stored, no key is set, and storing it in clear was not allowed."""


class SecretUnreadable(Exception):
    """A sealed value that none of the keys opens. The message never holds the value."""


class SecretBox:
    """Seals and opens with the keys of CRIER_SECRET_KEY; without keys it can only say why not."""

    def __init__(self, keys: Sequence[str] = (), *, allow_plaintext: bool = False) -> None:
        fernets = []
        for i, key in enumerate(keys, 1):
            try:
                fernets.append(Fernet(key.strip()))
            except ValueError:  # the message names the position, never the key
                raise ValueError(f"CRIER_SECRET_KEY: key {i} of {len(keys)} is not a Fernet key "
                                 "(32 url-safe base64-encoded bytes)") from None
        self._first = fernets[0] if fernets else None
        self._all = MultiFernet(fernets) if fernets else None
        self.key_count = len(fernets)
        # Without keys: whether secrets may then be stored as they come (CRIER_ALLOW_PLAINTEXT_SECRETS).
        self.allow_plaintext = allow_plaintext

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        keys = [k for k in settings.secret_key.split(",") if k.strip()]
        return cls(keys, allow_plaintext=settings.allow_plaintext_secrets)

    def __repr__(self) -> str:  # the keys stay out of logs and tracebacks
        return f"SecretBox({self.key_count} key(s))"

    @property
    def can_seal(self) -> bool:
        return self._all is not None

    def seal(self, value: str) -> str:
        """A Fernet token of `value` under the first key."""
        if self._all is None:
            raise SecretKeyMissing("a provider secret cannot be stored: CRIER_SECRET_KEY is not set")
        return self._all.encrypt(value.encode()).decode()

    def open(self, sealed: str) -> str:
        if self._all is None:
            raise SecretUnreadable("a sealed secret cannot be opened: CRIER_SECRET_KEY is not set")
        try:
            return self._all.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise SecretUnreadable("a sealed secret opens with none of the keys of CRIER_SECRET_KEY") from None

    def is_current(self, sealed: str) -> bool:
        """Whether the first key opens it (Fernet tokens do not name their key: trying is the test)."""
        if self._first is None:
            return False
        try:
            self._first.decrypt(sealed.encode())
        except InvalidToken:
            return False
        return True

    def reseal(self, sealed: str) -> str:
        """The same value under the first key (any key may open the old token)."""
        if self._all is None:
            raise SecretKeyMissing("nothing can be re-sealed: CRIER_SECRET_KEY is not set")
        try:
            return self._all.rotate(sealed.encode()).decode()
        except InvalidToken:
            raise SecretUnreadable("a sealed secret opens with none of the keys of CRIER_SECRET_KEY") from None


def wrap(token: str) -> dict[str, str]:
    """How a token is stored in a config."""
    return {MARKER: token}


def token_of(value: Any) -> str | None:
    """The token of a stored sealed value; None for anything else (a value stored before sealing)."""
    if isinstance(value, dict) and len(value) == 1 and isinstance(value.get(MARKER), str):
        return value[MARKER]
    return None


# The box of this process. `crier api` / `crier sender` install theirs from their Settings at start
# (after checking the key); code run otherwise (an app built in a test, a script) gets one built from
# the environment, like every other setting, rather than none.
_installed: SecretBox | None = None


def install(box: SecretBox | None) -> SecretBox | None:
    """Make `box` this process's box (None: back to the environment's); returns the previous one."""
    global _installed
    previous, _installed = _installed, box
    return previous


def process_box() -> SecretBox:
    global _installed
    if _installed is None:
        _installed = SecretBox.from_settings(load_settings())
    return _installed
