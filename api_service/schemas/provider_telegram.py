"""The telegram_bot provider kind of /v1/providers: its create body, its response (the token never
leaves), its cross-field rules, and what providers.py needs to store and patch it (CONFIG_FIELDS,
SECRET_FIELDS, PATCH_FIELDS, ENDPOINT_FIELD).

The field types and settings every kind shares (batch size, timeouts, URLs, SendingSettings)
live in provider_fields.py."""
from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from msgspec import Meta

import api_service.schemas.provider_fields as _providers
from api_service.schemas.common import Name
from shared.channels.telegram_bot import (
    DEFAULT_BASE_URL,
    DEFAULT_CONCURRENCY,
    MAX_CONCURRENCY,
)
from shared.kernel.errors import Invalid

TelegramChannel = Literal["telegram"]
# BotFather's format: the bot's user id, a colon, the secret. Only URL-safe characters: the token
# is a path segment of every request.
BotToken = Annotated[str, Meta(min_length=32, max_length=256, pattern=r"^[0-9]{1,20}:[A-Za-z0-9_-]{30,}$",
                               description="the bot's token from @BotFather (123456789:AA...); never returned")]
TelegramConcurrency = Annotated[int, Meta(ge=1, le=MAX_CONCURRENCY, description=(
    "requests in flight at once for this bot, per sender process (Telegram allows a bot about 30 "
    "messages a second)"))]
LinkPreviews = Annotated[bool, Meta(description="whether a link in a text message gets a preview")]


class TelegramProviderCreate(_providers.SendingSettings, tag_field="kind", tag="telegram_bot", kw_only=True):
    """Telegram through a bot (the Bot API): one HTTPS request per message, `concurrency` at once.
    A contact's address is its chat id. A photo or video takes a caption of at most 1024
    characters: a longer text with media fails as invalid_message, it is not split in two messages."""

    name: Name
    channel: TelegramChannel = "telegram"
    bot_token: BotToken
    base_url: Annotated[_providers.HttpUrl, Meta(description=(
        "the Bot API server: Telegram's, a local one, or a stand-in"))] = DEFAULT_BASE_URL
    allow_insecure_auth: _providers.InsecureHttp = False
    concurrency: TelegramConcurrency = DEFAULT_CONCURRENCY
    timeout_s: _providers.TimeoutS = 30.0
    link_previews: LinkPreviews = True

    def __repr__(self) -> str:  # a logged or raised repr must not carry the token
        shown = (f"{f}={'<secret>' if f in SECRET_FIELDS else repr(getattr(self, f))}" for f in self.__struct_fields__)
        return f"TelegramProviderCreate({', '.join(shown)})"


class TelegramProvider(_providers.SendingShown, tag_field="kind", tag="telegram_bot", kw_only=True):
    id: uuid.UUID
    name: str
    channel: str
    bot_id: str | None  # the token's public part (the bot's user id), to tell bots apart
    bot_token_set: bool  # the token itself is never returned
    base_url: str
    allow_insecure_auth: bool
    concurrency: int
    timeout_s: float
    link_previews: bool


_COLUMNS = ("name", "channel", "batch_size", "batch_delay_ms", "max_retries")
# The fields kept in the row's `config`: everything that is not a column.
CONFIG_FIELDS: tuple[str, ...] = tuple(f for f in TelegramProviderCreate.__struct_fields__ if f not in _COLUMNS)
SECRET_FIELDS: tuple[str, ...] = ("bot_token",)
# The config fields a PATCH may set, with their types (none nullable; each `| UnsetType = UNSET` in
# ProviderPatch); the merged result is validated again as a TelegramProviderCreate. ProviderPatch
# already has base_url, allow_insecure_auth, concurrency (twilio's 1..100: the create's 1..30 then
# decides) and timeout_s. Resolved lazily: providers.py may be half-run when this module is.
PATCH_FIELDS: dict[str, Any] = {"bot_token": BotToken, "link_previews": LinkPreviews}
ENDPOINT_FIELD = "base_url"  # what check_endpoint checks, and names when the host is private


def endpoint_host(config: dict[str, Any]) -> str:
    return urlsplit(config.get("base_url") or DEFAULT_BASE_URL).hostname or ""


def check_telegram(data: TelegramProviderCreate) -> None:
    """What the struct types cannot say (raises Invalid naming the field): a base URL that is only
    an endpoint, and the token only over https."""
    _providers.check_url("base_url", data.base_url)
    base = urlsplit(data.base_url)
    if base.query or base.fragment:
        raise Invalid("base_url", "must not have a query or a fragment")
    # The token is in every request's path: over plain http anyone on the path reads it.
    if base.scheme == "http" and not data.allow_insecure_auth:
        raise Invalid("base_url", "the bot token is only sent over https: use an https URL, or set "
                                  "allow_insecure_auth to true to send it in clear")


def telegram_response(common: dict[str, Any], config: dict[str, Any]) -> TelegramProvider:
    """The response of a stored telegram_bot provider: `common` the row's columns (id, name, channel,
    batch_size, batch_delay_ms, max_retries, created_at, updated_at), `config` its config."""
    token = str(config.get("bot_token") or "")
    return TelegramProvider(
        **common,
        bot_id=token.partition(":")[0] if ":" in token else None,
        bot_token_set=bool(token),
        base_url=config.get("base_url") or DEFAULT_BASE_URL,
        allow_insecure_auth=bool(config.get("allow_insecure_auth", False)),
        concurrency=int(config.get("concurrency") or DEFAULT_CONCURRENCY),
        timeout_s=float(config.get("timeout_s", 30.0)),
        link_previews=bool(config.get("link_previews", True)),
    )


