"""Response bodies of /v1/media (an upload's body is the file itself, not JSON)."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from shared.content.media import Media as MediaRow


class Media(msgspec.Struct, kw_only=True):
    """A photo or video, to use as `media_url` (`url`) in Telegram content."""

    id: uuid.UUID
    kind: Annotated[Literal["photo", "video"], Meta(description="photo: send with sendPhoto; video: sendVideo")]
    content_type: Annotated[str, Meta(description="found from the bytes, whatever the upload's Content-Type said",
                                      examples=["image/png"])]
    size: Annotated[int, Meta(description="bytes")]
    sha256: Annotated[str, Meta(description="of the bytes, hex; also the ETag of the URL")]
    url: Annotated[str, Meta(description="public, no token needed: `{CRIER_PUBLIC_URL}/m/{token}`; a 404 once "
                                         "the item is deleted")]
    filename: str | None = None
    created_at: datetime


def media(row: MediaRow, public_base_url: str) -> Media:
    return Media(
        id=row.id, kind=row.kind, content_type=row.content_type, size=row.size,  # type: ignore[arg-type]
        sha256=row.sha256, url=f"{public_base_url}/m/{row.token}", filename=row.filename, created_at=row.created_at,
    )
