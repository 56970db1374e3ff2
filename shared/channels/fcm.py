"""Push notifications through Firebase Cloud Messaging's HTTP v1 API: one JSON POST per device token
to {base_url}/v1/projects/{project_id}/messages:send, a job's messages sent concurrently
(http_send.py) on a client kept per account (http_client.py), the way twilio.py sends SMS.

FCM takes an OAuth2 access token, made from the tenant's service-account key: google-auth loads the
key and signs the JWT assertion, but the exchange at the key's token_uri is ours, on the account's
guarded client. google-auth's own refresh would block the event loop on its own HTTP stack and
connect around the outbound address check; ours is async and checked like every other connection.
The token is kept per key, shared by the jobs of this process, until shortly before it expires;
a 401 from FCM replaces it once.

FCM does not dedupe: a request that may have reached it and got no answer is never resent
(OUTCOME_UNKNOWN); only answers that prove nothing was sent are retryable. The key, the assertion
and the access token never go into an error or a log line: errors are built from our own words and
the servers' texts, scrubbed, and nothing here logs a traceback (a console traceback shows locals).
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import httpx
import msgspec
from google.auth import jwt
from google.oauth2 import service_account

from shared.channels import http_client
from shared.channels.http_send import (
    ERROR_TEXT_CHARS,
    TRANSPORT_ERRORS,
    Answer,
    HttpProvider,
    Retry,
    failed,
    no_answer,
    post,
    retry_after_s,
)
from shared.channels.provider import (
    ADDRESS_DEAD,
    AUTH_FAILED,
    CONNECTION_LOST,
    DEFERRED,
    INVALID_MESSAGE,
    OUTCOME_UNKNOWN,
    REJECTED,
    TLS_UNAVAILABLE,
    OutgoingMessage,
    ProviderUnavailable,
    PushContent,
    SendResult,
)
from shared.platform.logging import get_logger

DEFAULT_BASE_URL = "https://fcm.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_S = 3600  # Google refuses an assertion that lives longer
REFRESH_MARGIN_S = 300.0  # a token is replaced this long before it expires (half its life if that is shorter)
DEFAULT_CONCURRENCY, MAX_CONCURRENCY = 10, 100
MAX_KEY_CHARS = 16 * 1024  # a 4096-bit key file is under 4 KiB
MAX_DEVICE_TOKEN_CHARS = 4096
PROJECT_ID_RE = r"[a-z0-9][a-z0-9.:-]{0,98}[a-z0-9]"  # goes into the URL's path: nothing else may (fullmatch)
_URL_HOST = re.compile(r"[A-Za-z0-9._:-]+")  # what urlsplit leaves of a name or an address (fullmatch)
# A token with blanks or control characters was mangled on its way in (a CSV cell, a trailing
# newline): it can never be delivered, so it is not sent. Anything else is for FCM to judge.
_MANGLED_TOKEN = re.compile(r"[\s\x00-\x1f\x7f]")

_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
# FcmError codes (firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode) that say this device
# token will never take a message from this project: the worker removes it from the contact.
_DEAD_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})

log = get_logger(__name__)


# -- the key and the settings ------------------------------------------------------------------------


class KeyProblem(ValueError):
    """The service-account key cannot be used. The text names what is wrong, never a value of the key."""


class ServiceAccountKey(msgspec.Struct, frozen=True, kw_only=True):
    """The fields Crier reads of a service-account key file (the others are ignored)."""

    type: str = "service_account"
    client_email: str
    private_key: str
    private_key_id: str | None = None
    token_uri: str
    project_id: str | None = None

    def __repr__(self) -> str:  # never the private key, wherever a key ends up printed
        return f"ServiceAccountKey(client_email={self.client_email!r}, project_id={self.project_id!r})"


def parse_key(value: str | Mapping[str, Any]) -> ServiceAccountKey:
    """The key from its JSON text (as stored) or an object; raises KeyProblem."""
    if isinstance(value, str):
        if len(value) > MAX_KEY_CHARS:
            raise KeyProblem(f"longer than {MAX_KEY_CHARS} characters")
        try:
            value = msgspec.json.decode(value)
        except msgspec.DecodeError:
            raise KeyProblem("not JSON: paste the whole key file, as downloaded") from None
    if not isinstance(value, Mapping):
        raise KeyProblem("not a JSON object: paste the whole key file, as downloaded")
    try:
        key = msgspec.convert(value, ServiceAccountKey)
    except msgspec.ValidationError as exc:  # names the field ("Object missing required field `x`"), not the value
        raise KeyProblem(str(exc)) from None
    if key.type != "service_account":
        raise KeyProblem("type must be service_account (a key of a service account, not of a user or an API key)")
    for name in ("client_email", "private_key", "token_uri"):
        if not getattr(key, name).strip():
            raise KeyProblem(f"{name} is empty")
    if "@" not in key.client_email:
        raise KeyProblem("client_email is not the service account's email address")
    return key


def load_signer(key: ServiceAccountKey) -> Any:
    """google-auth's RS256 signer of the key's private key; raises KeyProblem if it does not load."""
    info = {"client_email": key.client_email, "private_key": key.private_key, "token_uri": key.token_uri,
            "private_key_id": key.private_key_id}
    try:
        signer = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE]).signer
        signer.sign(b"crier")  # a key of another type loads but cannot sign RS256: found now, not at the first send
    except Exception:  # its message may quote the PEM: not passed on
        raise KeyProblem("private_key is not a PEM RSA private key that loads") from None
    return signer


def endpoint_problem(url: str, *, allow_insecure_auth: bool) -> str | None:
    """Why `url` cannot be an endpoint Crier sends credentials to, or None."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not a number or out of range
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname or not _URL_HOST.fullmatch(parts.hostname):
        return "must be an http or https URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user or password"
    if parts.query or parts.fragment:
        return "must not have a query or a fragment"
    if parts.scheme == "http" and not allow_insecure_auth:
        return ("credentials are only sent over https: use an https URL, or set allow_insecure_auth to true to "
                "send them in clear")
    return None


class FcmConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The stored config of an fcm provider (see api_service/schemas/provider_fcm.py); unknown keys are ignored."""

    service_account_key: str | dict[str, Any]  # the key file's JSON text (an object is read too)
    project_id: str | None = None  # None: the key's
    base_url: str = DEFAULT_BASE_URL
    allow_insecure_auth: bool = False
    concurrency: int = DEFAULT_CONCURRENCY
    timeout_s: float = 30.0

    def __repr__(self) -> str:
        return f"FcmConfig(project_id={self.project_id!r}, base_url={self.base_url!r})"

    @property
    def bounded_concurrency(self) -> int:
        return max(1, min(MAX_CONCURRENCY, self.concurrency))


def message_body(message: OutgoingMessage, content: PushContent) -> dict[str, Any]:
    """The send request's body. The click-through URL goes to data.url (for the app to open) and,
    when https, to webpush.fcm_options.link (FCM refuses any other link)."""
    notification = {k: v for k, v in (("title", content.title), ("body", content.body),
                                      ("image", content.image_url)) if v}
    data = dict(content.data)
    if content.url:
        data.setdefault("url", content.url)  # the tenant's own data.url wins
    body: dict[str, Any] = {"token": message.to}
    if notification:
        body["notification"] = notification
    if data:
        body["data"] = data
    if content.url and content.url.startswith("https://"):
        body["webpush"] = {"fcm_options": {"link": content.url}}
    return {"message": body}


# -- answers -----------------------------------------------------------------------------------------


class _FcmError(NamedTuple):
    status: str | None  # google.rpc status: INVALID_ARGUMENT, NOT_FOUND ...
    code: str | None  # the FcmError detail's errorCode: UNREGISTERED ...
    text: str  # for the ledger
    about_token: bool  # an INVALID_ARGUMENT that blames the registration token


def _fcm_error(answer: Answer) -> _FcmError:
    """The google.rpc Status of an FCM error answer, read defensively (any server may answer)."""
    body = answer.json()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        raw = answer.excerpt()
        return _FcmError(None, None, f"fcm {answer.status}: {raw}" if raw else f"fcm {answer.status}", False)
    status = error.get("status") if isinstance(error.get("status"), str) else None
    detail = str(error.get("message") or "")
    code, about_token = None, "registration token" in detail.lower()
    for d in error.get("details") if isinstance(error.get("details"), list) else ():
        if not isinstance(d, dict):
            continue
        if d.get("@type") == _FCM_ERROR and isinstance(d.get("errorCode"), str):
            code = d["errorCode"]
        if d.get("@type") == _BAD_REQUEST and isinstance(d.get("fieldViolations"), list):
            about_token |= any(isinstance(v, dict) and v.get("field") == "message.token"
                               for v in d["fieldViolations"])
    text = f"fcm {answer.status} {code or status or ''}".rstrip() + (f": {detail}" if detail else "")
    return _FcmError(status, code, text[:ERROR_TEXT_CHARS], about_token)


# -- access tokens -----------------------------------------------------------------------------------


class _TokenRefused(Exception):
    """No access token: (text, retryable, failure) as a message's result takes them."""

    def __init__(self, text: str, retryable: bool, failure: str) -> None:
        super().__init__(text)
        self.text, self.retryable, self.failure = text, retryable, failure


class _Tokens:
    """One key's access token. One request at a time fetches it, and every message waiting for it
    takes that request's outcome (a token endpoint that is down gets one request, not one per
    message); a failure is not kept, the next message after it asks again."""

    def __init__(self, key: ServiceAccountKey, signer: Any) -> None:
        self._key, self._signer = key, signer
        self._token: str | None = None
        self._renew_at = 0.0  # loop time
        self._flight: asyncio.Task[str] | None = None

    def __repr__(self) -> str:
        return f"_Tokens({self._key.client_email!r})"

    async def get(self, client: httpx.AsyncClient, timeout_s: float) -> str:
        loop = asyncio.get_running_loop()
        if self._token is not None and loop.time() < self._renew_at:
            return self._token
        if self._flight is None:
            self._flight = loop.create_task(self._fetch(client, timeout_s))
            self._flight.add_done_callback(self._landed)
        # Shielded: one job called off mid-wait must not cancel the fetch the others wait for.
        return await asyncio.shield(self._flight)

    def discard(self, token: str) -> None:
        """FCM refused `token`: the next get() fetches another, unless one already replaced it (several
        requests in flight with the old token all come back 401; one new token is enough)."""
        if self._token == token:
            self._token = None

    def _landed(self, flight: asyncio.Task[str]) -> None:
        self._flight = None
        if not flight.cancelled():
            flight.exception()  # retrieved: its waiters may all be gone

    def _assertion(self) -> str:
        now = int(time.time())
        return jwt.encode(self._signer, {
            "iss": self._key.client_email, "scope": SCOPE, "aud": self._key.token_uri,
            "iat": now, "exp": now + ASSERTION_LIFETIME_S,
        }).decode()

    async def _fetch(self, client: httpx.AsyncClient, timeout_s: float) -> str:
        assertion = self._assertion()

        def scrub(text: str) -> str:
            return text.replace(assertion, "[assertion]").replace(self._key.private_key, "[private_key]")

        try:
            answer = await post(client, self._key.token_uri, timeout_s,
                                data={"grant_type": JWT_BEARER, "assertion": assertion})
        except (*TRANSPORT_ERRORS, TimeoutError) as exc:
            # Not chained: an httpx error holds the request, and the request holds the assertion.
            raise _TokenRefused(*no_answer("fcm token", exc, sent=False)) from None
        except Exception as exc:  # a message's result, never send() raising; nothing reached FCM
            log.error("fcm token request failed unexpectedly", error=type(exc).__name__)  # no traceback: locals
            raise _TokenRefused(f"fcm token request failed: {type(exc).__name__}", True, CONNECTION_LOST) from None
        body = answer.json()
        if 200 <= answer.status < 300:
            token = body.get("access_token") if isinstance(body, dict) else None
            kind = body.get("token_type", "Bearer") if isinstance(body, dict) else None
            if not isinstance(token, str) or not token or not isinstance(kind, str) or kind.lower() != "bearer":
                raise _TokenRefused("fcm token endpoint answered without a bearer access_token", False, REJECTED)
            expires_in = body.get("expires_in")
            life = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else 3600.0
            self._token = token
            self._renew_at = asyncio.get_running_loop().time() + life - min(REFRESH_MARGIN_S, life / 2)
            return token
        error = body.get("error") if isinstance(body, dict) else None
        described = body.get("error_description") if isinstance(body, dict) else None
        text = f"fcm token endpoint {answer.status}" + (f": {error}" if isinstance(error, str) else "")
        text = scrub(text + (f" ({described})" if isinstance(described, str) else ""))[:ERROR_TEXT_CHARS]
        if answer.status in (400, 401, 403):  # invalid_grant (a deleted or disabled key, a bad signature) ...
            raise _TokenRefused(text, False, AUTH_FAILED)
        if answer.status == 429 or answer.status >= 500:
            raise _TokenRefused(text, True, DEFERRED)
        raise _TokenRefused(text, False, REJECTED)


def _fingerprint(key: ServiceAccountKey) -> str:
    """The key as a cache key: a changed key is another account and token, and no cache key holds it."""
    return hashlib.sha256(f"{key.client_email}\0{key.private_key}\0{key.token_uri}".encode()).hexdigest()


MAX_KEYS = 256  # keys whose token is kept per loop; the least recently used one is dropped first
_tokens: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, OrderedDict[str, _Tokens]] = (
    weakref.WeakKeyDictionary()
)


def _tokens_of(key: ServiceAccountKey, allow_private: bool) -> _Tokens:
    """The loop's token holder for `key`, made (its key loaded) the first time. Per key, not per
    client: jobs with other settings (concurrency, base_url) share the key's token. Per loop: a
    fetch is a task of the loop (in a sender, one loop is the process)."""
    cache = _tokens.setdefault(asyncio.get_running_loop(), OrderedDict())
    name = f"{_fingerprint(key)}:{allow_private}"
    tokens = cache.get(name)
    if tokens is None:
        tokens = cache[name] = _Tokens(key, load_signer(key))  # loading an RSA key costs milliseconds: once
        while len(cache) > MAX_KEYS:
            cache.popitem(last=False)
    cache.move_to_end(name)
    return tokens


@dataclass(eq=False)
class _Push:
    """One message's request, across its attempts: its body, and the access token it goes with,
    taken right before each attempt (a 401 replaces it, once)."""

    payload: bytes
    token: str = ""
    refreshed: bool = False


# -- the provider ------------------------------------------------------------------------------------


class FcmProvider(HttpProvider[_Push]):
    name = "fcm"

    def __init__(self, config: dict[str, Any], *, allow_private_networks: bool = False) -> None:
        self.config = msgspec.convert(config, FcmConfig)
        # Both hosts must resolve to public addresses only, unless private networks are allowed.
        super().__init__(allow_private_networks=allow_private_networks)
        self._base = self.config.base_url.rstrip("/")
        self._project = self._url = ""  # known once open() read the key
        self._tokens: _Tokens | None = None

    @property
    def _log_fields(self) -> dict[str, Any]:
        return {"project": self._project}

    async def open(self) -> None:
        """Checks the key, the project and both hosts (a private one is refused), takes the
        account's shared client and makes sure of an access token. No message is sent, but the key
        is tried: a provider test tells a refused key, and a job whose key is refused (or whose
        token endpoint is down, retryable) stops here, before any message is touched."""
        if self._shared is not None:
            return
        c = self.config
        try:
            key = parse_key(c.service_account_key)
        except KeyProblem as exc:
            raise ProviderUnavailable(f"fcm service_account_key: {exc}", retryable=False, failure=AUTH_FAILED) from None
        project = c.project_id or key.project_id or ""
        if not re.fullmatch(PROJECT_ID_RE, project):
            raise ProviderUnavailable("fcm project_id is missing or not a project ID", retryable=False,
                                      failure=REJECTED)
        for what, url in (("base_url", self._base), ("token_uri", key.token_uri)):
            await self._check_endpoint(what, url)
        self._project, self._url = project, f"{self._base}/v1/projects/{quote(project, safe=':')}/messages:send"
        try:
            self._tokens = _tokens_of(key, self.allow_private_networks)
        except KeyProblem as exc:
            raise ProviderUnavailable(f"fcm service_account_key: {exc}", retryable=False, failure=AUTH_FAILED) from None
        self._shared = http_client.acquire(self._client_key(key, project), self._make_client)
        try:
            await self._tokens.get(self._shared.client, c.timeout_s)  # a cached one costs nothing
        except _TokenRefused as exc:
            await self.close()
            raise ProviderUnavailable(exc.text, retryable=exc.retryable, failure=exc.failure) from None

    async def _check_endpoint(self, what: str, url: str) -> None:
        if problem := endpoint_problem(url, allow_insecure_auth=self.config.allow_insecure_auth):
            # The API refuses to save this; a config that got here anyway sends nothing.
            failure = TLS_UNAVAILABLE if urlsplit(url).scheme == "http" else REJECTED
            raise ProviderUnavailable(f"fcm {what} {problem}", retryable=False, failure=failure)
        parts = urlsplit(url)
        await self._resolve(parts.hostname or "", parts.port, parts.scheme, what=what, endpoint=what)

    def _client_key(self, key: ServiceAccountKey, project: str) -> tuple[Any, ...]:
        return ("fcm", self._base, project, _fingerprint(key), self.config.bounded_concurrency,
                self.allow_private_networks)

    def _request(self, message: OutgoingMessage) -> _Push | SendResult:
        """The body of `message`'s send request, or its failure when it cannot be sent as given."""
        content = message.content
        if not isinstance(content, PushContent):
            return failed(message, "not a push: fcm sends PushContent", False, INVALID_MESSAGE)
        if not message.to or len(message.to) > MAX_DEVICE_TOKEN_CHARS or _MANGLED_TOKEN.search(message.to):
            return failed(message, "not an FCM registration token (empty, too long, or with blanks)", False,
                          ADDRESS_DEAD)
        if not (content.title or content.body or content.image_url or content.data or content.url):
            return failed(message, "empty push: no title, body, image or data", False, INVALID_MESSAGE)
        return _Push(msgspec.json.encode(message_body(message, content)))

    async def _ready(self, message: OutgoingMessage, push: _Push) -> SendResult | None:
        """The access token, before the commit: a message is in flight only once it can go. Its
        request, when there is one, takes the message's place among the requests in flight."""
        assert self._tokens is not None
        try:
            push.token = await self._tokens.get(self._client, self.config.timeout_s)
        except _TokenRefused as exc:
            if exc.failure == AUTH_FAILED:
                self._stop(exc.text)
            return failed(message, exc.text, exc.retryable, exc.failure)
        return None

    async def _post(self, message: OutgoingMessage, push: _Push) -> Answer:
        return await post(self._client, self._url, self.config.timeout_s, content=push.payload,
                          headers={"Authorization": f"Bearer {push.token}", "Content-Type": "application/json"})

    def _unexpected(self, message: OutgoingMessage, exc: Exception) -> SendResult:
        log.error("fcm request failed unexpectedly", error=type(exc).__name__)  # no traceback: locals
        return failed(message, f"outcome unknown: {type(exc).__name__}", False, OUTCOME_UNKNOWN)

    def _outcome(self, message: OutgoingMessage, push: _Push, answer: Answer, times: int) -> SendResult | Retry:
        assert self._tokens is not None
        if answer.status == 401 and _fcm_error(answer).code != "THIRD_PARTY_AUTH_ERROR":
            # The token expired or was revoked early, and FCM sent nothing: the next request (this
            # one's, or the next job's) takes a new token. This one tries once more with it.
            self._tokens.discard(push.token)
            if not push.refreshed:
                push.refreshed = True
                return Retry(0.0, account=False)
        if answer.status == 429:
            return self._rate_limited(answer)
        return self._push_result(message, answer, push.token)

    def _stop(self, text: str) -> None:
        """The key, the token or the project is refused: the rest of the job fails at once instead
        of hammering Google with credentials it refuses."""
        if self._stopped is None:
            log.warning("fcm refused the credentials", base_url=self._base, error=text)
        self._stopped = (AUTH_FAILED, text)

    def _push_result(self, message: OutgoingMessage, answer: Answer, token: str) -> SendResult:
        status = answer.status
        if 200 <= status < 300:
            body = answer.json()
            name = body.get("name") if isinstance(body, dict) and isinstance(body.get("name"), str) else None
            return SendResult(contact_id=message.contact_id, ok=True, provider_message_id=name)
        error = _fcm_error(answer)
        text = error.text.replace(token, "[access_token]")  # a server may echo what it was sent
        if error.code in _DEAD_CODES:
            return failed(message, text, False, ADDRESS_DEAD)
        if status in (401, 403) or error.code == "THIRD_PARTY_AUTH_ERROR":
            # The token again after a refresh, the project's permission, or the APNs / web push
            # credentials FCM holds for the app: none of the job's messages can go.
            self._stop(text)
            return failed(message, text, False, AUTH_FAILED)
        if status == 400 or error.code == "INVALID_ARGUMENT" or error.status == "INVALID_ARGUMENT":
            return failed(message, text, False, ADDRESS_DEAD if error.about_token else INVALID_MESSAGE)
        if status >= 500:  # UNAVAILABLE, INTERNAL: nothing was sent
            if retry_after := answer.headers.get("retry-after"):
                assert self._shared is not None
                self._shared.pause(retry_after_s(retry_after))  # the retry (and the account) waits at least that long
            return failed(message, text, True, DEFERRED)
        # A 404 that is not UNREGISTERED (a wrong project or base URL) and the rest: not the token's fault.
        return failed(message, text, False, REJECTED)

    async def close(self) -> None:
        """Gives the account's client back: its connections and the key's token stay for the next job."""
        await super().close()
        self._tokens = None
