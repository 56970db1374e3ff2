"""Domain errors raised by deciders; the API maps each to a problem-details status."""
from __future__ import annotations


class DomainError(Exception):
    code = "domain_error"


class NotFound(DomainError):
    code = "not_found"


class AlreadyExists(DomainError):
    code = "already_exists"


class WrongStatus(DomainError):
    """The command is not allowed in the aggregate's current status (HTTP 409)."""

    code = "wrong_status"

    def __init__(self, action: str, status: str) -> None:
        self.action, self.status = action, status
        super().__init__(f"cannot {action} a broadcast that is {status}")


class Invalid(DomainError):
    """A rule about the command's content is broken (HTTP 422), naming the field."""

    code = "invalid"

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


class Conflict(DomainError):
    """The command is allowed in the aggregate's status, but its data leaves nothing for it to do
    (HTTP 409). `code` names why (e.g. `nothing_to_retry`); `extra` goes into the problem."""

    def __init__(self, code: str, detail: str, **extra: object) -> None:
        self.code, self.extra = code, extra
        super().__init__(detail)
