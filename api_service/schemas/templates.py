"""Request and response bodies of /v1/templates; the content is schemas/content.py's."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from api_service.schemas.common import Input, Name
from api_service.schemas.content import ContentIn, ContentOut, ContentPatch

IsTemplate = Annotated[bool, Meta(description="false: content kept for one broadcast, not offered for reuse")]


class TemplateCreate(Input, kw_only=True):
    name: Name
    is_template: IsTemplate = True
    content: ContentIn


class TemplatePatch(Input, kw_only=True):
    """Each field given replaces the stored one; `content` is merged (ContentPatch). A save makes a
    new version; broadcasts already running keep the version they started with."""

    name: Name | UnsetType = UNSET
    is_template: IsTemplate | UnsetType = UNSET
    content: ContentPatch | UnsetType = UNSET


class SmsSegments(msgspec.Struct, kw_only=True):
    """What the SMS body takes as written (Liquid unrendered: values inserted change it)."""

    encoding: Literal["GSM-7", "UCS-2"]  # one character outside GSM 03.38 sends the whole text as UCS-2
    characters: int
    segments: int  # what a provider bills: 160/153 characters a segment in GSM-7, 70/67 in UCS-2


class EmailAsSent(msgspec.Struct, kw_only=True):
    """The email as every recipient's is made from it, before their data goes in (default locale): the
    stored HTML with the button, its CSS inlined, wrapped in a document with the preheader; and the
    text part, as given or derived from the HTML."""

    html: str
    text: str


class Template(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    name: str
    is_template: bool
    version: int  # of the content shown: the latest, or the one asked for
    content: ContentOut
    sms_segments: SmsSegments | None = None  # when the content has an SMS section
    email_as_sent: EmailAsSent | None = None  # when the content has an email
    created_at: datetime
    updated_at: datetime  # when this version was saved


class TemplateSummary(msgspec.Struct, kw_only=True):
    """A template in a list: without its content; the channels it has content for."""

    id: uuid.UUID
    name: str
    is_template: bool
    version: int
    channels: list[str]
    created_at: datetime
    updated_at: datetime
