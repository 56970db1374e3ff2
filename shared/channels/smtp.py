"""Email over SMTP (aiosmtplib): one connection per job, a multipart/alternative message per recipient."""
from __future__ import annotations

import asyncio
import re
import socket
import ssl
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import formatdate, parseaddr
from html.parser import HTMLParser
from typing import Any

import aiosmtplib
import msgspec

from shared.channels.provider import (
    AUTH_FAILED,
    CONNECTION_LOST,
    DEFERRED,
    INVALID_MESSAGE,
    OUTCOME_UNKNOWN,
    REFUSED_PRIVATE_ADDRESS,
    REJECTED,
    TIMEOUT,
    TLS_FAILED,
    TLS_UNAVAILABLE,
    UNREACHABLE,
    WITHDRAWN,
    Commit,
    CommitFailed,
    OutgoingMessage,
    ProviderUnavailable,
    SendResult,
)
from shared.platform import netguard
from shared.platform.logging import get_logger

# Headers a caller's `headers` may not replace: the MIME structure, and the Message-ID that makes
# duplicates detectable downstream.
_RESERVED_HEADERS = frozenset({"content-type", "content-transfer-encoding", "mime-version", "message-id"})
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_PERIOD = re.compile(rb"(?m)^\.")
_FULL_DOCUMENT = re.compile(r"\A\s*(?:<!--.*?-->\s*)*(?:<!doctype\b|<html\b)", re.IGNORECASE | re.DOTALL)
_local_hostname: str | None = None
log = get_logger(__name__)


class SmtpConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The stored config of an smtp provider (see api_service/schemas/providers.py); unknown keys are ignored."""

    host: str
    port: int | None = None  # 587, or 465 with implicit_tls
    username: str | None = None
    password: str | None = None
    starttls: bool | None = None  # None: STARTTLS unless implicit_tls
    implicit_tls: bool = False
    tls_verify: bool = True
    timeout_s: float = 30.0
    from_email: str | None = None
    allow_insecure_auth: bool = False  # checked when saved (the API); a login in clear needs it said

    @property
    def resolved_port(self) -> int:
        return self.port or (465 if self.implicit_tls else 587)

    @property
    def resolved_starttls(self) -> bool:
        return (not self.implicit_tls) if self.starttls is None else self.starttls


def message_id_of(idempotency_key: str) -> str:
    """Stable across retries, so a receiver (or a test) can spot a duplicate."""
    return f"<{idempotency_key.replace(':', '.')}@crier>"


def wrap_html(html: str) -> str:
    if _FULL_DOCUMENT.match(html):
        return html
    return f'<!doctype html><html><head><meta charset="utf-8"></head><body>{html}</body></html>'


class _TextOfHtml(HTMLParser):
    """A plain-text part for messages that only have HTML: the text, one line per block, links kept."""

    _BLOCKS = frozenset({"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "section"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self.skip += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self.skip = max(0, self.skip - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def text_of_html(html: str) -> str:
    parser = _TextOfHtml()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def build_mime(message: OutgoingMessage, *, utf8: bool = False) -> bytes:
    """The RFC 5322 message: text/plain and text/html alternatives, quoted-printable so it is 7-bit clean."""
    email = message.content
    mime = EmailMessage(policy=SMTPUTF8 if utf8 else SMTP)
    mime["From"] = email.from_email
    mime["To"] = message.to
    mime["Subject"] = email.subject
    mime["Date"] = formatdate(usegmt=True)
    mime["Message-ID"] = message_id_of(message.idempotency_key)
    if email.reply_to:
        mime["Reply-To"] = email.reply_to
    if message.unsubscribe_link is not None:
        mime["List-Unsubscribe"] = f"<{message.unsubscribe_link(message.contact_id)}>"
        mime["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    for name, value in email.headers.items():
        if name.lower() in _RESERVED_HEADERS:
            continue
        del mime[name]
        mime[name] = value
    text = email.text or (text_of_html(email.html) if email.html else "")
    mime.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
    if email.html:
        mime.add_alternative(wrap_html(email.html), subtype="html", charset="utf-8", cte="quoted-printable")
        for part in mime.iter_parts():
            del part["MIME-Version"]  # add_alternative stamps the part too; it belongs on the top level only
    return mime.as_bytes()


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    if smtp.is_ehlo_or_helo_needed:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            await smtp.helo()


async def _default_local_hostname() -> str:
    # getfqdn can take seconds with a slow resolver: once per process, not once per connection.
    global _local_hostname
    if _local_hostname is None:
        _local_hostname = await asyncio.to_thread(socket.getfqdn)
    return _local_hostname


def _is_bare_address(address: str) -> bool:
    """An addr-spec the envelope can carry as is (no display name, no spaces, one @ with both sides)."""
    local, at, domain = address.rpartition("@")
    if not (at and local and domain) or any(c.isspace() for c in address):
        return False
    return parseaddr(address) == ("", address)


def _failed(message: OutgoingMessage, error: str, retryable: bool, failure: str) -> SendResult:
    return SendResult(contact_id=message.contact_id, ok=False, error=error, retryable=retryable, failure=failure)


def _unavailable(exc: Exception, where: str, step: str) -> ProviderUnavailable:
    """What a failed session start means: a failure class, and the details for the ledger and logs."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return ProviderUnavailable(f"smtp login to {where} refused: {exc.code} {exc.message}",
                                   retryable=400 <= exc.code < 500, failure=AUTH_FAILED)
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):  # the greeting was not 220
        return ProviderUnavailable(f"smtp {where} refused the session: {exc.code} {exc.message}",
                                   retryable=400 <= exc.code < 500, failure=REJECTED)
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):  # implicit TLS: wrapped
        return ProviderUnavailable(f"smtp TLS with {where} failed: {exc}", retryable=False, failure=TLS_FAILED)
    if isinstance(exc, TimeoutError):
        return ProviderUnavailable(f"smtp {where} timed out ({step}): {exc}", failure=TIMEOUT)
    if isinstance(exc, (OSError, UnicodeError)):
        return ProviderUnavailable(f"cannot connect to smtp {where}: {exc}", failure=UNREACHABLE)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return ProviderUnavailable(f"smtp {where} refused the session ({step}): {exc.code} {exc.message}",
                                   retryable=400 <= exc.code < 500, failure=REJECTED)
    return ProviderUnavailable(f"smtp {where} ({step}): {exc}", retryable=False,  # e.g. no AUTH offered
                               failure=AUTH_FAILED if step == "login" else REJECTED)


def data_body(payload: bytes) -> bytes:
    """The message as DATA carries it, all but its final ".": CRLF line endings, and a period that
    starts a line doubled (RFC 5321 4.5.2), so no line of the message can end it early."""
    body = _LINE_ENDINGS.sub(b"\r\n", payload)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return _LEADING_PERIOD.sub(b"..", body)


class _Withdrawn(Exception):
    """The commit said no: the message was not handed over."""


class SmtpProvider:
    """One session per job: `open()` connects (STARTTLS, login) once and every `send()` reuses it.

    DATA goes in two steps: the whole message, then (after the caller's commit) the "." that ends
    it. A server discards a message whose end never came (RFC 5321 4.1.1.4), so only between that
    "." and the server's answer is the outcome unknown: lost there, the message is not resent (an
    SMTP server does not dedupe). Lost any earlier, the session is reopened once and the message
    sent again."""

    dedupes = False

    def __init__(self, config: dict[str, Any], *, allow_private_networks: bool = False) -> None:
        self.config = msgspec.convert(config, SmtpConfig)
        # False: the host must resolve to public addresses only (shared/platform/netguard.py).
        self.allow_private_networks = allow_private_networks
        self.connections = 0  # opened by this session (tests check that a job uses one)
        self._smtp: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    async def open(self) -> None:
        async with self._lock:
            if not self.connected:
                await self._connect()

    async def _connect(self) -> None:
        self._drop()
        c = self.config
        where = f"{c.host}:{c.resolved_port}"
        # The name is resolved and checked once, and the socket goes to an address that passed: a DNS
        # answer that changes in between (rebinding) cannot reach inside the network.
        try:
            sock = await netguard.connect(c.host, c.resolved_port, allow_private=self.allow_private_networks,
                                          timeout=c.timeout_s)
        except netguard.PrivateAddressRefused as exc:
            log.warning("smtp host refused: not a public address", host=c.host, port=c.resolved_port,
                        address=str(exc.address) if exc.address else None, kind=exc.why)
            raise ProviderUnavailable(f"smtp host refused: {exc}", retryable=False,
                                      failure=REFUSED_PRIVATE_ADDRESS) from exc
        except (OSError, UnicodeError) as exc:  # TimeoutError too; UnicodeError: a name IDNA cannot encode
            raise _unavailable(exc, where, "connect") from exc
        address = netguard.parse_address(c.host)
        smtp = aiosmtplib.SMTP(
            # With a connected socket, aiosmtplib uses `hostname` only for TLS: SNI and the certificate
            # are checked against the name the provider gives, not the address connected to.
            hostname=str(address) if address is not None else c.host,
            sock=sock,
            use_tls=c.implicit_tls,
            start_tls=False,  # done below, so that a server not offering it fails before any login
            validate_certs=c.tls_verify,
            timeout=c.timeout_s,
            local_hostname=await _default_local_hostname(),
        )
        step = "connect"
        try:
            await smtp.connect()
            await _greet(smtp)  # now: the extensions (STARTTLS, SMTPUTF8) are needed before MAIL
            if c.resolved_starttls and not c.implicit_tls:
                step = "starttls"
                if not smtp.supports_extension("starttls"):
                    raise ProviderUnavailable(f"smtp {where} does not offer STARTTLS, which this provider "
                                              "requires: nothing was sent in clear", retryable=False,
                                              failure=TLS_UNAVAILABLE)
                await smtp.starttls()
                await _greet(smtp)
            if c.username is not None:
                step = "login"
                await smtp.login(c.username, c.password or "")
        except BaseException as exc:
            smtp.close()
            sock.close()
            if isinstance(exc, (aiosmtplib.SMTPException, OSError)):
                raise _unavailable(exc, where, step) from exc
            raise
        self._smtp = smtp
        self.connections += 1

    def _drop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None

    async def send(self, messages: list[OutgoingMessage], commit: Commit | None = None) -> list[SendResult]:
        async with self._lock:
            results: list[SendResult] = []
            connect_error: ProviderUnavailable | None = None  # one failed connect fails the rest of this call
            for message in messages:
                if connect_error is not None:
                    results.append(_failed(message, str(connect_error), connect_error.retryable,
                                           connect_error.failure))
                    continue
                try:
                    results.append(await self._send_one(message, commit))
                except ProviderUnavailable as exc:
                    connect_error = exc
                    results.append(_failed(message, str(exc), exc.retryable, exc.failure))
            return results

    async def _send_one(self, message: OutgoingMessage, commit: Commit | None) -> SendResult:
        if not _is_bare_address(message.to):
            return _failed(message, f"not an email address: {message.to!r}", False, INVALID_MESSAGE)
        envelope_from = parseaddr(message.content.from_email)[1] or message.content.from_email
        utf8 = not (envelope_from.isascii() and message.to.isascii())
        try:
            payload = build_mime(message, utf8=utf8)
        except Exception as exc:  # a header with a line break, an unencodable address ...
            return _failed(message, f"message could not be built: {exc}", False, INVALID_MESSAGE)
        for attempt in (1, 2):
            if not self.connected:
                await self._connect()
            smtp = self._smtp
            assert smtp is not None
            handed_over = False
            try:
                options, encoding = [], "ascii"
                if utf8:
                    if not smtp.supports_extension("smtputf8"):
                        return _failed(message, "non-ASCII address and the server does not support SMTPUTF8", False,
                                       REJECTED)
                    options, encoding = ["SMTPUTF8"], "utf-8"
                await smtp.mail(envelope_from, options=options, encoding=encoding)
                await smtp.rcpt(message.to, encoding=encoding)
                await self._data(smtp, message, payload, commit)
                handed_over = True
                end = await smtp.execute_command(b".")  # the message's end: from here it is the server's
                if end.code != 250:
                    raise aiosmtplib.SMTPDataError(end.code, end.message)
                return SendResult(contact_id=message.contact_id, ok=True,
                                  provider_message_id=message_id_of(message.idempotency_key)[1:-1])
            except _Withdrawn:
                return _failed(message, "withdrawn before it was handed over", False, WITHDRAWN)
            except aiosmtplib.SMTPResponseException as exc:
                if self.connected:
                    await self._reset()
                elif not handed_over and attempt == 1:
                    continue  # 421: the server closed the session before taking the message
                transient = 400 <= exc.code < 500
                return _failed(message, f"smtp {exc.code}: {exc.message}", transient,
                               DEFERRED if transient else REJECTED)
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
                self._drop()
                if handed_over:
                    return _failed(message, f"outcome unknown: connection lost during DATA ({exc}); not resent "
                                            "to avoid a duplicate", False, OUTCOME_UNKNOWN)
                if attempt == 1:
                    continue
                return _failed(message, f"connection lost: {exc}", True, CONNECTION_LOST)
            except (aiosmtplib.SMTPException, ValueError) as exc:  # e.g. an address aiosmtplib cannot quote
                await self._reset()
                return _failed(message, f"smtp: {exc}", False, INVALID_MESSAGE)
        raise AssertionError("unreachable")

    async def _data(self, smtp: aiosmtplib.SMTP, message: OutgoingMessage, payload: bytes,
                    commit: Commit | None) -> None:
        """DATA and the whole message but its end, then the commit. A withdrawn message (or a
        commit that raised) ends the session: the server discards what it had of it."""
        start = await smtp.execute_command(b"DATA")
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        assert smtp.protocol is not None
        smtp.protocol.write(data_body(payload))
        if commit is None:
            return
        try:
            go = await commit(message)
        except BaseException as exc:
            self._drop()
            if isinstance(exc, Exception):
                raise CommitFailed(str(exc)) from exc
            raise
        if not go:
            self._drop()
            raise _Withdrawn()

    async def _reset(self) -> None:
        """Clear a refused envelope so the next message starts clean; a session that cannot is dropped."""
        if self._smtp is None:
            return
        try:
            await self._smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            self._drop()

    async def close(self) -> None:
        async with self._lock:
            if self._smtp is not None and self._smtp.is_connected:
                try:
                    await self._smtp.quit(timeout=min(self.config.timeout_s, 5.0))
                except (aiosmtplib.SMTPException, OSError):
                    pass
            self._drop()
