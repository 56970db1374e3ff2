"""A local stand-in for the Telegram Bot API (stdlib ThreadingHTTPServer on 127.0.0.1, in a thread of
the test process) that answers like Telegram and records what it accepts.

    with TelegramPeer(blocked={"1001"}, fail_transiently={"1002": 2}) as peer:
        ... send through peer.provider_config()
        assert peer.received_by("1003")[0].shown == "Hi"

Routes /bot<token>/<method> (sendMessage, sendPhoto, sendVideo, getMe; method names in any case,
as Telegram's), takes JSON, form and query-string parameters as Telegram does, and checks what
Telegram checks: the chat id, a non-empty text, MarkdownV2 (check_markdown_v2 below), the inline
keyboard, the media URL and the text and caption lengths as shown. A thread per connection
(HTTP/1.1 keep-alive), so `max_in_flight` shows how many requests a client had out at once. Run
`python -m tests.telegram_peer --port 8098` for a standalone peer printing one JSON line per message.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import EllipsisType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

BOT_ID = 7000001
BOT_TOKEN = f"{BOT_ID}:AAH-peer_Secret0123456789abcdefXYZ"
MAX_TEXT_CHARS, MAX_CAPTION_CHARS = 4096, 1024
_PATH = re.compile(r"^/bot([^/]*)/([A-Za-z]+)$")
_TOKEN_SHAPE = re.compile(r"^[0-9]+:[A-Za-z0-9_-]+$")
_CHAT_ID = re.compile(r"^-?[0-9]{1,20}$|^@[A-Za-z][A-Za-z0-9_]{3,31}$")
_MEDIA_URL = re.compile(r"^https?://[^\s/]+\S*$")
_BUTTON_URL = re.compile(r"^(https?|tg)://\S+$")
RESERVED = "_*[]()~`>#+-=|{}.!"

Reply = tuple[int, dict[str, Any], dict[str, str]]


# -- MarkdownV2 ---------------------------------------------------------------------------------------


class EntityError(ValueError):
    """MarkdownV2 Telegram would refuse; str() is its words after "can't parse entities: "."""


_NAMES = {"*": "Bold", "_": "Italic", "__": "Underline", "~": "Strikethrough", "||": "Spoiler", "[": "TextUrl"}


def check_markdown_v2(text: str) -> str:
    """The text MarkdownV2 `text` shows, or EntityError where Telegram would refuse it
    (https://core.telegram.org/bots/api#markdownv2-style): a reserved character neither escaped nor
    markup, an entity not closed or closed out of order, an unclosed code or link, a bad escape.

    Covers bold, italic, underline, strikethrough, spoiler, inline code, pre blocks, links, custom
    emoji and line-start quotes; `**>` expandable quotes are not understood (refused)."""
    out: list[str] = []
    stack: list[tuple[str, int]] = []  # open entities: (marker, index)
    i, n = 0, len(text)

    def offset(at: int) -> int:
        return len(text[:at].encode("utf-8"))

    def reserved(at: int) -> EntityError:
        return EntityError(f"Character '{text[at]}' is reserved and must be escaped with the preceding '\\'")

    def toggle(marker: str, at: int) -> None:
        if any(m == marker for m, _ in stack):
            top, top_at = stack[-1]
            if top != marker:  # closing an outer entity across an inner one
                raise EntityError(f"Can't find end of {_NAMES[top]} entity at byte offset {offset(top_at)}")
            stack.pop()
        else:
            stack.append((marker, at))

    def until(at: int, end: str, what: str) -> int:
        """Index of the `end` closing the code or URL that starts at `at` (a code's text goes to out)."""
        shows, j = what != "URL", at
        while j < n:
            if text[j] == "\\":
                if j + 1 >= n or not 1 <= ord(text[j + 1]) <= 126:
                    raise EntityError("Character '\\' is reserved and must be escaped with the preceding '\\'")
                if shows:
                    out.append(text[j + 1])
                j += 2
            elif text.startswith(end, j):
                return j
            elif shows and text[j] == "`":  # a lone backtick inside a pre block
                raise reserved(j)
            else:
                if shows:
                    out.append(text[j])
                j += 1
        raise EntityError(f"Can't find end of {what} entity at byte offset {offset(at)}")

    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n or not 1 <= ord(text[i + 1]) <= 126:
                raise EntityError("Character '\\' is reserved and must be escaped with the preceding '\\'")
            out.append(text[i + 1])
            i += 2
        elif text.startswith("```", i):
            start = i + 3
            language = re.match(r"[A-Za-z0-9_+-]*\n", text[start:])
            i = until(start + (len(language.group(0)) if language else 0), "```", "Pre") + 3
        elif c == "`":
            i = until(i + 1, "`", "Code") + 1
        elif c == "_":
            marker = "__" if text.startswith("__", i) else "_"
            toggle(marker, i)
            i += len(marker)
        elif c in "*~":
            toggle(c, i)
            i += 1
        elif c == "|" and text.startswith("||", i):
            toggle("||", i)
            i += 2
        elif c == "[" or (c == "!" and text.startswith("![", i)):  # a link, or a custom emoji
            stack.append(("[", i))
            i += 2 if c == "!" else 1
        elif c == "]" and stack and stack[-1][0] == "[":
            if not text.startswith("(", i + 1):
                raise reserved(i)
            i = until(i + 2, ")", "URL") + 1
            stack.pop()
        elif c == ">" and (i == 0 or text[i - 1] == "\n"):  # a quote line
            i += 1
        elif c in RESERVED:
            raise reserved(i)
        else:
            out.append(c)
            i += 1
    if stack:
        marker, at = stack[-1]
        raise EntityError(f"Can't find end of {_NAMES[marker]} entity at byte offset {offset(at)}")
    return "".join(out)


# -- the peer -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One message the peer accepted."""

    message_id: int
    method: str  # sendMessage | sendPhoto | sendVideo
    chat_id: str  # as given, as text
    text: str | None  # the text or the caption, as sent (MarkdownV2 source)
    shown: str | None  # what it shows, markup parsed
    parse_mode: str | None
    media_type: str | None
    media_url: str | None
    button: tuple[str, str] | None  # the one inline button: (label, url)
    params: dict[str, Any]
    encoding: str  # json | form | query | multipart
    at: float = field(default_factory=time.time)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def error(status: int, description: str, **parameters: Any) -> Reply:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return status, body, {}


def bad(description: str) -> Reply:
    return error(400, f"Bad Request: {description}")


class TelegramPeer:
    """Behaviour per chat id (as text, e.g. "1001" or "@news_channel"):
    - `blocked={chat}` → 403 "Forbidden: bot was blocked by the user"; `forbidden={chat: words}` →
      403 "Forbidden: <words>" (e.g. "user is deactivated", "bot was kicked from the group chat");
    - `unknown={chat}` → 400 "Bad Request: chat not found";
    - `migrated={chat: new_id}` → 400 "group chat was upgraded to a supergroup chat" with migrate_to_chat_id;
    - `fail_transiently={chat: n}` → 500 for the first n requests, then accepted;
    - `rate_limit={chat: n}` → 429 with parameters.retry_after (`retry_after`) for the first n requests.
    And for all: `revoke_after=n` → the first n requests are authenticated, every later one is a 401
    (the token was revoked then); `delay` seconds are spent on each request after it was taken (an
    accepted one is recorded first) and before it is answered. Change it while running with
    `configure(...)`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        token: str = BOT_TOKEN,
        blocked: set[str] | None = None,
        forbidden: dict[str, str] | None = None,
        unknown: set[str] | None = None,
        migrated: dict[str, int] | None = None,
        fail_transiently: dict[str, int] | None = None,
        rate_limit: dict[str, int] | None = None,
        retry_after: float = 1,
        revoke_after: int | None = None,
        delay: float = 0.0,
    ) -> None:
        self.host, self.port, self.token = host, port or free_port(host), token
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._attempts: dict[str, int] = {}
        self._message_ids: dict[str, int] = {}
        self._requests = self._in_flight = self._max_in_flight = self._connections_made = 0
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.configure(blocked=blocked or set(), forbidden=forbidden or {}, unknown=unknown or set(),
                       migrated=migrated or {}, fail_transiently=fail_transiently or {}, rate_limit=rate_limit or {},
                       retry_after=retry_after, revoke_after=revoke_after, delay=delay)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> TelegramPeer:
        assert self._server is None, "already running"

        class Handler(_Handler):
            peer = self

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"telegram-peer-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open (keep-alive) connection."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        assert self._thread is not None
        self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> TelegramPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(
        self,
        *,
        blocked: set[str] | None = None,
        forbidden: dict[str, str] | None = None,
        unknown: set[str] | None = None,
        migrated: dict[str, int] | None = None,
        fail_transiently: dict[str, int] | None = None,
        rate_limit: dict[str, int] | None = None,
        retry_after: float | None = None,
        revoke_after: int | None | EllipsisType = ...,  # ... leaves it as is; None: never revoked
        delay: float | None = None,
    ) -> None:
        with self._lock:
            for name, value in (("blocked", blocked), ("forbidden", forbidden), ("unknown", unknown),
                                ("migrated", migrated), ("fail_transiently", fail_transiently),
                                ("rate_limit", rate_limit)):
                if value is not None:
                    setattr(self, f"_{name}", type(value)(value))  # a copy: the caller's stays as it was
            if retry_after is not None:
                self.retry_after = retry_after
            if revoke_after is not ...:
                self.revoke_after = revoke_after
            if delay is not None:
                self.delay = delay

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """A telegram_bot provider config that reaches this peer (its token, plain http, which the
        API accepts only with allow_insecure_auth)."""
        return {"bot_token": self.token, "base_url": self.base_url, "allow_insecure_auth": True, "timeout_s": 10.0,
                **overrides}

    # -- what was received -------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def received_by(self, chat_id: str) -> list[Received]:
        return [r for r in self.received if r.chat_id == chat_id]

    def attempts(self, chat_id: str) -> int:
        """Authenticated send requests to this chat, accepted or not."""
        with self._lock:
            return self._attempts.get(chat_id, 0)

    @property
    def requests(self) -> int:
        """Every request the peer answered or is answering, authenticated or not."""
        with self._lock:
            return self._requests

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections_made

    @property
    def max_in_flight(self) -> int:
        """The most requests taken and not yet answered at one moment."""
        with self._lock:
            return self._max_in_flight

    def clear(self) -> None:
        with self._lock:
            self._received.clear()
            self._attempts.clear()
            self._requests = self._max_in_flight = self._connections_made = 0

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait (without blocking the event loop) until at least `count` messages were accepted."""
        deadline = time.monotonic() + timeout
        while len(received := self.received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Telegram peer accepted {len(received)} of {count} messages in {timeout}s")
            await asyncio.sleep(0.02)
        return received

    # -- called on the peer's threads --------------------------------------------------------------

    def _begin(self) -> int:
        with self._lock:
            self._requests += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            return self._requests

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def answer(self, target: str, headers: Any, raw: bytes, number: int) -> Reply:
        """(status, JSON body, extra headers) for one request, as Telegram would answer it."""
        parts = urlsplit(target)
        match = _PATH.match(parts.path)
        if match is None or not _TOKEN_SHAPE.match(match.group(1)):
            return error(404, "Not Found")
        with self._lock:
            revoked = self.revoke_after is not None and number > self.revoke_after
        if match.group(1) != self.token or revoked:
            return error(401, "Unauthorized")
        method = match.group(2).lower()
        if method == "getme":
            return 200, {"ok": True, "result": {"id": BOT_ID, "is_bot": True, "first_name": "Crier peer",
                                                "username": "crier_peer_bot"}}, {}
        if method not in ("sendmessage", "sendphoto", "sendvideo"):
            return error(404, "Not Found: method not found")
        try:
            params, encoding = _params(parts.query, headers.get("Content-Type") or "", raw)
        except ValueError as exc:
            return bad(str(exc))
        return self._send(method, params, encoding)

    def _send(self, method: str, params: dict[str, Any], encoding: str) -> Reply:
        chat = str(params.get("chat_id", "")).strip()
        if not chat:
            return bad("chat_id is empty")
        if not _CHAT_ID.match(chat):
            return bad("chat not found")
        with self._lock:
            self._attempts[chat] = self._attempts.get(chat, 0) + 1
            if self._rate_limit.get(chat, 0) > 0:  # flood control comes before anything is looked at
                self._rate_limit[chat] -= 1
                return error(429, f"Too Many Requests: retry after {self.retry_after}", retry_after=self.retry_after)
            if self._fail_transiently.get(chat, 0) > 0:
                self._fail_transiently[chat] -= 1
                return error(500, "Internal Server Error")
            if chat in self._blocked:
                return error(403, "Forbidden: bot was blocked by the user")
            if chat in self._forbidden:
                return error(403, f"Forbidden: {self._forbidden[chat]}")
            if chat in self._unknown:
                return bad("chat not found")
            if chat in self._migrated:
                return error(400, "Bad Request: group chat was upgraded to a supergroup chat",
                             migrate_to_chat_id=self._migrated[chat])
        try:
            text, shown, media_type, media_url, button = _check_message(method, params)
        except ValueError as exc:
            return bad(str(exc))
        name = {"sendmessage": "sendMessage", "sendphoto": "sendPhoto", "sendvideo": "sendVideo"}[method]
        with self._lock:
            message_id = self._message_ids[chat] = self._message_ids.get(chat, 0) + 1
            self._received.append(Received(
                message_id=message_id, method=name, chat_id=chat, text=text, shown=shown,
                parse_mode=params.get("parse_mode"), media_type=media_type, media_url=media_url, button=button,
                params=params, encoding=encoding))
        numeric = int(chat) if chat.lstrip("-").isdigit() else -1000000000001
        result: dict[str, Any] = {
            "message_id": message_id, "date": int(time.time()),
            "chat": {"id": numeric, "type": "private" if numeric > 0 else "channel"},
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "Crier peer", "username": "crier_peer_bot"},
        }
        if media_type:
            result[media_type] = {"file_id": f"peer-{media_type}-{message_id}"}
            if shown:
                result["caption"] = shown
        else:
            result["text"] = shown
        if button:
            result["reply_markup"] = {"inline_keyboard": [[{"text": button[0], "url": button[1]}]]}
        return 200, {"ok": True, "result": result}, {}


def _params(query: str, content_type: str, raw: bytes) -> tuple[dict[str, Any], str]:
    """A method's parameters from the query string and the body (JSON, urlencoded or multipart)."""
    params: dict[str, Any] = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    kind = content_type.split(";")[0].strip().lower()
    encoding = "query"
    if raw and kind == "application/json":
        try:
            body = json.loads(raw)
        except ValueError:
            raise ValueError("can't parse JSON object") from None
        if not isinstance(body, dict):
            raise ValueError("can't parse JSON object")
        params.update(body)
        encoding = "json"
    elif raw and kind == "application/x-www-form-urlencoded":
        params.update({k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()})
        encoding = "form"
    elif raw and kind == "multipart/form-data":
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name:
                params[str(name)] = part.get_content() if part.get_content_maintype() == "text" else part.get_payload()
        encoding = "multipart"
    return params, encoding


def _structured(value: Any, what: str) -> Any:
    """A JSON-serialized parameter: an object in a JSON body, a string in a form."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(f"can't parse {what} JSON object") from None
    return value


def _check_message(method: str, params: dict[str, Any]) -> tuple[Any, ...]:
    """(text, shown, media_type, media_url, button) of a message Telegram would take; ValueError
    with the words of Telegram's 400 otherwise."""
    parse_mode = params.get("parse_mode")
    if parse_mode is not None and str(parse_mode).lower() not in ("markdownv2", "markdown", "html", ""):
        raise ValueError("unsupported parse_mode")
    media_type = {"sendphoto": "photo", "sendvideo": "video"}.get(method)
    key = "caption" if media_type else "text"
    text = params.get(key)
    if text is not None and not isinstance(text, str):
        raise ValueError(f'field "{key}" must be of type String')
    shown = text
    if text and str(parse_mode).lower() == "markdownv2":
        try:
            shown = check_markdown_v2(text)
        except EntityError as exc:
            raise ValueError(f"can't parse entities: {exc}") from None
    media_url = params.get(media_type) if media_type else None
    if media_type is None:
        if not shown or not shown.strip():
            raise ValueError("message text is empty")
        if len(shown) > MAX_TEXT_CHARS:
            raise ValueError("message is too long")
    elif not media_url:
        raise ValueError(f"there is no {media_type} in the request")
    elif not isinstance(media_url, str) or not _MEDIA_URL.match(media_url):
        raise ValueError("wrong file identifier/HTTP URL specified")
    elif shown and len(shown) > MAX_CAPTION_CHARS:
        raise ValueError("message caption is too long")
    button = _button(params.get("reply_markup"))
    if params.get("link_preview_options") is not None and not isinstance(
            _structured(params["link_preview_options"], "link preview options"), dict):
        raise ValueError("can't parse link preview options JSON object")
    return text, shown, media_type, media_url, button


def _button(markup: Any) -> tuple[str, str] | None:
    """The single URL button of an inline keyboard (ValueError in Telegram's words for a bad one)."""
    if markup is None:
        return None
    markup = _structured(markup, "reply keyboard markup")
    if not isinstance(markup, dict) or "inline_keyboard" not in markup:
        raise ValueError("can't parse reply keyboard markup JSON object")
    rows = markup["inline_keyboard"]
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise ValueError('field "inline_keyboard" of the InlineKeyboardMarkup must be an Array of Arrays')
    buttons = [b for row in rows for b in row]
    for b in buttons:
        if not isinstance(b, dict) or not isinstance(b.get("text"), str) or not b["text"].strip():
            raise ValueError("can't parse inline keyboard button: Field \"text\" must be of type String")
        if "url" not in b:
            raise ValueError("can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard")
        if not isinstance(b["url"], str) or not _BUTTON_URL.match(b["url"]):
            raise ValueError("BUTTON_URL_INVALID")
    return (buttons[0]["text"], buttons[0]["url"]) if len(buttons) == 1 else None


class _Handler(BaseHTTPRequestHandler):
    peer: TelegramPeer
    protocol_version = "HTTP/1.1"  # keep-alive, as Telegram's API
    timeout = 30  # an idle keep-alive connection ends its thread after this

    def setup(self) -> None:
        super().setup()
        with self.peer._lock:
            self.peer._connections.add(self.connection)
            self.peer._connections_made += 1

    def finish(self) -> None:
        with self.peer._lock:
            self.peer._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        number = self.peer._begin()
        try:
            status, body, headers = self.peer.answer(self.path, self.headers, raw, number)
            if self.peer.delay:
                time.sleep(self.peer.delay)
        finally:
            # Out of flight before the answer is written: the client can only start another request
            # once it has this answer, so max_in_flight never counts one the client already let go.
            self.peer._end()
        self._reply(status, body, headers)

    do_GET = do_POST  # Telegram takes GET with a query string too


@pytest.fixture
def telegram_peer() -> Iterator[TelegramPeer]:
    """A started peer with no failures configured; reconfigure it with `telegram_peer.configure(...)`."""
    with TelegramPeer() as peer:
        yield peer


def main() -> None:
    parser = argparse.ArgumentParser(description="a recording Telegram Bot API peer: prints one JSON line per message")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8098)
    parser.add_argument("--token", default=BOT_TOKEN)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    peer = TelegramPeer(host=args.host, port=args.port, token=args.token, delay=args.delay).start()
    config = {k: v for k, v in peer.provider_config().items() if k != "timeout_s"}
    print(json.dumps({"listening": f"{peer.host}:{peer.port}", "provider_config": config}), flush=True)
    seen = 0
    try:
        while True:
            received = peer.received
            for r in received[seen:]:
                print(json.dumps({"message_id": r.message_id, "method": r.method, "chat_id": r.chat_id,
                                  "text": r.text, "shown": r.shown, "media": r.media_url, "button": r.button}),
                      flush=True)
            seen = len(received)
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()


if __name__ == "__main__":
    main()
