"""/v1/receipts/{provider_id}: where providers report what became of the messages Crier sent
(delivered, read, bounced, complained), each signed the provider's own way, with no token: the
provider calls it (shared/tracking/receipts.py applies them; README: Delivery receipts).

- twilio: the form Twilio posts to the message's StatusCallback, `X-Twilio-Signature`;
- whatsapp_cloud: Meta's webhook JSON, `X-Hub-Signature-256`; GET answers Meta's subscription
  handshake with the provider's `verify_token`;
- smtp: an email relay's JSON receipts, signed the Standard Webhooks way with `receipt_secret`.

No information leaks to a caller that cannot sign: an id that is no provider, a deleted one, one
of a kind without receipts and a path that is no id at all are the same 404; a signature that is
missing, wrong, or that the provider has no secret to check is a 401 that changes nothing. Only a
signed request learns more (a 422 naming the field, and how many of its statuses it applied).
A receipt naming another tenant's message (or no message) is taken and changes nothing, the same
answer as for a message of another system: matching is scoped to the provider's tenant.

Rate limit, as the unsubscribe page's (api_service/routes/unsubscribe.py): only failures count,
per replica, in memory. A 404 counts against the client's address (someone probing ids); a 401
against the address and that provider, so a tenant whose secret is wrong makes only its own
provider's callbacks wait, not every tenant's whose webhooks come from the same provider
addresses. Providers send bursts of valid callbacks, which are never refused.
"""
from __future__ import annotations

import hmac
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any
from urllib.parse import parse_qsl

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.enums import MediaType
from litestar.exceptions import InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, QueryParameter
from litestar.plugins.problem_details import ProblemDetailsException

from api_service.openapi import PROBLEM_JSON, problem_response
from api_service.problems import invalid, problem
from api_service.routes.unsubscribe import FailedCodes
from api_service.schemas.receipts import (
    MAX_RECEIPT_BYTES,
    EmailReceipt,
    EmailReceipts,
    ReceiptsTaken,
    WhatsappWebhook,
)
from shared.channels.accounts import ProviderRow
from shared.platform.logging import get_logger
from shared.platform.settings import Settings
from shared.tracking import receipts
from shared.tracking.receipt_kinds import (
    email_receipt,
    twilio_receipt,
    whatsapp_receipt,
    whatsapp_time,
)
from shared.tracking.receipt_signatures import (
    meta_verified,
    standard_webhook_verified,
    twilio_verified,
)
from shared.tracking.receipt_statuses import Receipt

log = get_logger(__name__)
_STATE_KEY = "crier_receipts"
MAX_FORM_FIELDS = 200  # a Twilio status callback has about 15
NOT_FOUND = "no such receipt endpoint"
_AT = re.compile(r"\s*-\s*at `\$\.?([^`]*)`")  # msgspec's "... - at `$.entry[0].id`"
_MISSING = re.compile(r"missing required field `([^`]+)`")


@dataclass
class _Gate:
    failures: FailedCodes | None


def _gate(request: Request, settings: Settings) -> _Gate:
    """This app's failure counts (per app: a test process runs many apps)."""
    gate = request.app.state.get(_STATE_KEY)
    if gate is None:
        limited = settings.rate_limits and settings.auth_failures_per_minute >= 1
        gate = _Gate(FailedCodes(settings.auth_failures_per_minute) if limited else None)
        request.app.state[_STATE_KEY] = gate
    return gate


def _too_many(wait: int) -> ProblemDetailsException:
    refused = problem(429, "too many failed receipt requests from this address; retry later", retry_after=wait)
    refused.headers = {"Retry-After": str(wait)}
    return refused


class _Caller:
    """Who is calling, and the failures they are allowed before a 429."""

    def __init__(self, request: Request, settings: Settings) -> None:
        self.address = request.client.host if request.client else "unknown"
        self.failures = _gate(request, settings).failures

    def check(self, key: str) -> None:
        if self.failures is not None and (wait := self.failures.blocked_for(key)):
            raise _too_many(wait)

    def failed(self, key: str, refusal: ProblemDetailsException) -> ProblemDetailsException:
        if self.failures is not None:
            self.failures.failed(key)
        return refusal


async def _provider(caller: _Caller, state: State, provider_id: str) -> ProviderRow:
    """The provider the URL names, if its kind takes receipts; else the one 404 (counted)."""
    caller.check(caller.address)
    try:
        pid = uuid.UUID(provider_id)
    except ValueError:
        raise caller.failed(caller.address, problem(404, NOT_FOUND)) from None
    async with state.services.pool.acquire() as con:
        row = await receipts.receipt_provider(con, pid)
    if row is None:
        raise caller.failed(caller.address, problem(404, NOT_FOUND))
    caller.check(f"{caller.address} {pid}")
    return row


async def _body(request: Request) -> bytes:
    try:
        return await request.body()
    except RequestEntityTooLarge:
        raise problem(413, f"the body is larger than {MAX_RECEIPT_BYTES} bytes") from None
    except InternalServerException as e:  # Litestar: the client disconnected before the body's end
        raise problem(400, "the client disconnected before the end of the body") from e


def _unsigned(caller: _Caller, row: ProviderRow, header: str) -> ProblemDetailsException:
    if not row.config.get(receipts.VERIFIED_BY[row.kind]):  # the tenant's to fix: say so in the log only
        log.info("a receipt came to a provider that has no secret to verify it", provider_id=str(row.id),
                 kind=row.kind, needs=receipts.VERIFIED_BY[row.kind])
    return caller.failed(f"{caller.address} {row.id}", problem(401, f"the signature ({header}) is missing or "
                                                                     "does not verify"))


def _decoded(body: bytes, kind: Any) -> Any:
    """The body as `kind`: a 400 when it is not JSON, a 422 naming the field when it is not the shape."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        m = _AT.search(message)
        field, reason = (m.group(1) or "body", message[: m.start()]) if m else ("body", message)
        if missing := _MISSING.search(reason):
            field = missing.group(1) if field == "body" else f"{field}.{missing.group(1)}"
            reason = "required field missing"
        raise invalid(field, reason) from None
    except (msgspec.DecodeError, RecursionError):
        raise problem(400, "the request body is not valid JSON") from None


def _signed_url(request: Request, settings: Settings) -> str:
    """The URL Twilio called and signed. Its scheme, host and port are CRIER_PUBLIC_URL's, never the
    request's Host header: behind a proxy or load balancer the request reaches this process by
    another name (http://10.0.0.5:8000), and a Host of the client's choosing must not decide what is
    checked. The path and query are the request's: what Twilio appended to that base."""
    query = request.scope.get("query_string", b"").decode("latin-1")
    return settings.public_base_url + request.url.path + (f"?{query}" if query else "")


def _twilio(request: Request, settings: Settings, caller: _Caller, row: ProviderRow, body: bytes,
            now: datetime) -> list[Receipt]:
    try:
        params = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        params = None  # not a form Twilio made: it cannot verify
    signature = request.headers.get("x-twilio-signature")
    if params is None or not twilio_verified(_signed_url(request, settings), params, row.config.get("auth_token"),
                                             signature):
        raise _unsigned(caller, row, "X-Twilio-Signature")
    form = dict(params)
    sid, status = form.get("MessageSid") or form.get("SmsSid"), form.get("MessageStatus") or form.get("SmsStatus")
    if not sid:
        raise invalid("MessageSid", "required field missing")
    if not status:
        raise invalid("MessageStatus", "required field missing")
    receipt = twilio_receipt(sid, status, form.get("ErrorCode"), now)
    return [receipt] if receipt is not None else []


def _whatsapp(request: Request, caller: _Caller, row: ProviderRow, body: bytes, now: datetime) -> list[Receipt]:
    if not meta_verified(body, row.config.get("app_secret"), request.headers.get("x-hub-signature-256")):
        raise _unsigned(caller, row, "X-Hub-Signature-256")
    hook: WhatsappWebhook = _decoded(body, WhatsappWebhook)
    found = (whatsapp_receipt(s.id, s.status, whatsapp_time(s.timestamp, now),
                              [(e.code, e.title or e.message or "") for e in s.errors]) for s in hook.statuses())
    return [r for r in found if r is not None]


def _email(request: Request, caller: _Caller, row: ProviderRow, body: bytes, now: datetime) -> list[Receipt]:
    if not standard_webhook_verified(body, row.config.get("receipt_secret"), request.headers):
        raise _unsigned(caller, row, "webhook-signature")
    decoded = _decoded(body, EmailReceipts)
    items: list[EmailReceipt] = decoded if isinstance(decoded, list) else [decoded]
    out = []
    for i, item in enumerate(items):
        if item.type == "bounced" and item.bounce is None:
            raise invalid(f"[{i}].bounce" if isinstance(decoded, list) else "bounce",
                          "required with type bounced: hard or soft")
        at = now if item.at is None else item.at if item.at.tzinfo else item.at.replace(tzinfo=timezone.utc)
        out.append(email_receipt(item.message_id, item.type, item.bounce, at, item.reason))
    return out


# -- the OpenAPI document: a public route documents its own answers ----------------------------------

_TWILIO_FORM = Schema(type=OpenAPIType.OBJECT, description=(
    "Twilio's status callback (kind twilio), signed with `X-Twilio-Signature`; its other fields are ignored"),
    properties={"MessageSid": Schema(type=OpenAPIType.STRING), "MessageStatus": Schema(type=OpenAPIType.STRING, enum=[
        "queued", "sending", "sent", "delivered", "read", "undelivered", "failed"]),
        "ErrorCode": Schema(type=OpenAPIType.STRING)})
_EMAIL_RECEIPT = msgspec.json.schema(EmailReceipt)["$defs"]["EmailReceipt"]
_JSON_BODY = {"description": (
    "WhatsApp Cloud (kind whatsapp_cloud): Meta's webhook, `{object, entry: [{changes: [{value: {statuses: "
    "[{id, status, timestamp, recipient_id, errors}]}}]}]}`, signed with `X-Hub-Signature-256`. Email relay "
    "(kind smtp): one receipt or an array of up to 1,000, signed the Standard Webhooks way "
    "(`webhook-id`, `webhook-timestamp`, `webhook-signature`)"),
    "anyOf": [{"type": "object", "properties": {"object": {"type": "string"}, "entry": {"type": "array"}}},
              _EMAIL_RECEIPT, {"type": "array", "items": _EMAIL_RECEIPT, "maxItems": 1000}]}
_RESPONSES = {
    400: problem_response("the body is not JSON, or the client went away before its end"),
    401: problem_response("the provider's signature is missing or does not verify (or the provider has no secret "
                          "to verify it): nothing was changed"),
    404: problem_response("no provider with this id takes receipts (none, deleted, or of another kind)"),
    413: problem_response(f"the body is over {MAX_RECEIPT_BYTES} bytes"),
    422: problem_response("a signed body whose field is not as described (`errors` names it)"),
    429: problem_response("too many failed requests (404 or 401) from this address"),
    503: problem_response("Postgres cannot be reached, or the provider's secrets cannot be opened, right now"),
}


@dataclass
class _PublicOperation(Operation):
    """No token; every error is problem details, 429 and 503 with Retry-After."""

    def __post_init__(self) -> None:
        problem_content = {PROBLEM_JSON: OpenAPIMediaType(schema={"$ref": "#/components/schemas/Problem"})}  # type: ignore[arg-type]
        retry_after = {"Retry-After": OpenAPIHeader(schema=Schema(type=OpenAPIType.INTEGER, minimum=1),
                                                    description="seconds to wait before trying again")}
        for status, response in (self.responses or {}).items():
            if int(status) >= 400:
                response.content = dict(problem_content)  # type: ignore[arg-type]
                if status in ("429", "503"):
                    response.headers = dict(retry_after)  # type: ignore[arg-type]
        for parameter in self.parameters or []:
            if getattr(parameter, "name", None) == "provider_id" and isinstance(parameter.schema, Schema):  # type: ignore[union-attr]
                parameter.description = "the provider's id; anything else is the same 404"  # type: ignore[union-attr]


@dataclass
class _ReceiptsOperation(_PublicOperation):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.request_body = RequestBody(required=True, description="as the provider kind sends it", content={
            "application/x-www-form-urlencoded": OpenAPIMediaType(schema=_TWILIO_FORM),
            "application/json": OpenAPIMediaType(schema=_JSON_BODY),  # type: ignore[arg-type]
        })


# Handlers of their own, not a Controller: the document's rules (api_service/openapi.py) know a
# public route by its full path.
PATH = "/v1/receipts/{provider_id:str}"


@post(PATH, status_code=200, request_max_body_size=MAX_RECEIPT_BYTES, tags=["receipts"],
      operation_class=_ReceiptsOperation, responses=_RESPONSES,
      summary="Delivery receipts from a provider (Twilio, WhatsApp Cloud, an email relay), signed its way",
      response_description="taken: how many statuses the ledger takes, and how many messages they moved on")
async def take_receipts(request: Request, state: State, provider_id: FromPath[str]) -> ReceiptsTaken:
    settings: Settings = state.services.settings
    caller = _Caller(request, settings)
    row = await _provider(caller, state, provider_id)
    body = await _body(request)
    now = datetime.now(timezone.utc)
    if row.kind == "twilio":
        found = _twilio(request, settings, caller, row, body, now)
    elif row.kind == "whatsapp_cloud":
        found = _whatsapp(request, caller, row, body, now)
    else:
        found = _email(request, caller, row, body, now)
    async with state.services.pool.acquire() as con:
        applied = await receipts.apply_receipts(con, row.tenant_id, row.channel, found)
    return ReceiptsTaken(received=applied.received, applied=applied.moved, held=applied.held)


@get(PATH, media_type=MediaType.TEXT, tags=["receipts"], operation_class=_PublicOperation,
     responses={k: v for k, v in _RESPONSES.items() if k in (401, 404, 422, 429, 503)},
     summary="Meta's webhook verification (WhatsApp Cloud): answers hub.challenge when hub.verify_token is "
             "the provider's verify_token",
     response_description="the challenge, as text")
async def verify_receipt_endpoint(
    request: Request, state: State, provider_id: FromPath[str],
    mode: Annotated[str | None, QueryParameter(name="hub.mode", max_length=64)] = None,
    verify_token: Annotated[str | None, QueryParameter(name="hub.verify_token", max_length=1024)] = None,
    challenge: Annotated[str | None, QueryParameter(name="hub.challenge", max_length=1024)] = None,
) -> Response[str]:
    settings: Settings = state.services.settings
    caller = _Caller(request, settings)
    row = await _provider(caller, state, provider_id)
    expected = row.config.get("verify_token") if row.kind == "whatsapp_cloud" else None
    if not expected:
        raise caller.failed(caller.address, problem(404, NOT_FOUND))
    if mode != "subscribe" or verify_token is None or not hmac.compare_digest(verify_token.encode(), expected.encode()):
        raise caller.failed(f"{caller.address} {row.id}", problem(
            401, "hub.mode must be subscribe and hub.verify_token the provider's verify_token"))
    if not challenge:
        raise invalid("hub.challenge", "required field missing")
    return Response(challenge, media_type=MediaType.TEXT,
                    headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
