"""The fcm provider kind of /v1/providers: its create body, its response (the key never leaves: its
client_email, private_key_id and project do), the checks the struct types cannot make, and what
providers.py needs to store, patch and check it (CONFIG_FIELDS, SECRET_FIELDS, PATCH_FIELDS,
endpoint_hosts).

The key is taken as the key file's JSON text, a string: like every other secret it is stored as
given, one max_length bounds it, and a PATCH compares plain values. (`jq -n --rawfile key key.json
'{"service_account_key": $key, ...}'` makes the body from the downloaded file.)

The field types and settings every kind shares (batch size, timeouts, URLs, SendingSettings)
live in provider_fields.py."""
from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from msgspec import Meta

import api_service.schemas.provider_fields as _providers
from api_service.schemas.common import NO_NUL, Name
from shared.channels import fcm
from shared.kernel.errors import Invalid

KIND = "fcm"

PushChannel = Literal["push"]
ServiceAccountKeyText = Annotated[str, Meta(min_length=2, max_length=fcm.MAX_KEY_CHARS, pattern=NO_NUL, description=(
    "the service account's key file as a JSON string, whole, as downloaded (Firebase console: Project settings "
    "> Service accounts > Generate new private key); never returned"))]
ProjectId = Annotated[str, Meta(pattern=f"^{fcm.PROJECT_ID_RE}$", description=(
    "the Firebase project to send as (its project ID); default: the key's project_id"))]


class FcmProviderCreate(_providers.SendingSettings, tag_field="kind", tag=KIND, kw_only=True):
    """Push notifications through Firebase Cloud Messaging's HTTP v1 API: one HTTPS request per device
    token, `concurrency` at once, authorised by an OAuth2 token made from a service account's key
    (the account needs permission to send, e.g. the Firebase Cloud Messaging API Admin role). A
    contact's address is its most recent push token; a token FCM reports unregistered is removed."""

    name: Name
    channel: PushChannel = "push"
    service_account_key: ServiceAccountKeyText
    project_id: ProjectId | None = None
    base_url: Annotated[_providers.HttpUrl, Meta(description="FCM's API, or a stand-in for it")] = fcm.DEFAULT_BASE_URL
    allow_insecure_auth: _providers.InsecureHttp = False
    concurrency: _providers.Concurrency = fcm.DEFAULT_CONCURRENCY
    timeout_s: _providers.TimeoutS = 30.0


class FcmProvider(_providers.SendingShown, tag_field="kind", tag=KIND, kw_only=True):
    id: uuid.UUID
    name: str
    channel: str
    service_account_key_set: bool  # the key itself is never returned
    client_email: str | None  # who the key is (None only for a stored key that no longer parses)
    private_key_id: str | None  # which of its keys: to tell a rotated key from the old one
    project_id: str | None
    base_url: str
    allow_insecure_auth: bool
    concurrency: int
    timeout_s: float


_COLUMNS = ("name", "channel", "batch_size", "batch_delay_ms", "max_retries")
# What the row's `config` keeps: everything that is not a column.
CONFIG_FIELDS: tuple[str, ...] = tuple(f for f in FcmProviderCreate.__struct_fields__ if f not in _COLUMNS)
SECRET_FIELDS: tuple[str, ...] = ("service_account_key",)
# The fields ProviderPatch does not have yet, with their types (it has base_url, allow_insecure_auth,
# concurrency and timeout_s already, with the same bounds).
PATCH_FIELDS: dict[str, Any] = {"service_account_key": ServiceAccountKeyText, "project_id": ProjectId | None}


def check_fcm(data: FcmProviderCreate) -> None:
    """A key that parses, loads and names a usable token_uri; a project to send as; both endpoints
    https unless allowed. Reasons name what is wrong, never a value of the key."""
    try:
        key = fcm.parse_key(data.service_account_key)
        fcm.load_signer(key)
    except fcm.KeyProblem as exc:
        raise Invalid("service_account_key", str(exc)) from None
    if problem := fcm.endpoint_problem(key.token_uri, allow_insecure_auth=data.allow_insecure_auth):
        raise Invalid("service_account_key", f"its token_uri {problem}")
    project = data.project_id or key.project_id
    if not project:
        raise Invalid("project_id", "required: the key has no project_id")
    if not re.fullmatch(fcm.PROJECT_ID_RE, project):  # fullmatch: the pattern's `$` lets a final newline through
        raise Invalid("project_id" if data.project_id else "service_account_key", "not a Firebase project ID")
    if problem := fcm.endpoint_problem(data.base_url, allow_insecure_auth=data.allow_insecure_auth):
        raise Invalid("base_url", problem)


def _key(config: dict[str, Any]) -> fcm.ServiceAccountKey | None:
    try:
        return fcm.parse_key(config.get("service_account_key") or "")
    except fcm.KeyProblem:
        return None


def endpoint_hosts(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, host) of each endpoint Crier connects to, for the check at save: a private host is
    refused naming the field (the token endpoint is the key's token_uri)."""
    hosts = [("base_url", urlsplit(config.get("base_url") or fcm.DEFAULT_BASE_URL).hostname or "")]
    if (key := _key(config)) is not None:
        hosts.append(("service_account_key", urlsplit(key.token_uri).hostname or ""))
    return hosts


def fcm_response(common: dict[str, Any], config: dict[str, Any]) -> FcmProvider:
    """The response for a stored row: `common` the column fields (as providers.to_response builds them)."""
    key = _key(config)
    return FcmProvider(
        **common,
        service_account_key_set=bool(config.get("service_account_key")),
        client_email=key.client_email if key else None,
        private_key_id=key.private_key_id if key else None,
        project_id=config.get("project_id") or (key.project_id if key else None),
        base_url=config.get("base_url") or fcm.DEFAULT_BASE_URL,
        allow_insecure_auth=bool(config.get("allow_insecure_auth", False)),
        concurrency=int(config.get("concurrency") or fcm.DEFAULT_CONCURRENCY),
        timeout_s=float(config.get("timeout_s", 30.0)),
    )


