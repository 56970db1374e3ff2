"""Links and the open pixel as a tracked broadcast's messages carry them: which links are tracked,
how they are numbered, what each channel gets, and end to end through a real sender and SMTP peer."""
from __future__ import annotations

import re
import uuid

import asyncpg

from shared.kernel.content import Content, PushPart, SmsPart, TelegramPart
from shared.platform.signing import PURPOSE_CLICK, PURPOSE_OPEN, Signer, read_tracking
from shared.sending.render import ChannelRenderer, LinkTracking
from shared.tracking.links import LinkTable, track_html, track_text
from tests.smtp_peer import SmtpPeer
from tests.stack import api_for, sender_in_process
from tests.test_send_e2e import audience


class FakeCodes:
    """Stands in for a run's signed URLs: shows which contact and link each URL was made for."""

    html_safe = True

    def maker(self, links: tuple[int, ...]):
        def make(contact_id: int) -> tuple[str, ...]:
            return tuple(f"https://t.test/r/{contact_id}-{n}" if n else f"https://t.test/o/{contact_id}" for n in links)
        return make


ALL = LinkTracking(opens=True, clicks=True, text_links=True)


def test_only_literal_http_links_are_tracked_each_url_numbered_once_in_order():
    table = LinkTable()
    source = ('<a href="https://a.test/x?p=1&amp;q=2">1</a> <a HREF=\'http://b.test\'>2</a> '
              '<a href="https://a.test/x?p=1&q=2">again</a> <a href="{{ unsubscribe_url }}">u</a> '
              '<a href="https://c.test/{{ contact_id }}">per recipient</a> <a href="mailto:x@y.test">m</a> '
              '<a href="#top">t</a> <a href="javascript:alert(1)">j</a>')
    assert track_html(source, table) == (
        '<a href="{{ crier_link_1 }}">1</a> <a HREF="{{ crier_link_2 }}">2</a> '
        '<a href="{{ crier_link_1 }}">again</a> <a href="{{ unsubscribe_url }}">u</a> '
        '<a href="https://c.test/{{ contact_id }}">per recipient</a> <a href="mailto:x@y.test">m</a> '
        '<a href="#top">t</a> <a href="javascript:alert(1)">j</a>')
    assert table.by_number == {1: "https://a.test/x?p=1&q=2", 2: "http://b.test"}


def test_bare_urls_in_text_end_before_sentence_punctuation_and_liquid_is_left_alone():
    table = LinkTable()
    text = ("Read https://a.test/post. Or (https://b.test/page), or https://w.test/Foo_(bar) "
            "and {{ 'https://liquid.test' }} and https://d.test/{{ id }}")
    assert track_text(text, table) == (
        "Read {{ crier_link_1 }}. Or ({{ crier_link_2 }}), or {{ crier_link_3 }} "
        "and {{ 'https://liquid.test' }} and {{ crier_link_4 }}{{ id }}")
    assert table.by_number == {1: "https://a.test/post", 2: "https://b.test/page", 3: "https://w.test/Foo_(bar)",
                               4: "https://d.test/"}


def test_every_locale_variant_numbers_links_alike_whichever_recipient_comes_first():
    content = Content(subject="S", html='<a href="https://en.test">en</a>',
                      html_i18n={"de": '<a href="https://de.test">de</a> <a href="https://en.test">en</a>'})
    first_de = ChannelRenderer(content, "email", tracking=LinkTracking(clicks=True))
    first_de.render({"contact_id": 1}, "de", tracker=FakeCodes())
    assert first_de.links == ChannelRenderer(content, "email", tracking=LinkTracking(clicks=True)).links == {
        1: "https://en.test", 2: "https://de.test"}
    german = first_de.render({"contact_id": 7}, "de", tracker=FakeCodes())
    assert re.findall(r'href="([^"]+)"', german.html) == ["https://t.test/r/7-2", "https://t.test/r/7-1"]


def test_an_email_gets_its_recipients_links_and_pixel_and_a_preview_the_links_as_they_are():
    content = Content(subject="Hi", html='<p><a href="https://shop.test/?a=1&amp;b=2">Shop</a></p>',
                      text="Shop at https://shop.test/?a=1&b=2")
    renderer = ChannelRenderer(content, "email", tracking=ALL)
    sent = renderer.render({"contact_id": 9}, None, tracker=FakeCodes())
    assert '<a href="https://t.test/r/9-1">Shop</a>' in sent.html
    assert '<img src="https://t.test/o/9" width="1" height="1"' in sent.html
    assert sent.text == "Shop at https://t.test/r/9-1"
    preview = renderer.render({"contact_id": 9}, None)
    assert '<a href="https://shop.test/?a=1&amp;b=2">Shop</a>' in preview.html
    assert '<img src="data:image/gif;base64,' in preview.html  # nothing fetched, nothing counted
    assert preview.text == "Shop at https://shop.test/?a=1&b=2"


def test_signed_urls_go_into_the_message_as_they_are_and_an_odd_public_url_is_escaped_like_any_value():
    content = Content(subject="Hi {{ name }}", html='<p>{{ name }} <a href="https://shop.test/">Shop</a></p>',
                      text="{{ name }}: https://shop.test/")
    renderer = ChannelRenderer(content, "email", tracking=ALL)
    for base, html_safe in (("https://crier.test", True), ("https://crier.test/x?a=1&b=", False)):
        tracker = Signer(3, b"k" * 32, base).tracking_links(5, urls=True)
        assert tracker.html_safe is html_safe
        sent = renderer.render({"contact_id": 8, "name": "A & B"}, None, tracker=tracker)
        click, opened = tracker.codes(8, (1, 0))
        assert sent.subject == "Hi A & B" and sent.text == f"A & B: {click}"
        assert f'<p>A &amp; B <a href="{click.replace("&", "&amp;")}">Shop</a>' in sent.html
        assert f'<img src="{opened.replace("&", "&amp;")}"' in sent.html


def test_untracked_or_clicks_only_leave_text_and_the_pixel_alone():
    content = Content(subject="Hi", html='<a href="https://shop.test">Shop</a>', text="https://shop.test")
    clicks_only = ChannelRenderer(content, "email", tracking=LinkTracking(clicks=True)).render(
        {"contact_id": 3}, None, tracker=FakeCodes())
    assert 'href="https://t.test/r/3-1"' in clicks_only.html and "<img" not in clicks_only.html
    assert clicks_only.text == "https://shop.test"
    untracked = ChannelRenderer(content, "email").render({"contact_id": 3}, None, tracker=FakeCodes())
    assert 'href="https://shop.test"' in untracked.html


def test_sms_telegram_and_push_links_are_tracked_when_text_links_are_asked_for():
    content = Content(sms=SmsPart(body="Sale: https://shop.test/sale"),
                      telegram=TelegramPart(text="Tap {click} or see https://shop.test/faq", action_label="Buy",
                                            action_url="https://shop.test/buy"),
                      push=PushPart(title="Sale", body="https://shop.test/sale", url="https://shop.test/app"))
    sms = ChannelRenderer(content, "sms", tracking=ALL).render({"contact_id": 4}, None, tracker=FakeCodes())
    assert sms.body == "Sale: https://t.test/r/4-1"
    telegram = ChannelRenderer(content, "telegram", tracking=ALL).render({"contact_id": 4}, None, tracker=FakeCodes())
    # MarkdownV2 escapes what the render inserts; the button carries the same tracked link as {click}
    assert telegram.text == r"Tap https://t\.test/r/4\-1 or see https://t\.test/r/4\-2"
    assert telegram.button_url == "https://t.test/r/4-1"
    push = ChannelRenderer(content, "push", tracking=ALL).render({"contact_id": 4}, None, tracker=FakeCodes())
    assert (push.body, push.url) == ("https://t.test/r/4-1", "https://t.test/r/4-2")
    without_text_links = LinkTracking(clicks=True)
    assert ChannelRenderer(content, "sms", tracking=without_text_links).render(
        {"contact_id": 4}, None, tracker=FakeCodes()).body == "Sale: https://shop.test/sale"


async def test_a_tracked_email_broadcast_carries_signed_links_that_name_each_recipient(settings):
    n = 20
    with SmtpPeer() as peer:
        async with api_for(settings) as api, sender_in_process(settings):
            list_id = await audience(api, n)
            provider = await api.post("/v1/providers", {
                "name": "peer", "channel": "email", "kind": "smtp", "host": peer.host, "port": peer.port,
                "starttls": False, "from_email": "news@example.com"})
            made = await api.post("/v1/broadcasts", {
                "name": "Tracked", "list_id": list_id, "provider_id": provider["id"],
                "track_opens": True, "track_clicks": True,
                "content": {"subject": "Hi", "html": '<p><a href="https://shop.test/a">A</a> '
                            '<a href="https://shop.test/b?x=1&amp;y=2">B</a> <a href="{{ unsubscribe_url }}">stop</a></p>'}})
            assert (made["track_opens"], made["track_clicks"], made["track_text_links"]) == (True, True, False)
            await api.post(f"/v1/broadcasts/{made['id']}/send", expect=202)
            done = await api.wait_for_status(made["id"], {"completed", "partially_failed", "failed"}, timeout=60)
            one = (await api.get(f"/v1/messages?broadcast_id={made['id']}&limit=1"))["items"][0]
            again = await api.get(f"/v1/messages/{one['id']}")
    assert done["status"] == "completed"
    con = await asyncpg.connect(settings.database_url)
    try:
        keys = await con.fetch("SELECT key, run, channel FROM tracking_keys WHERE broadcast_id = $1",
                               uuid.UUID(made["id"]))
        links = await con.fetch("SELECT link, url FROM tracked_links WHERE key = $1 ORDER BY link", keys[0]["key"])
        secrets = {r["kid"]: bytes(r["secret"]) for r in await con.fetch("SELECT kid, secret FROM signing_keys")}
        contacts = {r["email"]: r["id"] for r in await con.fetch("SELECT id, email FROM contacts")}
    finally:
        await con.close()
    assert [(k["run"], k["channel"]) for k in keys] == [(1, "email")]
    assert [(r["link"], r["url"]) for r in links] == [(1, "https://shop.test/a"), (2, "https://shop.test/b?x=1&y=2")]
    assert len(peer.received) == n
    for message in peer.received:
        contact_id = contacts[message.rcpt_tos[0]]
        urls = re.findall(r'(?:href|src)="([^"]+)"', message.html)
        clicks, stop, pixel = urls[:2], urls[2], urls[3]
        assert "/u/" in stop  # the unsubscribe link is never a redirect
        found = []
        for url in [*clicks, pixel]:
            code = url.rsplit("/", 1)[1]
            tracked = next(t for secret in secrets.values() if (t := read_tracking(code, secret)) is not None)
            found.append((url.split("/")[-2], tracked.purpose, tracked.key, tracked.contact_id, tracked.link))
        key = keys[0]["key"]
        assert found == [("r", PURPOSE_CLICK, key, contact_id, 1), ("r", PURPOSE_CLICK, key, contact_id, 2),
                         ("o", PURPOSE_OPEN, key, contact_id, 0)]
    # A message shown again (GET /v1/messages/{id}) carries its recipient's tracked links and pixel too
    urls = re.findall(r'(?:href|src)="([^"]+)"', again["content"]["html"])
    shown = [read_tracking(url.rsplit("/", 1)[1], secret) for url in [urls[0], urls[1], urls[3]]
             for secret in secrets.values()]
    assert [(t.purpose, t.contact_id, t.link) for t in shown if t is not None] == [
        (PURPOSE_CLICK, one["contact_id"], 1), (PURPOSE_CLICK, one["contact_id"], 2),
        (PURPOSE_OPEN, one["contact_id"], 0)]
