"""Content functions: HTML repair, CSS inlining, the email document and its text part, MarkdownV2
escaping, SMS segments and locale choice. Pure functions: each test is a table of given -> expected."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from shared.content.html import html_to_text, inline_css, repair_html, wrap_document
from shared.content.locales import choose_locale, fallback_chain
from shared.content.markdown import escape_markdown_v2
from shared.content.sms import SmsSegments, count_segments
from shared.content.templates import compile_template

LIQUID = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)


def liquid_spans(source: str) -> Counter[str]:
    return Counter(LIQUID.findall(source))


# --- repair_html ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        # What is wrong or dangerous goes.
        pytest.param("<p>Hi <b>{{ first_name }}", "<p>Hi <b>{{ first_name }}</b></p>", id="unclosed-tags"),
        pytest.param('<p>a</p><script>alert("x")</script><p>b</p>', "<p>a</p><p>b</p>", id="script"),
        pytest.param(
            '<img src="{{ logo }}" onerror="alert(1)" alt="Logo" width="120" height="40">'
            '<a href="{{ url }}" onclick="x()" target="_blank" title="Go">go</a>',
            '<img src="{{ logo }}" alt="Logo" width="120" height="40"><a href="{{ url }}" target="_blank" title="Go">go</a>',
            id="event-handlers",
        ),
        pytest.param('<a href="javascript:alert(1)">x</a><a href=" JaVaScRiPt:alert(1)">y</a>', "<a>x</a><a>y</a>",
                     id="javascript-urls"),
        pytest.param('<table background="java&#9;script:x"><tr><td background="https://x.test/bg.png">c</td></tr></table>',
                     '<table><tbody><tr><td background="https://x.test/bg.png">c</td></tr></tbody></table>',
                     id="background-url"),
        pytest.param('<form action="https://evil.test"><input name="q"><button>go</button></form>'
                     '<iframe src="https://x.test">fallback</iframe>', "go", id="forms-and-frames"),
        # What an email is built from stays.
        pytest.param(
            '<table width="600" align="center" bgcolor="#ffffff" cellpadding="0" cellspacing="0" border="0">'
            '<tr><td valign="top" style="padding:8px" class="c" id="i">x</td></tr></table>',
            '<table width="600" align="center" bgcolor="#ffffff" cellpadding="0" cellspacing="0" border="0">'
            '<tbody><tr><td valign="top" style="padding:8px" class="c" id="i">x</td></tr></tbody></table>',
            id="table-attributes",
        ),
        pytest.param(
            '<style>.a{color:red} @media (max-width:600px){.b{display:none}}</style><div class="a">x</div>',
            '<style>.a{color:red} @media (max-width:600px){.b{display:none}}</style><div class="a">x</div>',
            id="style-block",
        ),
        pytest.param(
            '<center><font color="#333" face="Arial" size="2">f</font></center><hr><br><h2>T</h2><ul><li>a</li></ul>',
            '<center><font color="#333" face="Arial" size="2">f</font></center><hr><br><h2>T</h2><ul><li>a</li></ul>',
            id="legacy-elements",
        ),
        pytest.param(
            '<!--[if mso]><table><tr><td width="600"><![endif]--><div>x</div><!--[if mso]></td></tr></table><![endif]-->',
            '<!--[if mso]><table><tr><td width="600"><![endif]--><div>x</div><!--[if mso]></td></tr></table><![endif]-->',
            id="outlook-conditional-comments",
        ),
        # Liquid comes through unchanged, wherever it stands.
        pytest.param(
            '<p>{{ x | default: "y" }} {% if a > b %}more{% endif %} {% for i in items %}{{ i }}{% endfor %}</p>',
            '<p>{{ x | default: "y" }} {% if a > b %}more{% endif %} {% for i in items %}{{ i }}{% endfor %}</p>',
            id="liquid-in-text",
        ),
        pytest.param(
            '<a href="https://x.test/?u={{ contact_id }}&amp;l={{ list | url_encode }}">l</a>'
            '<a href="{{ x | default: "https://x.test" }}">d</a>',
            '<a href="https://x.test/?u={{ contact_id }}&amp;l={{ list | url_encode }}">l</a>'
            '<a href="{{ x | default: "https://x.test" }}">d</a>',
            id="liquid-in-attributes",
        ),
        # Between table rows text would be moved before the table; a loop stays around its rows
        # (the parser's implied <tbody> starts inside it, which renders the same).
        pytest.param(
            "<table>{% for i in items %}<tr><td>{{ i.name }}</td></tr>{% endfor %}</table>",
            "<table>{% for i in items %}<tbody><tr><td>{{ i.name }}</td></tr>{% endfor %}</tbody></table>",
            id="liquid-between-rows",
        ),
        # Where attributes go: both branches kept (a parser keeps one of two `bgcolor`s), each cleaned.
        pytest.param(
            '<table><tr><td {% if vip %}bgcolor="gold" onclick="x()"{% else %}bgcolor="white"{% endif %}>v</td></tr></table>',
            '<table><tbody><tr><td {% if vip %} bgcolor="gold"{% else %} bgcolor="white"{% endif %}>v</td></tr></tbody></table>',
            id="liquid-where-attributes-go",
        ),
        pytest.param('<p>Hi {first_name}</p><a href="https://x.test/?c={click}">c</a>',
                     '<p>Hi {first_name}</p><a href="https://x.test/?c={click}">c</a>', id="single-brace"),
        pytest.param("<p>{% raw %}{{ shown as is }}{% endraw %}</p>", "<p>{% raw %}{{ shown as is }}{% endraw %}</p>",
                     id="raw-block"),
        # Text that looks like a placeholder is text: placeholders cannot be forged.
        pytest.param("<p>liquidspan0z <!--liquidspan1z--> {{ real }}</p>",
                     "<p>liquidspan0z <!--liquidspan1z--> {{ real }}</p>", id="forged-placeholder"),
    ],
)
def test_repair_html(given: str, expected: str) -> None:
    # Given an HTML body as an author saved it, when it is repaired, then:
    assert repair_html(given) == expected


def test_repair_html_keeps_a_documents_head_styles_and_body_attributes() -> None:
    # Given a full document with a script in the head and handlers on <html> and <body>
    given = (
        '<!doctype html><html lang="de" onload="x"><head><meta charset="utf-8"><title>{{ subject }}</title>'
        "<style>p{color:red}</style><!--[if mso]><xml>o</xml><![endif]--><script>x</script></head>"
        '<body style="margin:0" bgcolor="#eee" onload="x()" {% if dark %}class="dark" onclick="y"{% endif %}>'
        "<p>Hi {{ first_name }}<table><tr><td>x</table></body></html>"
    )
    # When it is repaired, then it is still a document, its head's style and title in its head
    assert repair_html(given) == (
        '<!doctype html>\n<html lang="de">\n'
        '<head><meta charset="utf-8"><title>{{ subject }}</title><style>p{color:red}</style>'
        "<!--[if mso]><xml>o</xml><![endif]--></head>\n"
        '<body style="margin:0" bgcolor="#eee" {% if dark %} class="dark"{% endif %}>'
        "<p>Hi {{ first_name }}</p><table><tbody><tr><td>x</td></tr></tbody></table></body>\n</html>"
    )


EMAIL = (
    '<!DOCTYPE html><html lang="en"><head><style>.c{color:#333} @media (max-width:600px){.c{width:100%}}</style>'
    '</head><body><table class="c" width="600">{% for item in items %}<tr><td class="c" '
    '{% if item.hot %}bgcolor="#fc0"{% endif %}><a href="https://shop.test/p/{{ item.id }}?u={{ contact_id }}&amp;s=1">'
    '{{ item.name | default: "Item" }}</a>{% if item.price > 10 %} <b>{{ item.price }} &euro;</b>{% endif %}</td></tr>'
    '{% endfor %}</table><p>Hi {first_name}, <a href="{{ unsubscribe_url }}">unsubscribe</a></p></body></html>'
)
ITEMS = {"items": [{"id": 1, "name": "Mug", "price": 12, "hot": True}, {"id": 2, "name": "<Cap>", "price": 5}],
         "contact_id": "c1", "first_name": "Ann", "unsubscribe_url": "https://x.test/u/1"}


@pytest.mark.parametrize("transform", [repair_html, inline_css], ids=["repair_html", "inline_css"])
def test_the_liquid_of_a_real_email_survives_and_renders_the_same(transform) -> None:
    # Given an email with loops, conditions, filters and outputs in text and attributes
    # When it is repaired or inlined
    result = transform(EMAIL)
    # Then every Liquid span is still there, and the template renders the same text per recipient
    assert liquid_spans(result) == liquid_spans(EMAIL)
    rendered = compile_template(result, html=True).render(ITEMS)
    assert html_to_text(rendered) == html_to_text(compile_template(EMAIL, html=True).render(ITEMS)) == (
        "Mug (https://shop.test/p/1?u=c1&s=1) 12 €\n<Cap> (https://shop.test/p/2?u=c1&s=1)\n\n"
        "Hi Ann, unsubscribe (https://x.test/u/1)"
    )


# --- inline_css -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(
            '<style>p{color:red} .x{margin:0} @media (max-width:600px){p{color:blue}}</style><p class="x">Hi '
            '{{ name | default: "you" }}, {% if a > b %}<a href="https://x.test/?u={{ id }}">l</a>{% endif %}</p>',
            '<style>p{color:red} .x{margin:0} @media (max-width:600px){p{color:blue}}</style><p class="x" '
            'style="color: red;margin: 0;">Hi {{ name | default: "you" }}, {% if a > b %}'
            '<a href="https://x.test/?u={{ id }}">l</a>{% endif %}</p>',
            id="liquid-in-text-and-attributes",
        ),
        pytest.param(
            "<style>td{padding:4px}</style><table>{% for i in items %}<tr><td>{{ i }}</td></tr>{% endfor %}</table>",
            '<style>td{padding:4px}</style><table>{% for i in items %}<tbody><tr><td style="padding: 4px;">{{ i }}</td>'
            "</tr>{% endfor %}</tbody></table>",
            id="liquid-between-rows",
        ),
        pytest.param(
            '<style>.x{color:red}</style><p {% if a %}title="t"{% endif %} class="x">x</p>',
            '<style>.x{color:red}</style><p class="x" {% if a %}title="t"{% endif %} style="color: red;">x</p>',
            id="liquid-where-attributes-go",
        ),
        pytest.param(
            '<!DOCTYPE html><html lang="de"><head><style>p{color:red}</style></head><body><p>Hi {{ n }}</p></body></html>',
            '<!DOCTYPE html><html lang="de"><head><style>p{color:red}</style></head><body><p style="color: red;">'
            "Hi {{ n }}</p></body></html>",
            id="document",
        ),
        pytest.param(
            '<link rel="stylesheet" href="https://example.invalid/x.css"><style>p{color:red}</style><p>{first_name}</p>',
            '<link rel="stylesheet" href="https://example.invalid/x.css"><style>p{color:red}</style>'
            '<p style="color: red;">{first_name}</p>',
            id="remote-stylesheet-neither-loaded-nor-removed",
        ),
        # Unchanged: nothing to inline, or inlining would break the Liquid (css-inline cannot
        # parse a style attribute that is one output).
        pytest.param('<p>{{ x | default: "y" }}</p>', '<p>{{ x | default: "y" }}</p>', id="no-style"),
        pytest.param('<style>p{color:red}</style><p style="{{ s }}">x</p>',
                     '<style>p{color:red}</style><p style="{{ s }}">x</p>', id="liquid-style-attribute"),
    ],
)
def test_inline_css(given: str, expected: str) -> None:
    # Given a template source with <style> rules, when its CSS is inlined, then:
    assert inline_css(given) == expected


# --- wrap_document --------------------------------------------------------------------------------

FILLER = "&zwnj;&nbsp;" * 100
HIDDEN = '<div style="display:none;max-height:0;overflow:hidden;mso-hide:all;" aria-hidden="true">'


@pytest.mark.parametrize(
    ("given", "options", "expected"),
    [
        pytest.param(
            "<p>Hi {{ first_name }}</p>",
            {"preheader": 'Hello {{ first_name | default: "you" }}', "lang": "de", "title": 'A & B {{ s | default: "x" }}'},
            # everything before the body on its first line: the body's line numbers stay the author's
            '<!DOCTYPE html><html lang="de"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="x-apple-disable-message-reformatting">'
            '<title>A &amp; B {{ s | default: "x" }}</title></head><body>'
            f'{HIDDEN}Hello {{{{ first_name | default: "you" }}}}{FILLER}</div>'
            "<p>Hi {{ first_name }}</p>\n</body>\n</html>\n",
            id="fragment",
        ),
        pytest.param(
            "<p>x</p>",
            {},
            '<!DOCTYPE html><html><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="x-apple-disable-message-reformatting">'
            "<title></title></head><body><p>x</p>\n</body>\n</html>\n",
            id="fragment-without-preheader",
        ),
        pytest.param(
            '<!DOCTYPE html><html><head><title>t</title></head><body class="{{ c }}" style="margin:0"><p>x</p></body></html>',
            {"preheader": "Pre {{ x }}", "lang": "en", "title": "ignored"},
            '<!DOCTYPE html><html><head><title>t</title></head><body class="{{ c }}" style="margin:0">'
            f"{HIDDEN}Pre {{{{ x }}}}{FILLER}</div><p>x</p></body></html>",
            id="document",
        ),
        pytest.param("<html><body><p>x</p></body></html>", {}, "<html><body><p>x</p></body></html>",
                     id="document-without-preheader"),
    ],
)
def test_wrap_document(given: str, options: dict, expected: str) -> None:
    # Given a body (or a whole document), when it is wrapped, then:
    assert wrap_document(given, **options) == expected


# --- html_to_text ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param("<h1>Title</h1><p>One   two\n three</p><p>Four<br>five</p>", "Title\n\nOne two three\n\nFour\nfive",
                     id="blocks"),
        pytest.param("<ul><li>a</li><li>b<ul><li>b1</li></ul></li></ul><ol><li>c</li></ol>", "- a\n- b\n  - b1\n\n- c",
                     id="lists"),
        pytest.param(
            '<p><a href="https://x.test/a">Read</a>, <a href="https://x.test">https://x.test</a>, '
            '<a href="mailto:hi@x.test">hi@x.test</a>, <a href="#top">top</a>, <a href="{{ url }}">{{ label }}</a></p>',
            "Read (https://x.test/a), https://x.test, hi@x.test, top, {{ label }} ({{ url }})",
            id="links",
        ),
        pytest.param('<a href="https://x.test"><img src="logo.png" alt="Logo"></a> <img src="s.gif"> <img alt="{{ n }}">',
                     "Logo (https://x.test) {{ n }}", id="images"),
        pytest.param(
            '<head><title>T</title><style>p{}</style></head><body><script>x()</script>'
            '<div style="display:none">preview</div><p>Body</p></body>',
            "Body",
            id="head-style-script-hidden-dropped",
        ),
        pytest.param("<p>A &amp; B &lt;c&gt; &euro;5&nbsp;now &#8212; ok</p>", "A & B <c> €5 now — ok", id="entities"),
        pytest.param('<div><div><p>a</p></div></div>\n\n<div></div><p></p><p>b</p>', "a\n\nb", id="one-blank-line"),
        # A Liquid tag sticks to the text before it, so that a false condition leaves no blank lines.
        pytest.param(
            '<p>Hi {{ first_name | default: "there" }},</p>{% if vip %}<p>VIP</p>{% endif %}<table>{% for i in items %}'
            "<tr><td>{{ i.name }}</td><td>{{ i.qty }}</td></tr>{% endfor %}</table><p>Bye</p>",
            'Hi {{ first_name | default: "there" }},{% if vip %}\n\nVIP{% endif %}{% for i in items %}\n\n'
            "{{ i.name }} {{ i.qty }}{% endfor %}\n\nBye",
            id="liquid",
        ),
        # Hidden content goes, but not its Liquid tags: the text template must stay balanced.
        pytest.param('<div style="display: none">{{ pre }}{% if a %}x{% endif %}</div><p>y</p>', "{% if a %}{% endif %}y",
                     id="liquid-tags-in-hidden-content"),
        pytest.param('<td {% if vip %}bgcolor="gold"{% endif %}>x</td>', "{% if vip %}{% endif %}x",
                     id="liquid-tags-where-attributes-go"),
    ],
)
def test_html_to_text(given: str, expected: str) -> None:
    # Given an HTML body, when its text part is derived, then:
    assert html_to_text(given) == expected


def test_the_text_part_of_a_wrapped_email_has_no_preheader() -> None:
    # Given a wrapped email with a preheader
    document = wrap_document("<p>Hello {{ first_name }}</p>", preheader="Sale {{ code }}", title="T")
    # When its text part is derived, then it is the body only
    assert html_to_text(document) == "Hello {{ first_name }}"


# --- MarkdownV2 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("plain text 123", "plain text 123"),
        ("*_[", r"\*\_\["),
        ("_*[]()~`>#+-=|{}.!", r"\_\*\[\]\(\)\~\`\>\#\+\-\=\|\{\}\.\!"),
        ("back\\slash", r"back\\slash"),
        ("ends with \\", "ends with \\\\"),
        ("1.5 - 2 = -0.5!", r"1\.5 \- 2 \= \-0\.5\!"),
        ("Grüße 😀 <b>&amp;", r"Grüße 😀 <b\>&amp;"),  # `<` and `&` are not reserved, `>` is
        ("", ""),
    ],
)
def test_escape_markdown_v2(given: str, expected: str) -> None:
    # Given a value, when it is escaped for MarkdownV2, then:
    assert escape_markdown_v2(given) == expected


# --- SMS segments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param("", SmsSegments("GSM-7", 0, 0, 0), id="empty"),
        pytest.param("Hello", SmsSegments("GSM-7", 5, 5, 1), id="short"),
        pytest.param("a" * 160, SmsSegments("GSM-7", 160, 160, 1), id="gsm-full-single"),
        pytest.param("a" * 161, SmsSegments("GSM-7", 161, 161, 2), id="gsm-concatenated"),
        pytest.param("a" * 306, SmsSegments("GSM-7", 306, 306, 2), id="gsm-two-full"),
        pytest.param("a" * 307, SmsSegments("GSM-7", 307, 307, 3), id="gsm-three"),
        pytest.param("€" * 80, SmsSegments("GSM-7", 80, 160, 1), id="extension-counts-two"),
        pytest.param("^{}\\[~]|€", SmsSegments("GSM-7", 9, 18, 1), id="every-extension-character"),
        pytest.param("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà", SmsSegments("GSM-7", 42, 42, 1), id="gsm-accents"),
        # An extension character does not straddle two segments: after 152 septets, its 2 do not
        # fit in 153 and start the next segment, so 306 septets take 3 segments, not 2.
        pytest.param("a" * 152 + "€" + "a" * 10, SmsSegments("GSM-7", 163, 164, 2), id="escape-in-second-segment"),
        pytest.param("a" * 152 + "€" + "a" * 152, SmsSegments("GSM-7", 305, 306, 3), id="escape-kept-whole"),
        pytest.param("ç", SmsSegments("UCS-2", 1, 1, 1), id="not-gsm"),
        pytest.param("Привет" * 11 + "abcd", SmsSegments("UCS-2", 70, 70, 1), id="ucs2-full-single"),
        pytest.param("Привет" * 11 + "abcde", SmsSegments("UCS-2", 71, 71, 2), id="ucs2-concatenated"),
        pytest.param("😀" * 35, SmsSegments("UCS-2", 35, 70, 1), id="emoji-two-units"),
        pytest.param("😀" * 36, SmsSegments("UCS-2", 36, 72, 2), id="emoji-concatenated"),
        pytest.param("a" * 66 + "😀" + "a" * 2, SmsSegments("UCS-2", 69, 70, 1), id="surrogate-in-a-single-segment"),
        # A surrogate pair does not straddle two segments: after 66 units an emoji starts the next
        # one, so 134 units take 3 segments, not 2.
        pytest.param("a" * 66 + "😀" + "a" * 66, SmsSegments("UCS-2", 133, 134, 3), id="surrogate-kept-whole"),
        pytest.param("a" * 66 + "😀" * 34, SmsSegments("UCS-2", 100, 134, 3), id="surrogates-kept-whole"),
    ],
)
def test_count_segments(given: str, expected: SmsSegments) -> None:
    # Given an SMS text, when its segments are counted, then:
    assert count_segments(given) == expected


# --- locales --------------------------------------------------------------------------------------

VARIANTS = ["de", "de-CH", "pt-BR", "zh-Hant", "zh", "en-GB"]


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("de", "de"),
        ("DE", "de"),
        ("de-CH", "de-CH"),
        ("de-ch", "de-CH"),
        ("de-AT", "de"),
        ("de_AT", "de"),
        ("pt-br", "pt-BR"),
        ("pt", None),  # a more specific variant is a guess: the default text instead
        ("zh-Hant-TW", "zh-Hant"),
        ("zh-Hans-CN", "zh"),
        ("en-GB-u-ca-gregory", "en-GB"),
        ("en-US", None),
        ("fr", None),
        ("", None),
        (None, None),
    ],
)
def test_choose_locale(locale: str | None, expected: str | None) -> None:
    # Given the variants de, de-CH, pt-BR, zh-Hant, zh, en-GB, when a contact's locale picks one, then:
    assert choose_locale(locale, VARIANTS) == expected


def test_choose_locale_takes_any_iterable_and_the_first_of_two_spellings() -> None:
    assert choose_locale("PT-br", iter(["pt-BR", "pt-br"])) == "pt-BR"
    assert choose_locale("de-AT", {"de": "Hallo"}) == "de"


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("de", ("de",)),
        ("de-AT", ("de-at", "de")),
        ("zh-Hant-TW", ("zh-hant-tw", "zh-hant", "zh")),
        ("de_AT", ("de-at", "de")),
        # RFC 4647 lookup: a single-letter subtag goes with what it introduced.
        ("de-DE-u-co-phonebk", ("de-de-u-co-phonebk", "de-de-u-co", "de-de", "de")),
        ("en-x-private", ("en-x-private", "en")),
        ("", ()),
    ],
)
def test_fallback_chain(locale: str, expected: tuple[str, ...]) -> None:
    assert fallback_chain(locale) == expected


@pytest.mark.parametrize("source", [
    '<!DOCTYPE html><html><head><title>t</title><style>p{color:red}</style></head><body><p>x {{ a }}</p></body></html>',
    "<html><head>\n<meta charset=utf-8>\n</head>\n<body>\n<p>x</p>\n</body></html>",
    "<p>a<b>b {% if x %}<i>c{% endif %}",
    "<table><tr><td>{{ a }}</td></tr></table>",
])
def test_repairing_repaired_html_changes_nothing(source: str) -> None:
    # Given HTML as it was stored (repaired once), when it is saved again, then it is unchanged
    once = repair_html(source)
    assert repair_html(once) == once
