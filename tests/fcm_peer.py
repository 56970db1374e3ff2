"""A local stand-in for Firebase Cloud Messaging's HTTP v1 API and Google's OAuth2 token endpoint
(stdlib ThreadingHTTPServer on 127.0.0.1, in a thread of the test process) that answers like them
and records what it accepts.

    with FcmPeer(unregistered={token}) as peer:
        ... send through peer.provider_config()   # its service-account key points token_uri here
        assert peer.received_by(other)[0].notification == {"title": "Hi", "body": "..."}

It holds an RSA key pair of its own: `service_account_key()` is a key file whose token_uri is the
peer's /token, which checks the JWT assertion as Google does (RS256 signature with the public key,
iss, aud, scope, iat/exp) and issues bearer tokens that messages:send then requires. The server and
its bookkeeping are tests/http_peer.py's. `python -m tests.fcm_peer --port 8098` runs a standalone
peer that prints its provider config, then one JSON line per message.
"""
from __future__ import annotations

import base64
import json
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from types import EllipsisType
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.http_peer import KEEP, Answer, HttpPeer, argument_parser, form_fields, serve

PROJECT_ID = "crier-peer"
CLIENT_EMAIL = f"crier-sender@{PROJECT_ID}.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MAX_PAYLOAD_BYTES = 4096  # FCM's limit on a message's notification and data together
_SEND = re.compile(r"^/v1/projects/([^/]+)/messages:send$")
_REGISTRATION_TOKEN = re.compile(r"^[A-Za-z0-9_:-]{32,4096}$")  # what the peer takes for a well-formed token
_MESSAGE_FIELDS = {"name", "token", "topic", "condition", "data", "notification", "android", "webpush", "apns",
                   "fcm_options"}
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


def device_token(i: int) -> str:
    """A registration token shaped like FCM's (an instance id, a colon, APA91b and ~140 characters)."""
    return f"d{i:010d}:APA91b" + base64.urlsafe_b64encode(uuid.UUID(int=i).bytes * 6).decode().rstrip("=")


@cache
def _shared_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)  # ~0.1 s: once per process


def new_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def rpc_error(code: int, status: str, message: str, *, fcm: str | None = None,
              violations: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None) -> Answer:
    """A google.rpc Status answer, as FCM's."""
    details: list[dict[str, Any]] = []
    if fcm is not None:
        details.append({"@type": FCM_ERROR, "errorCode": fcm})
    if violations is not None:
        details.append({"@type": BAD_REQUEST, "fieldViolations": violations})
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return code, {"error": error}, dict(headers or {})


def _invalid(message: str, field_name: str | None = None) -> Answer:
    violations = [{"field": field_name, "description": message}] if field_name else [{"description": message}]
    return rpc_error(400, "INVALID_ARGUMENT", message, violations=violations)


def _oauth_error(error: str, description: str, status: int = 400) -> Answer:
    return status, {"error": error, "error_description": description}, {}


@dataclass(frozen=True)
class Received:
    """One message the peer accepted (answered 200)."""

    name: str  # projects/<p>/messages/<id>, what the provider gets back
    token: str  # the device's registration token
    message: dict[str, Any]  # the request's `message`, as sent
    access_token: str  # the bearer token it came with
    at: float = field(default_factory=time.time)

    @property
    def notification(self) -> dict[str, str]:
        return self.message.get("notification") or {}

    @property
    def data(self) -> dict[str, str]:
        return self.message.get("data") or {}


class FcmPeer(HttpPeer[Received]):
    """Behaviour per device token (the message's `token`):
    - `unregistered={token}` → 404 UNREGISTERED; `mismatched={token}` → 403 SENDER_ID_MISMATCH;
      `third_party_auth={token}` → 401 THIRD_PARTY_AUTH_ERROR; a token that is not shaped like one
      → 400 INVALID_ARGUMENT "The registration token is not a valid FCM registration token";
    - `fail_transiently={token: n}` → `transient_status` (503 UNAVAILABLE or 500 INTERNAL, with
      `Retry-After: transient_retry_after` if set) for the first n requests, then accepted;
    - `rate_limit={token: n}` → 429 QUOTA_EXCEEDED (`Retry-After: retry_after`) for the first n.
    And for all: `revoke_after=n` → the first n send requests are authorised as usual, every later
    one is a 401 UNAUTHENTICATED whatever its token (a revoked grant); `expire_tokens()` → every
    token issued so far is refused from now on (401), new ones work; `expires_in` → the lifetime
    of issued tokens, after which the peer refuses them; `refuse_key=True` → the token endpoint
    answers 400 invalid_grant; `delay` / `token_delay` seconds are spent on each send / token
    request after it was taken (an accepted message is recorded first) and before it is answered.
    Messages to another project than `project_id` are a 403 PERMISSION_DENIED. `requests` and
    `max_in_flight` count token requests too. Change behaviour while running with `configure(...)`."""

    name = "FCM"
    recipient = "token"
    content_type = "application/json; charset=UTF-8"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        project_id: str = PROJECT_ID,
        client_email: str = CLIENT_EMAIL,
        private_key: rsa.RSAPrivateKey | None = None,
        unregistered: set[str] | None = None,
        mismatched: set[str] | None = None,
        third_party_auth: set[str] | None = None,
        fail_transiently: dict[str, int] | None = None,
        transient_status: int = 503,
        transient_retry_after: str | None = None,
        rate_limit: dict[str, int] | None = None,
        retry_after: str = "1",
        expires_in: int = 3600,
        revoke_after: int | None = None,
        refuse_key: bool = False,
        delay: float = 0.0,
        token_delay: float = 0.0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.project_id, self.client_email = project_id, client_email
        self.private_key = private_key or _shared_private_key()
        self.public_key = self.private_key.public_key()
        self.private_key_id = uuid.uuid4().hex
        self._issued: dict[str, float] = {}  # access token -> when it expires (time.time())
        self._send_requests = self._token_requests = self._unauthorized = 0
        self.configure(unregistered=unregistered or set(), mismatched=mismatched or set(),
                       third_party_auth=third_party_auth or set(), fail_transiently=fail_transiently or {},
                       transient_status=transient_status, transient_retry_after=transient_retry_after,
                       rate_limit=rate_limit or {}, retry_after=retry_after, expires_in=expires_in,
                       revoke_after=revoke_after, refuse_key=refuse_key, delay=delay, token_delay=token_delay)

    def configure(
        self,
        *,
        unregistered: set[str] | EllipsisType = KEEP,
        mismatched: set[str] | EllipsisType = KEEP,
        third_party_auth: set[str] | EllipsisType = KEEP,
        fail_transiently: dict[str, int] | EllipsisType = KEEP,
        transient_status: int | EllipsisType = KEEP,
        transient_retry_after: str | None | EllipsisType = KEEP,  # None: no Retry-After header
        rate_limit: dict[str, int] | EllipsisType = KEEP,
        retry_after: str | EllipsisType = KEEP,
        expires_in: int | EllipsisType = KEEP,
        revoke_after: int | None | EllipsisType = KEEP,  # None: never revoked
        refuse_key: bool | EllipsisType = KEEP,
        delay: float | EllipsisType = KEEP,
        token_delay: float | EllipsisType = KEEP,
    ) -> None:
        """Changes what is given; the rest stays as it is."""
        self._set(_unregistered=unregistered, _mismatched=mismatched, _third_party_auth=third_party_auth,
                  _fail_transiently=fail_transiently, transient_status=transient_status,
                  transient_retry_after=transient_retry_after, _rate_limit=rate_limit, retry_after=retry_after,
                  expires_in=expires_in, revoke_after=revoke_after, refuse_key=refuse_key, delay=delay,
                  token_delay=token_delay)

    def expire_tokens(self) -> None:
        """Every access token issued so far is refused from now on (as after its expiry)."""
        with self._lock:
            self._issued = {token: 0.0 for token in self._issued}

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def service_account_info(self, **overrides: Any) -> dict[str, Any]:
        """A service-account key file's fields, as Google's console downloads them, for this peer."""
        return {
            "type": "service_account", "project_id": self.project_id, "private_key_id": self.private_key_id,
            "private_key": pem(self.private_key), "client_email": self.client_email,
            "client_id": "1" + "0" * 20, "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri, "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/x",
            "universe_domain": "googleapis.com", **overrides,
        }

    def service_account_key(self, **overrides: Any) -> str:
        """The key file's JSON text (what a provider's service_account_key holds)."""
        return json.dumps(self.service_account_info(**overrides), indent=2)

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """An fcm provider config that reaches this peer (plain http, which the API accepts only
        with allow_insecure_auth)."""
        return {"service_account_key": self.service_account_key(), "base_url": self.base_url,
                "allow_insecure_auth": True, "timeout_s": 10.0, **overrides}

    # -- what was received -------------------------------------------------------------------------

    @property
    def issued(self) -> list[str]:
        """The access tokens the token endpoint issued, oldest first."""
        with self._lock:
            return list(self._issued)

    def counts(self) -> dict[str, int]:
        """requests (every one), send (messages:send), token (the token endpoint), unauthorized (401s)."""
        with self._lock:
            return {"requests": self._requests, "send": self._send_requests, "token": self._token_requests,
                    "unauthorized": self._unauthorized}

    @property
    def token_requests(self) -> int:
        with self._lock:
            return self._token_requests

    def clear(self) -> None:
        """Forget what was received and counted (issued tokens stay valid)."""
        super().clear()
        with self._lock:
            self._send_requests = self._token_requests = self._unauthorized = 0

    # -- the token endpoint (called on the peer's threads) -----------------------------------------

    def _assertion_problem(self, assertion: str) -> Answer | None:
        """Google's answer to a JWT assertion it refuses, or None."""
        try:
            head, claims, signature = assertion.split(".")
            header, payload = json.loads(_b64url(head)), json.loads(_b64url(claims))
            self.public_key.verify(_b64url(signature), f"{head}.{claims}".encode(), padding.PKCS1v15(),
                                   hashes.SHA256())
        except InvalidSignature:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        except ValueError:  # not three segments, not base64, not JSON
            return _oauth_error("invalid_grant", "Invalid JWT: not a JWT.")
        if not isinstance(header, dict) or not isinstance(payload, dict) or header.get("alg") != "RS256":
            return _oauth_error("invalid_grant", "Invalid JWT: the algorithm must be RS256.")
        if header.get("kid") not in (None, self.private_key_id):
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        if payload.get("iss") != self.client_email:
            return _oauth_error("invalid_grant", "Invalid grant: account not found")
        if payload.get("aud") != self.token_uri:
            return _oauth_error("invalid_grant", "Invalid JWT: Failed audience check.")
        if SCOPE not in str(payload.get("scope", "")).split():
            return _oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        iat, exp, now = payload.get("iat"), payload.get("exp"), time.time()
        if not isinstance(iat, int) or not isinstance(exp, int) or iat > now + 60 or exp <= now or exp - iat > 3600:
            return _oauth_error("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and "
                                                 "in a reasonable timeframe. Check your iat and exp values in the "
                                                 "JWT claim.")
        return None

    def _token(self, headers: Any, raw: bytes) -> Answer:
        with self._lock:
            self._token_requests += 1
        if not (headers.get("Content-Type") or "").startswith("application/x-www-form-urlencoded"):
            return _oauth_error("invalid_request", "Bad Request")
        form = form_fields(raw.decode("utf-8", "replace"))
        if form.get("grant_type") != JWT_BEARER:
            return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type', '')}")
        if (problem := self._assertion_problem(form.get("assertion", ""))) is not None:
            return problem
        if self.refuse_key:  # the key was deleted or the service account disabled
            return _oauth_error("invalid_grant", "Invalid grant: account not found")
        token = "ya29.peer-" + secrets.token_urlsafe(48)
        with self._lock:
            self._issued[token] = time.time() + self.expires_in
        return 200, {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}, {}

    # -- messages:send (called on the peer's threads) ----------------------------------------------

    def _authorised(self, header: str | None) -> str | None:
        """The bearer token, if it is one the peer issued and it is still good (counts the request)."""
        token = header[7:] if header and header.startswith("Bearer ") else ""
        with self._lock:
            self._send_requests += 1
            good = self._issued.get(token, 0.0) > time.time()
            if self.revoke_after is not None and self._send_requests > self.revoke_after:
                good = False
            if not good:
                self._unauthorized += 1
        return token if good else None

    def _check(self, body: Any) -> Answer | dict[str, Any]:
        """The request's `message` if FCM would take its shape, else FCM's 400."""
        if not isinstance(body, dict):
            return _invalid("Invalid JSON payload received.")
        for name in body:
            if name not in ("message", "validate_only"):
                return _invalid(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')
        message = body.get("message")
        if not isinstance(message, dict):
            return _invalid("Request contains an invalid argument.", "message")
        for name in message:
            if name not in _MESSAGE_FIELDS:
                return _invalid(f'Invalid JSON payload received. Unknown name "{name}" at \'message\': Cannot find '
                                'field.')
        if sum(k in message for k in ("token", "topic", "condition")) != 1:
            return _invalid("Exactly one of token, topic or condition must be given.", "message")
        notification = message.get("notification", {})
        if not isinstance(notification, dict) or any(
                k not in ("title", "body", "image") or not isinstance(v, str) for k, v in notification.items()):
            return _invalid("Invalid value at 'message.notification'.", "message.notification")
        data = message.get("data", {})
        if not isinstance(data, dict):
            return _invalid("Invalid value at 'message.data'.", "message.data")
        for i, (k, v) in enumerate(data.items()):
            if not isinstance(v, str):
                return _invalid(f"Invalid value at 'message.data[{i}].value' (TYPE_STRING), {v}",
                                f"message.data[{i}].value")
            if k in ("from", "message_type") or k.startswith(("google.", "gcm.")):
                return _invalid(f"Invalid data payload key: {k}", "message.data")
        link = ((message.get("webpush") or {}).get("fcm_options") or {}).get("link")
        if link is not None and (not isinstance(link, str) or not link.startswith("https://")):
            return _invalid("The link must be an HTTPS URL.", "message.webpush.fcm_options.link")
        if len(json.dumps({"n": notification, "d": data}).encode()) > MAX_PAYLOAD_BYTES:
            return _invalid("Message is too big.", "message")
        return message

    def _send(self, project: str, headers: Any, raw: bytes) -> Answer:
        token = self._authorised(headers.get("Authorization"))
        if token is None:
            return rpc_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth "
                             "2 access token, login cookie or other valid authentication credential.",
                             headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'})
        if project != self.project_id:
            return rpc_error(403, "PERMISSION_DENIED", "Permission 'cloudmessaging.messages.create' denied on resource "
                             f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist).")
        try:
            checked = self._check(json.loads(raw))
        except ValueError:
            checked = _invalid("Invalid JSON payload received.")
        if isinstance(checked, tuple):
            return checked
        device = checked.get("token")
        if not isinstance(device, str) or not _REGISTRATION_TOKEN.match(device):
            return rpc_error(400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token",
                             fcm="INVALID_ARGUMENT")
        with self._lock:
            self._attempt(device)
            if device in self._unregistered:
                return rpc_error(404, "NOT_FOUND", "Requested entity was not found.", fcm="UNREGISTERED")
            if device in self._mismatched:
                return rpc_error(403, "PERMISSION_DENIED", "SenderId mismatch", fcm="SENDER_ID_MISMATCH")
            if device in self._third_party_auth:
                return rpc_error(401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service",
                                 fcm="THIRD_PARTY_AUTH_ERROR")
            if self._use_up(self._rate_limit, device):
                return rpc_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send requests'.",
                                 fcm="QUOTA_EXCEEDED", headers={"Retry-After": self.retry_after})
            if self._use_up(self._fail_transiently, device):
                extra = {"Retry-After": self.transient_retry_after} if self.transient_retry_after else {}
                if self.transient_status == 500:
                    return rpc_error(500, "INTERNAL", "Internal error encountered.", fcm="INTERNAL", headers=extra)
                return rpc_error(503, "UNAVAILABLE", "The service is currently unavailable.", fcm="UNAVAILABLE",
                                 headers=extra)
            name = f"projects/{project}/messages/0:{int(time.time() * 1e6)}%{uuid.uuid4().hex[:16]}"
            self._received.append(Received(name=name, token=device, message=checked, access_token=token))
        return 200, {"name": name}, {}

    def answer(self, path: str, headers: Any, raw: bytes, number: int) -> Answer:
        """As Google would answer it."""
        path = path.split("?", 1)[0]
        if path == "/token":
            return self._token(headers, raw)
        if (match := _SEND.match(path)) is not None:
            return self._send(match.group(1), headers, raw)
        return rpc_error(404, "NOT_FOUND", "Requested entity was not found.")

    def delay_for(self, path: str) -> float:
        return self.token_delay if path.startswith("/token") else self.delay

    def not_allowed(self) -> Answer:
        return rpc_error(405, "INVALID_ARGUMENT", "Method not allowed.")


@pytest.fixture
def fcm_peer() -> Iterator[FcmPeer]:
    """A started peer with no failures configured; reconfigure it with `fcm_peer.configure(...)`."""
    with FcmPeer() as peer:
        yield peer


def main() -> None:
    parser = argument_parser("a recording FCM HTTP v1 peer: prints its provider config, then one JSON line per "
                             "message", 8098)
    parser.add_argument("--project-id", default=PROJECT_ID)
    args = parser.parse_args()
    peer = FcmPeer(host=args.host, port=args.port, project_id=args.project_id, delay=args.delay).start()
    serve(peer, lambda r: {"name": r.name, "token": r.token, "notification": r.notification, "data": r.data})


if __name__ == "__main__":
    main()
