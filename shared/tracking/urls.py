"""A run's signed tracking URLs for its recipients: `{public_url}/r/{code}` per link and
`{public_url}/o/{code}` for the open pixel (codes: shared/platform/signing.py)."""
from __future__ import annotations

from shared.platform.signing import TrackingLinks


class TrackingUrls:
    __slots__ = ("_codes", "_click", "_open")

    def __init__(self, codes: TrackingLinks, base_url: str) -> None:
        self._codes = codes
        self._click, self._open = f"{base_url.rstrip('/')}/r/", f"{base_url.rstrip('/')}/o/"

    def click(self, contact_id: int, link: int) -> str:
        return self._click + self._codes.click(contact_id, link)

    def open(self, contact_id: int) -> str:
        return self._open + self._codes.open(contact_id)
