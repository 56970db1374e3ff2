"""A local stand-in for the Telegram Bot API (stdlib ThreadingHTTPServer on 127.0.0.1, in a thread of
the test process) that answers like Telegram and records what it accepts.

    with TelegramPeer(blocked={"1001"}, fail_transiently={"1002": 2}) as peer:
        ... send through peer.provider_config()
        assert peer.received_by("1003")[0].shown == "Hi"

Routes /bot<token>/<method> (sendMessage, sendPhoto, sendVideo, getMe; method names in any case,
as Telegram's), takes JSON, form and query-string parameters as Telegram does, and checks what
Telegram checks: the chat id, a non-empty text, MarkdownV2 (check_markdown_v2 below), the inline
keyboard, the media URL and the text and caption lengths as shown. The server and its bookkeeping
are tests/http_peer.py's. Run `python -m tests.telegram_peer --port 8098` for a standalone peer
printing one JSON line per message.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from types import EllipsisType
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.http_peer import KEEP, Answer, HttpPeer, argument_parser, form_fields, serve

BOT_ID = 7000001
BOT_TOKEN = f"{BOT_ID}:AAH-peer_Secret0123456789abcdefXYZ"
MAX_TEXT_CHARS, MAX_CAPTION_CHARS = 4096, 1024
_PATH = re.compile(r"^/bot([^/]*)/([A-Za-z]+)$")
_TOKEN_SHAPE = re.compile(r"^[0-9]+:[A-Za-z0-9_-]+$")
_CHAT_ID = re.compile(r"^-?[0-9]{1,20}$|^@[A-Za-z][A-Za-z0-9_]{3,31}$")
_MEDIA_URL = re.compile(r"^https?://[^\s/]+\S*$")
_BUTTON_URL = re.compile(r"^(https?|tg)://\S+$")
RESERVED = "_*[]()~`>#+-=|{}.!"


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


def error(status: int, description: str, **parameters: Any) -> Answer:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return status, body, {}


def bad(description: str) -> Answer:
    return error(400, f"Bad Request: {description}")


class TelegramPeer(HttpPeer[Received]):
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

    name = "Telegram"
    recipient = "chat_id"
    methods = ("POST", "GET")  # Telegram takes GET with a query string too

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
        super().__init__(host=host, port=port)
        self.token = token
        self._message_ids: dict[str, int] = {}
        self.configure(blocked=blocked or set(), forbidden=forbidden or {}, unknown=unknown or set(),
                       migrated=migrated or {}, fail_transiently=fail_transiently or {}, rate_limit=rate_limit or {},
                       retry_after=retry_after, revoke_after=revoke_after, delay=delay)

    def configure(
        self,
        *,
        blocked: set[str] | EllipsisType = KEEP,
        forbidden: dict[str, str] | EllipsisType = KEEP,
        unknown: set[str] | EllipsisType = KEEP,
        migrated: dict[str, int] | EllipsisType = KEEP,
        fail_transiently: dict[str, int] | EllipsisType = KEEP,
        rate_limit: dict[str, int] | EllipsisType = KEEP,
        retry_after: float | EllipsisType = KEEP,
        revoke_after: int | None | EllipsisType = KEEP,  # None: never revoked
        delay: float | EllipsisType = KEEP,
    ) -> None:
        """Changes what is given; the rest stays as it is."""
        self._set(_blocked=blocked, _forbidden=forbidden, _unknown=unknown, _migrated=migrated,
                  _fail_transiently=fail_transiently, _rate_limit=rate_limit, retry_after=retry_after,
                  revoke_after=revoke_after, delay=delay)

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """A telegram_bot provider config that reaches this peer (its token, plain http, which the
        API accepts only with allow_insecure_auth)."""
        return {"bot_token": self.token, "base_url": self.base_url, "allow_insecure_auth": True, "timeout_s": 10.0,
                **overrides}

    # -- called on the peer's threads --------------------------------------------------------------

    def answer(self, target: str, headers: Any, raw: bytes, number: int) -> Answer:
        """As Telegram would answer it."""
        parts = urlsplit(target)
        match = _PATH.match(parts.path)
        if match is None or not _TOKEN_SHAPE.match(match.group(1)):
            return error(404, "Not Found")
        if match.group(1) != self.token or self._revoked(number):
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

    def not_allowed(self) -> Answer:
        return error(405, "Method Not Allowed")

    def _send(self, method: str, params: dict[str, Any], encoding: str) -> Answer:
        chat = str(params.get("chat_id", "")).strip()
        if not chat:
            return bad("chat_id is empty")
        if not _CHAT_ID.match(chat):
            return bad("chat not found")
        with self._lock:
            self._attempt(chat)
            if self._use_up(self._rate_limit, chat):  # flood control comes before anything is looked at
                return error(429, f"Too Many Requests: retry after {self.retry_after}", retry_after=self.retry_after)
            if self._use_up(self._fail_transiently, chat):
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
    params: dict[str, Any] = dict(form_fields(query))
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
        params.update(form_fields(raw.decode("utf-8", "replace")))
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


@pytest.fixture
def telegram_peer() -> Iterator[TelegramPeer]:
    """A started peer with no failures configured; reconfigure it with `telegram_peer.configure(...)`."""
    with TelegramPeer() as peer:
        yield peer


def main() -> None:
    parser = argument_parser("a recording Telegram Bot API peer: prints one JSON line per message", 8098)
    parser.add_argument("--token", default=BOT_TOKEN)
    args = parser.parse_args()
    peer = TelegramPeer(host=args.host, port=args.port, token=args.token, delay=args.delay).start()
    serve(peer, lambda r: {"message_id": r.message_id, "method": r.method, "chat_id": r.chat_id, "text": r.text,
                           "shown": r.shown, "media": r.media_url, "button": r.button})


if __name__ == "__main__":
    main()
