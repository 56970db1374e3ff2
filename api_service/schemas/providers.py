"""Request and response bodies of /v1/providers, and the mapping to stored rows (secrets never leave).

A provider is a tagged union on `kind`: each kind has its own fields, and a field of another kind
is an unknown field (422). The stored `config` of a kind uses the request's field names, so a
PATCH is validated by merging it over the stored config and validating the result as a create.
"""
from __future__ import annotations

import re
import uuid
from datetime import datetime
from email.utils import parseaddr
from typing import Annotated, Any, Literal

import msgspec
from email_validator import EmailNotValidError, validate_email
from msgspec import UNSET, Meta, UnsetType

from api_service.schemas.common import NO_NUL, ONE_LINE, Input, Name
from shared.channels.accounts import (
    DEFAULT_BATCH_DELAY_MS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_RETRIES,
    ProviderRow,
)
from shared.kernel.errors import Invalid
from shared.platform import netguard

Channel = Literal["email"]
Port = Annotated[int, Meta(ge=1, le=65535)]
Host = Annotated[str, Meta(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:\[\]-]+$")]
Secret = Annotated[str, Meta(max_length=1024, pattern=NO_NUL)]
# The From header: one line (a CR or LF could never be sent, and would inject headers).
Address = Annotated[str, Meta(min_length=3, max_length=320, pattern=ONE_LINE, description="an address, or `Name <address>`")]
BatchSize = Annotated[int, Meta(ge=1, le=10000, description="recipients per batch job")]
BatchDelayMs = Annotated[int, Meta(ge=0, le=86_400_000, description="delay between batches (0: none)")]
MaxRetries = Annotated[int, Meta(ge=0, le=10, description="resends of a message after a transient failure")]
TimeoutS = Annotated[float, Meta(gt=0, le=300, description="seconds to wait for the server on each command")]
InsecureAuth = Annotated[bool, Meta(description=(
    "log in without TLS: the username and password are sent in clear, readable by anyone on the path. "
    "Required to save a login with starttls false and no implicit_tls"
))]

SMTP_PORT, SMTPS_PORT = 587, 465


class SmtpProviderCreate(Input, tag_field="kind", tag="smtp", kw_only=True):
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
    batch_size: BatchSize = DEFAULT_BATCH_SIZE
    batch_delay_ms: BatchDelayMs = DEFAULT_BATCH_DELAY_MS
    max_retries: MaxRetries = DEFAULT_MAX_RETRIES


class NullProviderCreate(Input, tag_field="kind", tag="null", kw_only=True):
    """Accepts every message and sends nothing: for load tests and dry runs."""

    name: Name
    channel: Channel = "email"
    from_email: Address | None = None
    batch_size: BatchSize = DEFAULT_BATCH_SIZE
    batch_delay_ms: BatchDelayMs = DEFAULT_BATCH_DELAY_MS
    max_retries: MaxRetries = DEFAULT_MAX_RETRIES


ProviderCreate = SmtpProviderCreate | NullProviderCreate
_CREATE_OF_KIND: dict[str, type[SmtpProviderCreate] | type[NullProviderCreate]] = {
    "smtp": SmtpProviderCreate,
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
    batch_size: BatchSize | UnsetType = UNSET
    batch_delay_ms: BatchDelayMs | UnsetType = UNSET
    max_retries: MaxRetries | UnsetType = UNSET


class SmtpProvider(msgspec.Struct, tag_field="kind", tag="smtp", kw_only=True):
    id: uuid.UUID
    name: str
    channel: str
    host: str
    port: int
    username: str | None
    password_set: bool  # the password itself is never returned
    starttls: bool
    implicit_tls: bool
    tls_verify: bool
    timeout_s: float
    from_email: str
    allow_insecure_auth: bool
    batch_size: int
    batch_delay_ms: int
    max_retries: int
    created_at: datetime
    updated_at: datetime


class NullProvider(msgspec.Struct, tag_field="kind", tag="null", kw_only=True):
    id: uuid.UUID
    name: str
    channel: str
    from_email: str | None
    batch_size: int
    batch_delay_ms: int
    max_retries: int
    created_at: datetime
    updated_at: datetime


Provider = SmtpProvider | NullProvider


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
    if data.username is not None and data.starttls is False and not data.implicit_tls and not data.allow_insecure_auth:
        raise Invalid("starttls", "a login is only sent over TLS: leave starttls on, use implicit_tls, or set "
                                  "allow_insecure_auth to true to send the password in clear")


def validated(data: ProviderCreate) -> NewProvider:
    """Checks what the struct types cannot (addresses, combinations) and splits columns from config."""
    _check_address("from_email", data.from_email)
    if isinstance(data, SmtpProviderCreate):
        _check_smtp(data)
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
    if allow_private_networks or kind != "smtp":
        return
    if reason := await netguard.refusal_at_save(config["host"]):
        raise Invalid("host", reason)


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
            starttls=bool(c["starttls"]) if c.get("starttls") is not None else not implicit_tls,
            implicit_tls=implicit_tls,
            tls_verify=bool(c.get("tls_verify", True)),
            timeout_s=float(c.get("timeout_s", 30.0)),
            from_email=c["from_email"],
            allow_insecure_auth=bool(c.get("allow_insecure_auth", False)),
        )
    return NullProvider(**common, from_email=c.get("from_email"))
