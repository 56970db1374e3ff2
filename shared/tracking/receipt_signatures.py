"""How each provider signs its status callbacks, checked here: pure, no I/O. Every check compares
in constant time and says only yes or no (never why, never a secret).

- Twilio: `X-Twilio-Signature` is base64(HMAC-SHA1(auth token, URL + each POST parameter's name
  and value, sorted by name)). The URL is the one Twilio called, as configured in StatusCallback;
  like Twilio's own validator, it is tried with and without the scheme's default port.
- Meta (WhatsApp Cloud): `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app secret, raw body)>`.
- Standard Webhooks (email relays): `webhook-id`, `webhook-timestamp` (within 5 minutes of now)
  and `webhook-signature` (`v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, several
  space-separated allowed), keyed with the `whsec_` secret's bytes.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from standardwebhooks import Webhook, WebhookVerificationError

from shared.channels.webhook import secret_bytes

_DEFAULT_PORTS = {"http": 80, "https": 443}


def twilio_signature(url: str, params: Iterable[tuple[str, str]], auth_token: str) -> str:
    """Twilio's signature of a form POST to `url` (each name and value once, sorted, as its SDKs do)."""
    data = url + "".join(name + value for name, value in sorted(set(params)))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def _with_and_without_port(url: str) -> list[str]:
    """`url`, and with a default port it has dropped (or one it lacks added): proxies and SDKs
    differ in which of the two Twilio is given and signs."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme)
    if default is None or parts.hostname is None or parts.port not in (None, default):
        return [url]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    bare, ported = (urlunsplit(parts._replace(netloc=n)) for n in (host, f"{host}:{default}"))
    return list(dict.fromkeys([url, bare, ported]))


def twilio_verified(url: str, params: list[tuple[str, str]], auth_token: str | None, signature: str | None) -> bool:
    if not auth_token or not signature:
        return False
    given = signature.strip().encode()
    return any(hmac.compare_digest(twilio_signature(u, params, auth_token).encode(), given)
               for u in _with_and_without_port(url))


def meta_verified(body: bytes, app_secret: str | None, header: str | None) -> bool:
    """X-Hub-Signature-256 over the raw body (as received: not re-encoded JSON)."""
    if not app_secret or not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), header[len("sha256="):].strip().lower().encode())


def standard_webhook_verified(body: bytes, secret: str | None, headers: Mapping[str, str]) -> bool:
    """The Standard Webhooks signature (standardwebhooks' verify, which also refuses a timestamp
    more than 5 minutes from now: an old request cannot be replayed later)."""
    if not secret:
        return False
    try:
        key = secret_bytes(secret)
        Webhook(key).verify(body, {name: headers.get(name) or "" for name in (
            "webhook-id", "webhook-timestamp", "webhook-signature")}, json_parse=False)
    except (WebhookVerificationError, ValueError, binascii.Error, UnicodeDecodeError, OverflowError, OSError):
        # Missing or malformed headers ("v1" without a comma, bad base64, a timestamp no date has)
        # and a body that is not UTF-8 all raise something: each is a signature that does not verify.
        return False
    return True
