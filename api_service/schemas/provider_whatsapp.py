"""The whatsapp_cloud provider kind in /v1/providers: its create body, its response (the access token
never leaves), the checks the struct types cannot make, and what providers.py needs to store and
patch it (CONFIG_FIELDS, SECRET_FIELDS, PATCH_FIELDS).

The field types and settings every kind shares (batch size, timeouts, URLs, SendingSettings)
live in provider_fields.py."""
from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from msgspec import Meta

import api_service.schemas.provider_fields as _providers
from api_service.schemas.common import Name
from shared.channels.whatsapp_cloud import (
    API_VERSION_RE,
    DEFAULT_API_VERSION,
    DEFAULT_BASE_URL,
    DEFAULT_CONCURRENCY,
    MAX_CONCURRENCY,
    PHONE_NUMBER_ID_RE,
)
from shared.kernel.errors import Invalid

KIND = "whatsapp_cloud"

WhatsappChannel = Literal["whatsapp"]
PhoneNumberId = Annotated[str, Meta(pattern=f"^{PHONE_NUMBER_ID_RE}$", description=(
    "the WhatsApp Business phone number's ID in Meta's API (digits; not the phone number itself)"))]
# Printable ASCII without spaces: it goes into the Authorization header as is.
AccessToken = Annotated[str, Meta(min_length=1, max_length=2048, pattern=r"^[\x21-\x7e]+$", description=(
    "a Meta access token with whatsapp_business_messaging permission (a System User token); never returned"))]
ApiVersion = Annotated[str, Meta(pattern=f"^{API_VERSION_RE}$", description="the Graph API version, e.g. v21.0")]
# Both write-only and sealed at rest (accounts.SECRET_FIELDS); printable ASCII without spaces.
AppSecret = Annotated[str, Meta(min_length=8, max_length=256, pattern=r"^[\x21-\x7e]+$", description=(
    "the Meta app's App Secret: verifies the X-Hub-Signature-256 of its status webhooks to "
    "/v1/receipts/{id} (no receipts without it); never returned"))]
VerifyToken = Annotated[str, Meta(min_length=8, max_length=256, pattern=r"^[\x21-\x7e]+$", description=(
    "the Verify Token given to Meta for the webhook: GET /v1/receipts/{id} answers Meta's subscription "
    "handshake with it; never returned"))]
WhatsappConcurrency = Annotated[int, Meta(ge=1, le=MAX_CONCURRENCY, description=(
    "requests in flight at once for this phone number, per sender process"))]


class WhatsappProviderCreate(_providers.SendingSettings, tag_field="kind", tag=KIND, kw_only=True):
    """WhatsApp template messages through Meta's WhatsApp Business Cloud API: one HTTPS request per
    message, `concurrency` at once, with the access token of the business phone number's account."""

    name: Name
    channel: WhatsappChannel = "whatsapp"
    phone_number_id: PhoneNumberId
    access_token: AccessToken
    app_secret: AppSecret | None = None
    verify_token: VerifyToken | None = None
    api_version: ApiVersion = DEFAULT_API_VERSION
    base_url: Annotated[_providers.HttpUrl, Meta(description="Meta's Graph API, or a stand-in for it")] = DEFAULT_BASE_URL
    allow_insecure_auth: _providers.InsecureHttp = False
    concurrency: WhatsappConcurrency = DEFAULT_CONCURRENCY
    timeout_s: _providers.TimeoutS = 30.0


class WhatsappProvider(_providers.SendingShown, tag_field="kind", tag=KIND, kw_only=True):
    id: uuid.UUID
    name: str
    channel: str
    phone_number_id: str
    access_token_set: bool  # the token itself is never returned
    app_secret_set: bool
    verify_token_set: bool
    api_version: str
    base_url: str
    allow_insecure_auth: bool
    concurrency: int
    timeout_s: float


_COLUMNS = ("name", "channel", "batch_size", "batch_delay_ms", "max_retries")
# What the row's `config` keeps: everything that is not a column.
CONFIG_FIELDS: tuple[str, ...] = tuple(f for f in WhatsappProviderCreate.__struct_fields__ if f not in _COLUMNS)
SECRET_FIELDS: tuple[str, ...] = ("access_token", "app_secret", "verify_token")
# The fields ProviderPatch does not have yet, with their types (it has base_url, allow_insecure_auth,
# concurrency and timeout_s already, with the same bounds).
PATCH_FIELDS: dict[str, Any] = {"phone_number_id": PhoneNumberId, "access_token": AccessToken,
                                "api_version": ApiVersion, "app_secret": AppSecret | None,
                                "verify_token": VerifyToken | None}


def check_whatsapp(data: WhatsappProviderCreate) -> None:
    """The cross-field rules: a base URL that is only an endpoint, and the token only over https."""
    _providers.check_url("base_url", data.base_url)
    base = urlsplit(data.base_url)
    if base.query or base.fragment:
        raise Invalid("base_url", "must not have a query or a fragment")
    if base.scheme == "http" and not data.allow_insecure_auth:
        raise Invalid("base_url", "the access token is only sent over https: use an https URL, or set "
                                  "allow_insecure_auth to true to send it in clear")


def whatsapp_response(common: dict[str, Any], config: dict[str, Any]) -> WhatsappProvider:
    """The response for a stored row: `common` the column fields (as providers.to_response builds them)."""
    return WhatsappProvider(
        **common,
        phone_number_id=config["phone_number_id"],
        access_token_set=bool(config.get("access_token")),
        app_secret_set=bool(config.get("app_secret")),
        verify_token_set=bool(config.get("verify_token")),
        api_version=config.get("api_version") or DEFAULT_API_VERSION,
        base_url=config.get("base_url") or DEFAULT_BASE_URL,
        allow_insecure_auth=bool(config.get("allow_insecure_auth", False)),
        concurrency=int(config.get("concurrency") or DEFAULT_CONCURRENCY),
        timeout_s=float(config.get("timeout_s", 30.0)),
    )


