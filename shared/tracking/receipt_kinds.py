"""Each provider's status words as Crier's receipts (shared/tracking/receipt_statuses.py): pure.

Only statuses that say something the ledger does not know yet become receipts; the others
(Twilio's queued/sending/sent/accepted, WhatsApp's sent, any status a provider adds later) are
taken and ignored.

Twilio `undelivered` (the carrier could not deliver it) and `failed` (Twilio could not send it on)
come after the API took the message, which the ledger recorded as `sent`: the message did not
arrive, so it becomes `bounced` with the error code, counted in the engagement counters' `bounced`.
It does not become `failed`: the send counters count what the provider took (sent, failed,
unknown as the sender saw them) and never move on a receipt, and a retry resends `failed` ones,
while a number the carrier refused is not worth resending as such. Only the codes that name the
number itself are hard (the number is then suppressed); a handset switched off or carrier
filtering is not.
"""
from __future__ import annotations

from datetime import datetime, timezone

from shared.tracking.receipt_statuses import ERROR_CHARS, Receipt

# https://www.twilio.com/docs/api/errors: the 'To' number is invalid (21211), unsubscribed by STOP
# (21610), not a mobile number (21614), blocked (30004), unknown to the carrier (30005), a landline
# or unreachable carrier (30006). Others (30003 handset unreachable, 30007 filtered, 30008 unknown
# error ...) may go next time.
TWILIO_HARD_CODES = frozenset({21211, 21610, 21614, 30004, 30005, 30006})
_TWILIO = {"delivered": "delivered", "read": "read", "undelivered": "bounced", "failed": "bounced"}

# Graph API error codes of a failed status naming the recipient: not on WhatsApp / undeliverable
# (131026), the recipient is the sender (131021): as the whatsapp_cloud provider classes them.
WHATSAPP_HARD_CODES = frozenset({131026, 131021})
_WHATSAPP = {"delivered": "delivered", "read": "read", "failed": "bounced"}


def _number(value: str | int | None, digits: int = 9) -> int | None:
    """An error code or a timestamp as the provider wrote it (a number, or digits in a string)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= digits:
        return int(value.strip())
    return None


def twilio_receipt(sid: str, status: str, error_code: str | None, at: datetime) -> Receipt | None:
    """A Twilio status callback's MessageSid, MessageStatus and ErrorCode as a receipt, or None."""
    ours = _TWILIO.get(status)
    if ours is None:
        return None
    if ours != "bounced":
        return Receipt(provider_message_id=sid, status=ours, at=at)  # type: ignore[arg-type]
    code = _number(error_code)
    error = f"twilio {status}" + (f": error {code}" if code is not None else "")
    return Receipt(provider_message_id=sid, status="bounced", at=at, error=error, hard=code in TWILIO_HARD_CODES)


def whatsapp_time(timestamp: str | int | None, received: datetime) -> datetime:
    """A status's `timestamp` (Unix seconds, as a string) as a time; when it came if it has none
    that reads as one (out of range, not a number)."""
    seconds = _number(timestamp, 12)
    if seconds is None:
        return received
    try:
        return datetime.fromtimestamp(seconds, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return received


def whatsapp_receipt(wamid: str, status: str, at: datetime, errors: list[tuple[int | None, str]]) -> Receipt | None:
    """One `statuses[]` item of a WhatsApp webhook (`errors`: (code, title) of each) as a receipt, or None."""
    ours = _WHATSAPP.get(status)
    if ours is None:
        return None
    if ours != "bounced":
        return Receipt(provider_message_id=wamid, status=ours, at=at)  # type: ignore[arg-type]
    codes = [code for code, _ in errors if code is not None]
    words = "; ".join(f"code {code}: {title}" if code is not None else title for code, title in errors)
    error = f"whatsapp failed: {words}" if words else "whatsapp failed"
    return Receipt(provider_message_id=wamid, status="bounced", at=at, error=error[:ERROR_CHARS],
                   hard=any(code in WHATSAPP_HARD_CODES for code in codes))


def email_receipt(message_id: str, kind: str, bounce: str | None, at: datetime, reason: str | None) -> Receipt:
    """An email relay's receipt (the JSON shape in api_service/schemas/receipts.py). The message id
    is the Message-ID Crier set, with or without its angle brackets."""
    provider_message_id = message_id.strip().removeprefix("<").removesuffix(">")
    if kind != "bounced":
        return Receipt(provider_message_id=provider_message_id, status=kind, at=at)  # type: ignore[arg-type]
    error = f"bounced ({bounce})" + (f": {reason}" if reason else "")
    return Receipt(provider_message_id=provider_message_id, status="bounced", at=at, error=error[:ERROR_CHARS],
                   hard=bounce == "hard")
