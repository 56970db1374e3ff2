"""The webhook kind of /v1/providers: its create body, its answer, its checks, and what providers.py
needs to fold it into the union (CONFIG_FIELDS, SECRET_FIELDS, PATCH_FIELDS).

The signing secret is the tenant's to give (`whsec_` and base64 of 24 to 64 random bytes, as
Standard Webhooks has it) and, like every provider secret, is never returned: an answer says
`secret_set`. The receiver must be configured with the same secret anyway, so the tenant makes it
once and puts it on both sides; a secret Crier made would have to come back once in a create answer,
an exception to the write-only rule that a lost answer turns into a lost secret. The static header
values are write-only too (they are usually a credential: Authorization, X-Api-Key): only their
names come back.

The field types and settings every kind shares (batch size, timeouts, URLs, SendingSettings)
live in provider_fields.py."""
from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from msgspec import Meta

import api_service.schemas.provider_fields as _providers
from api_service.schemas.common import Name
from shared.channels import webhook
from shared.kernel.errors import Invalid

WebhookChannel = Literal["webhook"]
WebhookUrl = Annotated[str, Meta(min_length=8, max_length=2048, pattern=r"^https?://[^\s\x00]+$", description=(
    "where each message is posted: https (http only with allow_insecure), a host on the public internet; "
    "a query is kept, redirects are not followed"))]
WebhookSecret = Annotated[str, Meta(
    min_length=len(webhook.SECRET_PREFIX) + 32, max_length=len(webhook.SECRET_PREFIX) + 88,
    pattern=r"^whsec_[A-Za-z0-9+/]+={0,2}$",
    description=("the Standard Webhooks signing secret: whsec_ and base64 of 24 to 64 random bytes "
                 "(`echo whsec_$(openssl rand -base64 32)`). Write-only"))]
HeaderName = Annotated[str, Meta(min_length=1, max_length=webhook.MAX_HEADER_NAME_CHARS,
                                 pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
HeaderValue = Annotated[str, Meta(min_length=1, max_length=webhook.MAX_HEADER_VALUE_CHARS, pattern=r"^[\x20-\x7e]+$")]
StaticHeaders = Annotated[dict[HeaderName, HeaderValue], Meta(max_length=webhook.MAX_HEADERS, description=(
    "static headers sent with every request (a credential for the receiver, say); not Host, Content-*, "
    "User-Agent, hop-by-hop or webhook-* headers. Write-only: answers give their names"))]
WebhookConcurrency = Annotated[int, Meta(ge=1, le=webhook.MAX_CONCURRENCY, description=(
    "requests in flight at once to this endpoint, per sender process"))]
WebhookTimeoutS = Annotated[float, Meta(gt=0, le=300, description=(
    "seconds to wait for the receiver to connect, and between bytes of its answer; a whole request gets "
    "three times this"))]
InsecureHttp = Annotated[bool, Meta(description=(
    "allow an http:// url: the signature still proves the payload is Crier's and unchanged, but every "
    "contact's payload is readable by anyone on the path"))]


class WebhookProviderCreate(_providers.SendingSettings, tag_field="kind", tag="webhook", kw_only=True):
    """A JSON POST per message to your URL, signed the Standard Webhooks way (webhook-id,
    webhook-timestamp, webhook-signature): `{"type": "broadcast.message", "timestamp", "data":
    {"contact_id", "payload"}}`. webhook-id is the same on every attempt of a message: drop repeats."""

    name: Name
    channel: WebhookChannel = "webhook"
    url: WebhookUrl
    secret: WebhookSecret
    headers: StaticHeaders = {}
    allow_insecure: InsecureHttp = False
    concurrency: WebhookConcurrency = webhook.DEFAULT_CONCURRENCY
    timeout_s: WebhookTimeoutS = webhook.DEFAULT_TIMEOUT_S

    def __repr__(self) -> str:  # a logged or raised repr must not carry the secret
        shown = (f"{f}={'<secret>' if f in SECRET_FIELDS else repr(getattr(self, f))}" for f in self.__struct_fields__)
        return f"WebhookProviderCreate({', '.join(shown)})"


class WebhookProvider(_providers.SendingShown, tag_field="kind", tag="webhook", kw_only=True):
    id: uuid.UUID
    name: str
    channel: str
    url: str
    secret_set: bool  # the secret itself is never returned
    header_names: list[str]  # nor the headers' values
    allow_insecure: bool
    concurrency: int
    timeout_s: float


_COLUMNS = ("name", "channel", "batch_size", "batch_delay_ms", "max_retries")
# The fields kept in the row's `config` (everything that is not a column), as providers.py keeps them.
CONFIG_FIELDS: tuple[str, ...] = tuple(f for f in WebhookProviderCreate.__struct_fields__ if f not in _COLUMNS)
# Never in an answer or a repr; sealed at rest if accounts.SECRET_FIELDS["webhook"] lists them
# (a header value is often the receiver's credential; sealing takes any JSON value, a dict too).
SECRET_FIELDS: tuple[str, ...] = ("secret", "headers")
# The config fields a PATCH may set, with their types (none nullable; each `| UnsetType = UNSET` in
# ProviderPatch); the merged result is validated again as a WebhookProviderCreate. `concurrency` and
# `timeout_s` have the bounds ProviderPatch already gives those names.
PATCH_FIELDS: dict[str, Any] = {
    "url": WebhookUrl,
    "secret": WebhookSecret,
    "headers": StaticHeaders,
    "allow_insecure": InsecureHttp,
    "concurrency": WebhookConcurrency,
    "timeout_s": WebhookTimeoutS,
}
ENDPOINT_FIELD = "url"  # what check_endpoint checks, and names when the host is private


def endpoint_host(config: dict[str, Any]) -> str:
    return urlsplit(config["url"]).hostname or ""


def check_webhook(data: WebhookProviderCreate) -> None:
    """What the types cannot say: a usable URL (https unless allowed), a secret of the right size,
    headers Crier does not set itself. Never quotes the secret or a header value."""
    if problem := webhook.url_problem(data.url, allow_insecure=data.allow_insecure):
        raise Invalid("url", problem)
    try:
        webhook.secret_bytes(data.secret)
    except ValueError as exc:
        raise Invalid("secret", str(exc)) from None
    if problem := webhook.headers_problem(data.headers):
        raise Invalid("headers", problem)


def webhook_response(common: dict[str, Any], c: dict[str, Any]) -> WebhookProvider:
    """The answer for a stored webhook provider: `common` is what every kind's answer has (id, name,
    channel, pacing, times), `c` its config."""
    return WebhookProvider(
        **common,
        url=c["url"],
        secret_set=bool(c.get("secret")),
        header_names=sorted(c.get("headers") or {}),
        allow_insecure=bool(c.get("allow_insecure", False)),
        concurrency=int(c.get("concurrency") or webhook.DEFAULT_CONCURRENCY),
        timeout_s=float(c.get("timeout_s", webhook.DEFAULT_TIMEOUT_S)),
    )


