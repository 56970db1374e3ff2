"""Request and response bodies of /v1/providers, and the mapping to stored rows (secrets never leave).

A provider is a tagged union on `kind`: each kind has its own fields, and a field of another kind
is an unknown field (422). The stored `config` of a kind uses the request's field names, so a
PATCH is validated by merging it over the stored config and validating the result as a create.
"""
from __future__ import annotations

import re
import uuid
from email.utils import parseaddr
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from email_validator import EmailNotValidError, validate_email
from msgspec import UNSET, Meta, UnsetType

from api_service.schemas import (
    provider_fcm,
    provider_telegram,
    provider_webhook,
    provider_whatsapp,
)
from api_service.schemas.common import ONE_LINE, Input, Name
from api_service.schemas.provider_fcm import FcmProvider, FcmProviderCreate
from api_service.schemas.provider_fields import (
    BatchDelayMs,
    BatchSize,
    Concurrency,
    HttpUrl,
    InsecureHttp,
    MaxRetries,
    OnUnknown,
    RateLimits,
    Secret,
    SendingSettings,
    SendingShown,
    TimeoutS,
    Weight,
    check_rate_limits,
    check_url,
)
from api_service.schemas.provider_telegram import (
    TelegramProvider,
    TelegramProviderCreate,
)
from api_service.schemas.provider_webhook import WebhookProvider, WebhookProviderCreate
from api_service.schemas.provider_whatsapp import (
    WhatsappProvider,
    WhatsappProviderCreate,
)
from shared.channels.accounts import (
    ProviderRow,
)
from shared.channels.twilio import DEFAULT_BASE_URL as TWILIO_BASE_URL
from shared.channels.twilio import DEFAULT_CONCURRENCY as TWILIO_CONCURRENCY
from shared.channels.webhook import secret_bytes
from shared.kernel.errors import Invalid
from shared.platform import netguard

Channel = Literal["email"]
Port = Annotated[int, Meta(ge=1, le=65535)]
Host = Annotated[str, Meta(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:\[\]-]+$")]
# The From header: one line (a CR or LF could never be sent, and would inject headers).
Address = Annotated[str, Meta(min_length=3, max_length=320, pattern=ONE_LINE, description="an address, or `Name <address>`")]
InsecureAuth = Annotated[bool, Meta(description=(
    "log in without TLS: the username and password are sent in clear, readable by anyone on the path. "
    "Required to save a login with starttls false and no implicit_tls"
))]

SMTP_PORT, SMTPS_PORT = 587, 465
ReceiptSecret = Annotated[provider_webhook.WebhookSecret, Meta(description=(
    "signs an email relay's delivery receipts to /v1/receipts/{id} the Standard Webhooks way: whsec_ and "
    "base64 of 24 to 64 random bytes (`echo whsec_$(openssl rand -base64 32)`), the same on the relay; "
    "no receipts without it. Write-only"))]

SmsChannel = Literal["sms"]


def _sid(prefix: str, what: str) -> Any:
    return Annotated[str, Meta(pattern=f"^{prefix}[0-9a-fA-F]{{32}}$", description=f"{what}: {prefix} and 32 hex digits")]


AccountSid = _sid("AC", "the Twilio account")
ApiKeySid = _sid("SK", "a Twilio API key, used instead of the auth token with api_key_secret")
MessagingServiceSid = _sid("MG", "a Twilio Messaging Service (its sender pool; RCS senders live there)")
PhoneNumber = Annotated[str, Meta(pattern=r"^\+[1-9][0-9]{1,14}$", description="a phone number in E.164: +14155550100")]


class SmtpProviderCreate(SendingSettings, tag_field="kind", tag="smtp", kw_only=True):
    """An SMTP server: one connection per batch job, STARTTLS (default) or implicit TLS, login if a username is set."""

    name: Name
    channel: Channel = "email"
    host: Host
    port: Port | None = None  # 587, or 465 with implicit_tls
    username: Secret | None = None
    password: Secret | None = None
    starttls: bool | None = None  # default: true, unless implicit_tls
    implicit_tls: bool = False
    tls_verify: bool = True
    timeout_s: TimeoutS = 30.0
    from_email: Address
    allow_insecure_auth: InsecureAuth = False
    receipt_secret: ReceiptSecret | None = None


class TwilioProviderCreate(SendingSettings, tag_field="kind", tag="twilio", kw_only=True):
    """SMS (and RCS) through Twilio's Messages API: one HTTPS request per message, `concurrency` at once.
    Log in with the auth token, or an API key (api_key_sid and api_key_secret); send from a number
    (from_number) or a Messaging Service (messaging_service_sid), or both."""

    name: Name
    channel: SmsChannel = "sms"
    account_sid: AccountSid
    auth_token: Secret | None = None
    api_key_sid: ApiKeySid | None = None
    api_key_secret: Secret | None = None
    from_number: PhoneNumber | None = None
    messaging_service_sid: MessagingServiceSid | None = None
    status_callback_url: Annotated[HttpUrl | None, Meta(description="where Twilio posts delivery receipts")] = None
    base_url: Annotated[HttpUrl, Meta(description="Twilio's API, or a stand-in for it")] = TWILIO_BASE_URL
    allow_insecure_auth: InsecureHttp = False
    concurrency: Concurrency = TWILIO_CONCURRENCY
    timeout_s: TimeoutS = 30.0


# The null provider stands in for any channel's (dry runs of a multi-channel broadcast, load tests).
AnyChannel = Literal["email", "sms", "whatsapp", "telegram", "push", "webhook"]


class NullProviderCreate(SendingSettings, tag_field="kind", tag="null", kw_only=True):
    """Accepts every message and sends nothing: for load tests and dry runs, on any channel."""

    name: Name
    channel: AnyChannel = "email"
    from_email: Address | None = None


ProviderCreate = (SmtpProviderCreate | TwilioProviderCreate | WhatsappProviderCreate | TelegramProviderCreate
                  | FcmProviderCreate | WebhookProviderCreate | NullProviderCreate)
_CREATE_OF_KIND: dict[str, Any] = {
    "smtp": SmtpProviderCreate,
    "twilio": TwilioProviderCreate,
    "whatsapp_cloud": WhatsappProviderCreate,
    "telegram_bot": TelegramProviderCreate,
    "fcm": FcmProviderCreate,
    "webhook": WebhookProviderCreate,
    "null": NullProviderCreate,
}
_COLUMNS = ("name", "channel", "batch_size", "batch_delay_ms", "max_retries")
# Per kind, the fields kept in the row's `config`: everything that is not a column.
CONFIG_FIELDS = {
    kind: tuple(f for f in cls.__struct_fields__ if f not in _COLUMNS) for kind, cls in _CREATE_OF_KIND.items()
}


class ProviderPatch(Input, kw_only=True):
    """Any subset of the fields of the provider's kind; `kind` and `channel` cannot change."""

    kind: Annotated[str, Meta(max_length=32)] | UnsetType = UNSET
    channel: Annotated[str, Meta(max_length=32)] | UnsetType = UNSET
    name: Name | UnsetType = UNSET
    host: Host | UnsetType = UNSET
    port: Port | None | UnsetType = UNSET
    username: Secret | None | UnsetType = UNSET
    password: Secret | None | UnsetType = UNSET
    starttls: bool | None | UnsetType = UNSET
    implicit_tls: bool | UnsetType = UNSET
    tls_verify: bool | UnsetType = UNSET
    timeout_s: TimeoutS | UnsetType = UNSET
    from_email: Address | None | UnsetType = UNSET
    allow_insecure_auth: InsecureAuth | UnsetType = UNSET
    receipt_secret: ReceiptSecret | None | UnsetType = UNSET
    account_sid: AccountSid | UnsetType = UNSET
    auth_token: Secret | None | UnsetType = UNSET
    api_key_sid: ApiKeySid | None | UnsetType = UNSET
    api_key_secret: Secret | None | UnsetType = UNSET
    from_number: PhoneNumber | None | UnsetType = UNSET
    messaging_service_sid: MessagingServiceSid | None | UnsetType = UNSET
    status_callback_url: HttpUrl | None | UnsetType = UNSET
    base_url: HttpUrl | UnsetType = UNSET
    concurrency: Concurrency | UnsetType = UNSET
    batch_size: BatchSize | UnsetType = UNSET
    batch_delay_ms: BatchDelayMs | UnsetType = UNSET
    max_retries: MaxRetries | UnsetType = UNSET
    rate_limits: RateLimits | UnsetType = UNSET
    on_unknown: OnUnknown | UnsetType = UNSET
    weight: Weight | UnsetType = UNSET
    # whatsapp_cloud, telegram_bot, fcm, webhook (their modules' PATCH_FIELDS)
    phone_number_id: provider_whatsapp.PhoneNumberId | UnsetType = UNSET
    access_token: provider_whatsapp.AccessToken | UnsetType = UNSET
    api_version: provider_whatsapp.ApiVersion | UnsetType = UNSET
    app_secret: provider_whatsapp.AppSecret | None | UnsetType = UNSET
    verify_token: provider_whatsapp.VerifyToken | None | UnsetType = UNSET
    bot_token: provider_telegram.BotToken | UnsetType = UNSET
    link_previews: provider_telegram.LinkPreviews | UnsetType = UNSET
    service_account_key: provider_fcm.ServiceAccountKeyText | UnsetType = UNSET
    project_id: provider_fcm.ProjectId | None | UnsetType = UNSET
    url: provider_webhook.WebhookUrl | UnsetType = UNSET
    secret: provider_webhook.WebhookSecret | UnsetType = UNSET
    headers: provider_webhook.StaticHeaders | UnsetType = UNSET
    allow_insecure: InsecureHttp | UnsetType = UNSET


class SmtpProvider(SendingShown, tag_field="kind", tag="smtp", kw_only=True):
    id: uuid.UUID
    name: str
    channel: str
    host: str
    port: int
    username: str | None
    password_set: bool  # the password itself is never returned
    receipt_secret_set: bool
    starttls: bool
    implicit_tls: bool
    tls_verify: bool
    timeout_s: float
    from_email: str
    allow_insecure_auth: bool


class TwilioProvider(SendingShown, tag_field="kind", tag="twilio", kw_only=True):
    id: uuid.UUID
    name: str
    channel: str
    account_sid: str
    auth_token_set: bool  # the secrets themselves are never returned
    api_key_sid: str | None
    api_key_secret_set: bool
    from_number: str | None
    messaging_service_sid: str | None
    status_callback_url: str | None
    base_url: str
    allow_insecure_auth: bool
    concurrency: int
    timeout_s: float


class NullProvider(SendingShown, tag_field="kind", tag="null", kw_only=True):
    id: uuid.UUID
    name: str
    channel: str
    from_email: str | None


Provider = (SmtpProvider | TwilioProvider | WhatsappProvider | TelegramProvider | FcmProvider | WebhookProvider
            | NullProvider)


class ProviderCheck(msgspec.Struct, kw_only=True):
    """The outcome of POST /v1/providers/{id}/test: a session was started (connect, TLS, login) and ended."""

    ok: bool
    failure: Annotated[str | None, Meta(description=(
        "why not, as a class: unreachable, timeout, tls_failed, tls_unavailable (STARTTLS required but not "
        "offered), auth_failed, rejected, refused_private_address. The server's own replies are not returned"
    ))] = None


class NewProvider(msgspec.Struct, frozen=True, kw_only=True):
    """A validated create: what the repository stores."""

    name: str
    channel: str
    kind: str
    config: dict[str, Any]
    batch_size: int
    batch_delay_ms: int
    max_retries: int


def _check_address(field: str, value: str | None) -> None:
    if value is None:
        return
    display, address = parseaddr(value)
    if not address or "\n" in value or "\r" in value:
        raise Invalid(field, "not an email address")
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise Invalid(field, str(exc)) from None


def _check_smtp(data: SmtpProviderCreate) -> None:
    if data.implicit_tls and data.starttls:
        raise Invalid("starttls", "cannot be combined with implicit_tls (TLS from the first byte)")
    if data.password is not None and data.username is None:
        raise Invalid("username", "required when a password is set")
    if data.username is not None and data.password is None:
        raise Invalid("password", "required when a username is set")
    if data.receipt_secret is not None:
        try:
            secret_bytes(data.receipt_secret)
        except ValueError as exc:
            raise Invalid("receipt_secret", str(exc)) from None
    if data.username is not None and data.starttls is False and not data.implicit_tls and not data.allow_insecure_auth:
        raise Invalid("starttls", "a login is only sent over TLS: leave starttls on, use implicit_tls, or set "
                                  "allow_insecure_auth to true to send the password in clear")


_check_url = check_url


def _check_twilio(data: TwilioProviderCreate) -> None:
    # An empty secret is as good as none: Twilio would refuse every request.
    if (data.api_key_sid is None) != (not data.api_key_secret):
        raise Invalid("api_key_secret" if not data.api_key_secret else "api_key_sid",
                      "api_key_sid and api_key_secret go together")
    if not data.auth_token and data.api_key_sid is None:
        raise Invalid("auth_token", "required unless api_key_sid and api_key_secret are set")
    if data.from_number is None and data.messaging_service_sid is None:
        raise Invalid("from_number", "set from_number or messaging_service_sid (or both)")
    _check_url("base_url", data.base_url)
    base = urlsplit(data.base_url)
    if base.query or base.fragment:
        raise Invalid("base_url", "must not have a query or a fragment")
    if base.scheme == "http" and not data.allow_insecure_auth:
        raise Invalid("base_url", "the credentials are only sent over https: use an https URL, or set "
                                  "allow_insecure_auth to true to send them in clear")
    _check_url("status_callback_url", data.status_callback_url)


def validated(data: ProviderCreate) -> NewProvider:
    """Checks what the struct types cannot (addresses, combinations) and splits columns from config."""
    check_rate_limits(data.rate_limits)
    if isinstance(data, SmtpProviderCreate):
        _check_address("from_email", data.from_email)
        _check_smtp(data)
    elif isinstance(data, TwilioProviderCreate):
        _check_twilio(data)
    elif isinstance(data, WhatsappProviderCreate):
        provider_whatsapp.check_whatsapp(data)
    elif isinstance(data, TelegramProviderCreate):
        provider_telegram.check_telegram(data)
    elif isinstance(data, FcmProviderCreate):
        provider_fcm.check_fcm(data)
    elif isinstance(data, WebhookProviderCreate):
        provider_webhook.check_webhook(data)
    else:
        _check_address("from_email", data.from_email)
    kind = data.__struct_config__.tag
    assert isinstance(kind, str)
    return NewProvider(
        name=data.name,
        channel=data.channel,
        kind=kind,
        config={f: getattr(data, f) for f in CONFIG_FIELDS[kind]},
        batch_size=data.batch_size,
        batch_delay_ms=data.batch_delay_ms,
        max_retries=data.max_retries,
    )


async def check_endpoint(kind: str, config: dict[str, Any], *, allow_private_networks: bool) -> None:
    """At save, with private networks not allowed: a host that is (or now resolves to) a private,
    loopback, link-local ... address is refused. A convenience: the check at connect time is the wall."""
    if allow_private_networks:
        return
    if kind == "smtp":
        field, host = "host", config["host"]
    elif kind in ("twilio", "whatsapp_cloud"):
        field, host = "base_url", urlsplit(config["base_url"]).hostname or ""
    elif kind == "telegram_bot":
        field, host = provider_telegram.ENDPOINT_FIELD, provider_telegram.endpoint_host(config)
    elif kind == "webhook":
        field, host = provider_webhook.ENDPOINT_FIELD, provider_webhook.endpoint_host(config)
    elif kind == "fcm":
        for field, host in provider_fcm.endpoint_hosts(config):
            if reason := await netguard.refusal_at_save(host):
                raise Invalid(field, reason)
        return
    else:
        return
    if reason := await netguard.refusal_at_save(host):
        raise Invalid(field, reason)


_AT = re.compile(r"\s*-\s*at `\$\.?([^`]*)`")


def patched(row: ProviderRow, patch: ProviderPatch) -> dict[str, Any]:
    """The column changes a PATCH makes to `row`, validated as if the merged provider were created anew."""
    given = {f: v for f in patch.__struct_fields__ if (v := getattr(patch, f)) is not UNSET}
    if given.pop("kind", row.kind) != row.kind:
        raise Invalid("kind", f"cannot be changed (this provider is {row.kind}); create a new provider")
    if given.pop("channel", row.channel) != row.channel:
        raise Invalid("channel", f"cannot be changed (this provider is for {row.channel})")
    for field in given:
        if field not in _COLUMNS and field not in CONFIG_FIELDS[row.kind]:
            raise Invalid(field, f"not a setting of a {row.kind} provider")
    merged = {
        "kind": row.kind, "name": row.name, "channel": row.channel, "batch_size": row.batch_size,
        "batch_delay_ms": row.batch_delay_ms, "max_retries": row.max_retries,
        **{f: row.config[f] for f in CONFIG_FIELDS[row.kind] if f in row.config},
        **given,
    }
    try:
        data = msgspec.convert(merged, ProviderCreate)
    except msgspec.ValidationError as exc:
        message = str(exc)
        m = _AT.search(message)
        raise Invalid(m.group(1) if m else "body", message[: m.start()] if m else message) from None
    new = validated(data)
    changes: dict[str, Any] = {c: getattr(new, c) for c in ("name", "batch_size", "batch_delay_ms", "max_retries")}
    changes["config"] = new.config
    return {c: v for c, v in changes.items() if v != getattr(row, c)}


def to_response(row: ProviderRow) -> Provider:
    """The provider as the API shows it: its settings, never its secrets (`*_set` says whether one is)."""
    return msgspec.structs.replace(
        _kind_response(row), rate_limits=row.config.get("rate_limits"),
        on_unknown=row.config.get("on_unknown") or "mark_unknown", weight=row.config.get("weight") or 1)


def _kind_response(row: ProviderRow) -> Provider:
    c = row.config
    common: dict[str, Any] = dict(
        id=row.id, name=row.name, channel=row.channel, batch_size=row.batch_size, batch_delay_ms=row.batch_delay_ms,
        max_retries=row.max_retries, created_at=row.created_at, updated_at=row.updated_at,
    )
    if row.kind == "smtp":
        implicit_tls = bool(c.get("implicit_tls", False))
        return SmtpProvider(
            **common,
            host=c["host"],
            port=c.get("port") or (SMTPS_PORT if implicit_tls else SMTP_PORT),
            username=c.get("username"),
            password_set=bool(c.get("password")),
            receipt_secret_set=bool(c.get("receipt_secret")),
            starttls=bool(c["starttls"]) if c.get("starttls") is not None else not implicit_tls,
            implicit_tls=implicit_tls,
            tls_verify=bool(c.get("tls_verify", True)),
            timeout_s=float(c.get("timeout_s", 30.0)),
            from_email=c["from_email"],
            allow_insecure_auth=bool(c.get("allow_insecure_auth", False)),
        )
    if row.kind == "twilio":
        return TwilioProvider(
            **common,
            account_sid=c["account_sid"],
            auth_token_set=bool(c.get("auth_token")),
            api_key_sid=c.get("api_key_sid"),
            api_key_secret_set=bool(c.get("api_key_secret")),
            from_number=c.get("from_number"),
            messaging_service_sid=c.get("messaging_service_sid"),
            status_callback_url=c.get("status_callback_url"),
            base_url=c.get("base_url") or TWILIO_BASE_URL,
            allow_insecure_auth=bool(c.get("allow_insecure_auth", False)),
            concurrency=int(c.get("concurrency") or TWILIO_CONCURRENCY),
            timeout_s=float(c.get("timeout_s", 30.0)),
        )
    if row.kind == "whatsapp_cloud":
        return provider_whatsapp.whatsapp_response(common, c)
    if row.kind == "telegram_bot":
        return provider_telegram.telegram_response(common, c)
    if row.kind == "fcm":
        return provider_fcm.fcm_response(common, c)
    if row.kind == "webhook":
        return provider_webhook.webhook_response(common, c)
    return NullProvider(**common, from_email=c.get("from_email"))
