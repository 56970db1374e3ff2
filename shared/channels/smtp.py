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

from shared.channels.provider import OutgoingMessage, ProviderUnavailable, SendResult

# Headers a caller's `headers` may not replace: the MIME structure, and the Message-ID that makes
# duplicates detectable downstream.
_RESERVED_HEADERS = frozenset({"content-type", "content-transfer-encoding", "mime-version", "message-id"})
_FULL_DOCUMENT = re.compile(r"\A\s*(?:<!--.*?-->\s*)*(?:<!doctype\b|<html\b)", re.IGNORECASE | re.DOTALL)
_local_hostname: str | None = None


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


def _failed(message: OutgoingMessage, error: str, retryable: bool) -> SendResult:
    return SendResult(contact_id=message.contact_id, ok=False, error=error, retryable=retryable)


class SmtpProvider:
    """One session per job: `open()` connects (STARTTLS, login) once and every `send()` reuses it.

    A dropped connection is reopened once per message, and that message retried, if it was lost
    before DATA; lost during DATA the outcome is unknown and the message is not resent (an SMTP
    server does not dedupe: resending could deliver it twice)."""

    dedupes = False

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = msgspec.convert(config, SmtpConfig)
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
        smtp = aiosmtplib.SMTP(
            hostname=c.host,
            port=c.resolved_port,
            username=c.username,
            password=c.password,
            use_tls=c.implicit_tls,
            start_tls=c.resolved_starttls,
            validate_certs=c.tls_verify,
            timeout=c.timeout_s,
            local_hostname=await _default_local_hostname(),
        )
        where = f"{c.host}:{c.resolved_port}"
        try:
            await smtp.connect()
            if smtp.is_ehlo_or_helo_needed:  # greet now: the extensions (SMTPUTF8) are needed before MAIL
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await smtp.helo()
        except aiosmtplib.SMTPAuthenticationError as exc:
            smtp.close()
            raise ProviderUnavailable(f"smtp login to {where} refused: {exc.code} {exc.message}",
                                      retryable=400 <= exc.code < 500) from exc
        except ssl.SSLError as exc:
            smtp.close()
            raise ProviderUnavailable(f"smtp TLS with {where} failed: {exc}", retryable=False) from exc
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                OSError) as exc:
            smtp.close()
            raise ProviderUnavailable(f"cannot connect to smtp {where}: {exc}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise ProviderUnavailable(f"smtp {where} refused the session: {exc.code} {exc.message}",
                                      retryable=400 <= exc.code < 500) from exc
        except aiosmtplib.SMTPException as exc:  # e.g. STARTTLS required but not offered
            smtp.close()
            raise ProviderUnavailable(f"smtp {where}: {exc}", retryable=False) from exc
        self._smtp = smtp
        self.connections += 1

    def _drop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None

    async def send(self, messages: list[OutgoingMessage]) -> list[SendResult]:
        async with self._lock:
            results: list[SendResult] = []
            connect_error: ProviderUnavailable | None = None  # one failed connect fails the rest of this call
            for message in messages:
                if connect_error is not None:
                    results.append(_failed(message, str(connect_error), connect_error.retryable))
                    continue
                try:
                    results.append(await self._send_one(message))
                except ProviderUnavailable as exc:
                    connect_error = exc
                    results.append(_failed(message, str(exc), exc.retryable))
            return results

    async def _send_one(self, message: OutgoingMessage) -> SendResult:
        if not _is_bare_address(message.to):
            return _failed(message, f"not an email address: {message.to!r}", False)
        envelope_from = parseaddr(message.content.from_email)[1] or message.content.from_email
        utf8 = not (envelope_from.isascii() and message.to.isascii())
        try:
            payload = build_mime(message, utf8=utf8)
        except Exception as exc:  # a header with a line break, an unencodable address ...
            return _failed(message, f"message could not be built: {exc}", False)
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
                        return _failed(message, "non-ASCII address and the server does not support SMTPUTF8", False)
                    options, encoding = ["SMTPUTF8"], "utf-8"
                await smtp.mail(envelope_from, options=options, encoding=encoding)
                await smtp.rcpt(message.to, encoding=encoding)
                handed_over = True
                await smtp.data(payload)
                return SendResult(contact_id=message.contact_id, ok=True,
                                  provider_message_id=message_id_of(message.idempotency_key)[1:-1])
            except aiosmtplib.SMTPResponseException as exc:
                if self.connected:
                    await self._reset()
                elif not handed_over and attempt == 1:
                    continue  # 421: the server closed the session before taking the message
                return _failed(message, f"smtp {exc.code}: {exc.message}", 400 <= exc.code < 500)
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
                self._drop()
                if handed_over:
                    return _failed(message, f"outcome unknown: connection lost during DATA ({exc}); not resent "
                                            "to avoid a duplicate", False)
                if attempt == 1:
                    continue
                return _failed(message, f"connection lost: {exc}", True)
            except (aiosmtplib.SMTPException, ValueError) as exc:  # e.g. an address aiosmtplib cannot quote
                await self._reset()
                return _failed(message, f"smtp: {exc}", False)
        raise AssertionError("unreachable")

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
