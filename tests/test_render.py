"""A content rendered per recipient on each channel (shared/content/render.py): the locale variant
chosen, values escaped as the channel needs, email's HTML prepared as sent."""
from __future__ import annotations

import pytest

from shared.channels.provider import (
    EmailContent,
    PushContent,
    SmsContent,
    TelegramContent,
    WebhookContent,
    WhatsappContent,
)
from shared.content.templates import TemplateError
from shared.kernel.content import (
    Content,
    PushPart,
    SmsPart,
    TelegramPart,
    WebhookPart,
    WhatsappPart,
)
from shared.sending.render import ChannelRenderer

NASTY = {"first_name": "<script>alert(1)</script>", "code": "*_[x](y)!", "plan": "pro"}

LOCALIZED = Content(
    subject="Hello {{ first_name }}", subject_i18n={"de": "Hallo {{ first_name }}", "pt-BR": "Olá {{ first_name }}"},
    html="<p>Hello</p>", html_i18n={"de": "<p>Hallo</p>"},
    sms=SmsPart(body="Hi", body_i18n={"de": "Moin", "zh-Hant": "你好"}),
)


@pytest.mark.parametrize(
    ("locale", "variant", "subject"),
    [
        # a contact's locale   the variant it gets   its subject
        ("de", "de", "Hallo Ann"),
        ("de-AT", "de", "Hallo Ann"),  # a region falls back to its language
        ("DE-at", "de", "Hallo Ann"),  # in any case
        ("pt-BR", "pt-BR", "Olá Ann"),
        ("pt-br", "pt-BR", "Olá Ann"),
        ("pt-PT", None, "Hello Ann"),  # pt-BR is not a fallback of pt-PT, and there is no pt
        ("fr", None, "Hello Ann"),
        (None, None, "Hello Ann"),
        ("", None, "Hello Ann"),
    ],
)
def test_each_recipient_gets_its_locales_variant_or_the_default(locale, variant, subject):
    renderer = ChannelRenderer(LOCALIZED, "email")
    assert renderer.locale_for(locale) == variant
    rendered = renderer.render({"first_name": "Ann"}, locale)
    assert isinstance(rendered, EmailContent) and rendered.subject == subject


def test_a_field_without_a_variant_in_the_locale_falls_back_alone():
    # pt-BR has a subject but no html: the subject is Portuguese, the html the default
    rendered = ChannelRenderer(LOCALIZED, "email").render({"first_name": "Ann"}, "pt-BR")
    assert rendered.subject == "Olá Ann" and "<p>Hello</p>" in rendered.html


def test_sms_variants_by_script_subtag():
    renderer = ChannelRenderer(LOCALIZED, "sms")
    assert renderer.render({}, "zh-Hant-TW") == SmsContent(body="你好")
    assert renderer.render({}, "de-CH") == SmsContent(body="Moin")


def test_values_are_escaped_in_html_and_plain_in_the_subject_text_and_sms():
    content = Content(subject="Hi {{ first_name }}", html="<p>Hi {{ first_name }}</p>", text="Hi {{ first_name }}",
                      sms=SmsPart(body="Hi {{ first_name }}"))
    email = ChannelRenderer(content, "email").render(NASTY, None)
    assert email.subject == "Hi <script>alert(1)</script>"
    assert email.text == "Hi <script>alert(1)</script>"
    assert "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt;</p>" in email.html and "<script>" not in email.html
    assert ChannelRenderer(content, "sms").render(NASTY, None) == SmsContent(body="Hi <script>alert(1)</script>")


def test_telegram_text_escapes_values_for_markdown_v2_and_keeps_the_authors_markup():
    content = Content(telegram=TelegramPart(text="*Sale* for {{ first_name }}: use {{ code }}",
                                            media_url="https://cdn.example.com/{{ plan }}.jpg", media_type="photo",
                                            action_label="Shop {{ plan }}", action_url="https://shop.example.com/?c={{ code }}"))
    rendered = ChannelRenderer(content, "telegram").render(NASTY, None)
    assert rendered == TelegramContent(
        text=r"*Sale* for <script\>alert\(1\)</script\>: use \*\_\[x\]\(y\)\!",
        media_url="https://cdn.example.com/pro.jpg", media_type="photo",
        button_label="Shop pro", button_url="https://shop.example.com/?c=*_[x](y)!",
    )


def test_email_html_is_sent_as_a_document_with_the_preheader_the_button_and_inlined_css():
    content = Content(subject="Hi", preheader="Only {{ plan }} today",
                      html="<style>p { color: red }</style><p>Hello {{ first_name }}</p>",
                      action_label="Open", action_url="https://example.com/o/{{ plan }}")
    email = ChannelRenderer(content, "email").render(NASTY, None)
    assert email.html.lower().startswith("<!doctype html>")
    assert "Only pro today" in email.html  # the preheader, rendered
    assert 'style="color: red' in email.html  # inlined
    assert 'href="https://example.com/o/pro"' in email.html and ">Open</a>" in email.html
    # the text part, derived from the HTML: the words and the button's link
    assert "Hello <script>alert(1)</script>" in email.text and "https://example.com/o/pro" in email.text


def test_from_name_and_reply_to():
    content = Content(subject="Hi", text="x", from_name="Ann's Shop", from_email="shop@example.com",
                      reply_to="help@example.com")
    email = ChannelRenderer(content, "email", from_email=content.from_email).render({}, None)
    assert email.from_email == "Ann's Shop <shop@example.com>" and email.reply_to == "help@example.com"


def test_whatsapp_push_and_webhook():
    content = Content(
        whatsapp=WhatsappPart(template_name="order_ready", language="en", language_i18n={"de": "de"},
                              parameters={"1": "{{ first_name }}", "2": "{{ plan }}"}),
        push=PushPart(title="Hi {{ first_name }}", body="Plan {{ plan }}", url="app://plan/{{ plan }}",
                      data={"plan": "{{ plan }}"}),
        webhook=WebhookPart(payload={"who": "{{ first_name }}", "n": 3, "tags": ["{{ plan }}", True, None]}),
    )
    assert ChannelRenderer(content, "whatsapp").render(NASTY, "de-DE") == WhatsappContent(
        template_name="order_ready", language="de", parameters={"1": "<script>alert(1)</script>", "2": "pro"})
    assert ChannelRenderer(content, "push").render(NASTY, None) == PushContent(
        title="Hi <script>alert(1)</script>", body="Plan pro", url="app://plan/pro", data={"plan": "pro"})
    assert ChannelRenderer(content, "webhook").render(NASTY, None) == WebhookContent(
        payload={"who": "<script>alert(1)</script>", "n": 3, "tags": ["pro", True, None]})


def test_a_channel_the_content_has_nothing_for_is_refused():
    with pytest.raises(ValueError):
        ChannelRenderer(Content(subject="Hi"), "sms")


def test_a_variant_that_does_not_parse_names_its_field():
    content = Content(sms=SmsPart(body="ok", body_i18n={"de": "{% if %}"}))
    renderer = ChannelRenderer(content, "sms")
    with pytest.raises(TemplateError) as caught:
        renderer.check()
    assert caught.value.field == "content.sms.body"
