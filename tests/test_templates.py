"""Per-recipient rendering: Liquid semantics, escaping, single-brace placeholders, and the fast path."""
from __future__ import annotations

import math
import time
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from shared.content.templates import (
    Budget,
    CompiledContent,
    TemplateError,
    compile_template,
)

RECIPIENT = {
    "first_name": "Ana",
    "email": "ana@example.com",
    "attributes": {"plan": "Pro", "address": {"city": "Zürich"}, "visits": 3},
}


def render(source: str, variables: dict | None = None, *, html: bool = False) -> str:
    return compile_template(source, html=html).render(RECIPIENT if variables is None else variables)


def test_variables_and_attribute_paths() -> None:
    assert render("Hi {{ first_name }}, plan {{ attributes.plan }} in {{ attributes.address.city }}") == (
        "Hi Ana, plan Pro in Zürich"
    )
    assert render("{{ attributes['plan'] }} / {{ attributes.visits }}") == "Pro / 3"


@pytest.mark.parametrize(
    "source", ["[{{ nobody }}]", "[{{ attributes.nothing }}]", "[{{ attributes.plan.deeper }}]", "[{{ first_name.x }}]"]
)
def test_missing_variable_renders_empty(source: str) -> None:
    assert render(source) == "[]"
    assert render(source, html=True) == "[]"


def test_scalars_render_like_liquid() -> None:
    variables = {"n": None, "t": True, "f": False, "i": -7, "x": 1.5}
    assert render("{{ n }}|{{ t }}|{{ f }}|{{ i }}|{{ x }}", variables) == "|true|false|-7|1.5"


def test_values_are_escaped_in_html_only() -> None:
    content = CompiledContent.compile(
        "Hi {{ first_name }}", "<p>Hi {{ first_name }} {{ attributes.note }}</p>", "Hi {{ first_name }}"
    )
    variables = {"first_name": "Tom & <Jerry> \"'", "attributes": {"note": "<script>x</script>"}}
    subject, html, text = content.render(variables)
    assert subject == "Hi Tom & <Jerry> \"'"
    assert text == "Hi Tom & <Jerry> \"'"
    assert html == "<p>Hi Tom &amp; &lt;Jerry&gt; &#34;&#39; &lt;script&gt;x&lt;/script&gt;</p>"
    assert all(type(part) is str for part in (subject, html, text))


def test_template_literal_html_is_not_escaped() -> None:
    assert render('<a href="https://x.test/?a=1&b=2">{{ first_name }}</a>', html=True) == (
        '<a href="https://x.test/?a=1&b=2">Ana</a>'
    )


def test_single_brace_placeholders() -> None:
    assert render("Hello {first_name}!") == "Hello Ana!"
    assert render("<p>Hi {first_name}, {missing}</p>", {"first_name": "<b>"}, html=True) == "<p>Hi &lt;b&gt;, </p>"
    assert render("https://example.com/l?click={click}", {"click": "abc"}) == "https://example.com/l?click=abc"
    # A placeholder next to Liquid syntax, and Liquid that already uses double braces, both work.
    assert render("{first_name}{{ email }}{% if first_name %}!{% endif %}") == "Anaana@example.com!"


@pytest.mark.parametrize(
    "source",
    [
        "<style>a{color:red} .b{margin:0;padding:0} @media (max-width:600px){.c{display:none}}</style>",
        "<style>p{} td{border:0}</style>",
        '{"status": "ok"} { "queued": 60 } {"cap": 500, "nested": {"a": [1, 2]}}',
        "function f() { return 1; } {} { } }} }",
        "{first name} { first_name } {first_name}} {1abc} {a.b} {first-name}",
        "{if} {in} {true} {nil} {empty}",  # Liquid keywords and literals are not variables
        "{% raw %}{first_name} {{ first_name }}{% endraw %}",
    ],
)
def test_text_that_is_not_a_placeholder_survives(source: str) -> None:
    expected = source.replace("{% raw %}", "").replace("{% endraw %}", "") if "raw" in source else source
    assert render(source, {}) == expected
    assert render(source, RECIPIENT, html=True) == expected


def test_filters_and_tags_use_liquid() -> None:
    source = (
        '{{ first_name | default: "there" }}, {{ attributes.plan | upcase }}'
        "{% if attributes.plan == 'Pro' %} (pro){% else %} (free){% endif %}"
        "{% for i in (1..3) %}{{ i }}{% endfor %}"
    )
    template = compile_template(source, html=True)
    assert not template.fast
    assert template.render({"attributes": {"plan": "Pro"}}) == "there, PRO (pro)123"
    assert template.render({"first_name": "<Ann>", "attributes": {"plan": "x"}}) == "&lt;Ann&gt;, X (free)123"


@pytest.mark.parametrize(
    "source",
    [
        "{{- first_name -}} !",
        "a {%- if true -%} b {%- endif -%} c",
        "{% raw %}{{ x }}{% endraw %}",
        "{% comment %}{{ x }}{% endcomment %}{{ first_name }}",
        "{{ first_name | upcase }}",
        "{{ attributes.size }}",
        "{{ partial }}",
        "{{ today | date: '%Y' }}",
        "{{ true }}",
        "{{ list[0] }}",
    ],
)
def test_anything_beyond_plain_outputs_falls_back_to_liquid(source: str) -> None:
    template = compile_template(source, html=True)
    assert not template.fast
    assert template.render(RECIPIENT) == template._liquid.render(RECIPIENT)


def test_plain_templates_take_the_fast_path() -> None:
    for source in ["", "plain", "Hi {{ first_name }}", "{{ a.b.c }}{{ x-y }}{{ a['b'] }}", "Hi {first_name}"]:
        assert compile_template(source, html=True).fast, source


def test_liquid_shadowed_names_match_liquid() -> None:
    # `partial` is always false inside a render and `now` is a clock: the fast path must not guess.
    template = compile_template("{{ partial }}", html=False)
    assert template.render({"partial": "mine"}) == "false"
    assert not compile_template("{{ now }}", html=False).fast
    assert compile_template("{{ now }}", html=False).render({"now": "then"}) == "then"


def test_unusual_mapping_falls_back_per_render() -> None:
    template = compile_template("{{ a.b }}/{{ a.size }}", html=True)
    odd = {"a": OrderedDict(b="<x>")}
    assert template.render(odd) == template._liquid.render(odd) == "&lt;x&gt;/1"
    template = compile_template("{{ a.b }}", html=True)
    assert template.fast
    assert template.render(odd) == "&lt;x&gt;"


@pytest.mark.parametrize(
    ("source", "field", "reason"),
    [
        ("Hello {{ first_name ", "content.subject", "expected '}}', found end of file on line 1"),
        ("line 1\n<p>{% if first_name %}hi</p>", "content.html", "expected tag endif"),
        ("a\n\n{{ first_name | no_such_filter }}", "content.text", "unknown filter 'no_such_filter' on line 3"),
        ("{{ a b }}", "content.html", "on line 1"),
        ("{% include 'footer' %}", "content.html", "unexpected tag 'include'"),
        ("{% if %}{% endif %}", "content.text", "missing expression"),
    ],
)
def test_a_template_that_does_not_parse_names_its_field(source: str, field: str, reason: str) -> None:
    parts = {"content.subject": "s", "content.html": "h", "content.text": "t"} | {field: source}
    with pytest.raises(TemplateError) as raised:
        CompiledContent.compile(parts["content.subject"], parts["content.html"], parts["content.text"])
    assert raised.value.field == field
    assert reason in raised.value.reason


@pytest.mark.parametrize("source", ["a\r\nb {{ v }}", "a\r\nb {{ v | append: '' }}"])
def test_line_endings_are_kept_on_both_paths(source: str) -> None:
    # python-liquid's output_stream_limit buffer would turn \r\n into \n; we do not use it.
    assert render(source, {"v": "x\r\ny\rz"}) == "a\r\nb x\r\ny\rz"


# --- limits: what one message may cost ------------------------------------------------------------

# The repro: 240 bytes of nested loops writing a long string, 5 MB per message (10 MB in a preview
# of two) and seconds of a process's time before the limits.
REPRO = (
    "{% assign s = '<p>All work and no play makes Jack a dull boy, all day long.</p>' %}"
    "{% for a in (1..100) %}{% for b in (1..100) %}{% for c in (1..10) %}{{ s }}"
    "{% endfor %}{% endfor %}{% endfor %}<p>Hello {{ first_name }}</p>"
)
# The same, but the data decides: with an 8 KiB `bio` the output is 1.6 MB.
DATA_DEPENDENT = "{% for i in (1..200) %}<p>{{ bio }}</p>{% endfor %}"


def render_or_error(source: str, variables: dict, *, html: bool = True) -> tuple[str, float]:
    """What rendering shows a user (the output or the error) and how long it took."""
    template = compile_template(source, html=html, field="content.html")
    started = time.perf_counter()
    try:
        shown = template.render(variables)
    except TemplateError as exc:
        shown = f"error: {exc}"
    return shown, time.perf_counter() - started


def test_the_repro_cannot_be_saved_naming_its_field() -> None:
    assert len(REPRO) < 250
    content = CompiledContent.compile("Hi {{ first_name }}", REPRO, "plain text")
    with pytest.raises(TemplateError) as raised:
        content.check()
    assert raised.value.field == "content.html"
    assert "more than 10,000 loop iterations" in raised.value.reason
    shown, took = render_or_error(REPRO, RECIPIENT)
    assert shown.startswith("error: content.html: more than 10,000 loop iterations") and took < 0.1


@pytest.mark.parametrize(
    ("source", "variables", "reason"),
    [
        # Loops one after another inside a loop: python-liquid's own limit multiplies only the
        # loops nested at one point (10,000 each here), the limit counts all 30,100 iterations.
        pytest.param("{% for a in (1..100) %}" + "{% for b in (1..100) %}x{% endfor %}" * 3 + "{% endfor %}",
                     {}, "more than 10,000 loop iterations", id="sibling-loops"),
        # A loop body of 40 tags run 5,000 times: 200,000 steps within the loop limit.
        pytest.param("{% for i in (1..5000) %}" + "{% if a %}{% endif %}" * 40 + "{% endfor %}",
                     {}, "more than 20,000 template steps", id="big-loop-body"),
        # The data decides: 1.6 MB written.
        pytest.param(DATA_DEPENDENT, {"bio": "b" * 8192}, "output over 1 MiB", id="output"),
        # Built by assign, never written: 100 characters more each time, copied each time.
        pytest.param("{% for a in (1..50) %}{% for b in (1..100) %}{% assign s = s | append: chunk %}"
                     "{% endfor %}{% endfor %}{{ s | size }}",
                     {"chunk": "c" * 100}, "filters and captures handle more than 2,000,000 characters", id="assign"),
        # The same with a capture of itself.
        pytest.param("{% for a in (1..50) %}{% for b in (1..100) %}{% capture s %}{{ s }}{{ chunk }}{% endcapture %}"
                     "{% endfor %}{% endfor %}{{ s | size }}",
                     {"chunk": "c" * 100}, "filters and captures handle more than 2,000,000 characters", id="capture"),
        # One filter call whose output is the square of its input: 9 million characters.
        pytest.param("{% assign s = bio | replace: 'a', bio %}{{ s | size }}", {"bio": "a" * 3000},
                     "filters and captures handle more than 2,000,000 characters", id="replace"),
        # Squaring a number: 4,096 digits after 12 rounds.
        pytest.param("{% assign n = 10 %}{% for i in (1..12) %}{% assign n = n | times: n %}{% endfor %}{{ n }}",
                     {}, "times: a number over 256 bits", id="times"),
    ],
)
def test_a_runaway_template_stops_quickly_with_a_clear_template_error(source: str, variables: dict, reason: str) -> None:
    shown, took = render_or_error(source, variables)
    assert shown.startswith("error: content.html: ") and reason in shown, shown[:200]
    assert took < 0.2


def test_a_data_dependent_limit_is_the_recipients_not_the_saves() -> None:
    content = CompiledContent.compile("Hi", DATA_DEPENDENT, "")
    content.check()  # no data: nothing written
    assert content.render({"bio": "short"})[1] == "<p>short</p>" * 200
    with pytest.raises(TemplateError, match=r"content.html: output over 1 MiB \(the limit per message\)"):
        content.render({"bio": "b" * 8192})


def test_the_fast_path_has_the_output_limit_too() -> None:
    # Plain substitutions of a 64 KiB attribute, 20 times: 1.3 MB.
    source = "<p>{{ bio }}</p>" * 20
    template = compile_template(source, html=True, field="content.html")
    content = CompiledContent.compile("Hi {{ first_name }}", source, "Hello {{ first_name }}")
    assert template.fast and content._together is not None
    for render_it in (lambda v: template.render(v), lambda v: content.render(v)[1]):
        assert render_it({"bio": "b" * 100}) == ("<p>" + "b" * 100 + "</p>") * 20
        with pytest.raises(TemplateError, match=r"content.html: output over 1 MiB"):
            render_it({"bio": "b" * 65536})
    # The limit counts UTF-8 bytes, on both paths alike: 20 x 16,384 characters of 4 bytes is 1.25 MiB.
    with pytest.raises(TemplateError, match="output over 1 MiB"):
        content.render({"bio": "😀" * 16384})
    liquid = compile_template(source + "{% if true %}{% endif %}", html=True, field="content.html")
    assert not liquid.fast
    with pytest.raises(TemplateError, match="output over 1 MiB"):
        liquid.render({"bio": "😀" * 16384})
    assert content.render({"bio": "😀" * 13000})[1] == liquid.render({"bio": "😀" * 13000})  # 1,040,000 bytes


def test_the_output_limit_is_per_message_across_its_parts() -> None:
    # 600 KB of HTML and 600 KB of text: each under 1 MiB, the message over it; the text is named.
    content = CompiledContent.compile("Hi", "{{ bio }}", "{{ bio }}{% if true %}{% endif %}")
    with pytest.raises(TemplateError) as raised:
        content.render({"bio": "b" * 600_000})
    assert raised.value.field == "content.text" and "output over 1 MiB" in raised.value.reason


def test_a_normal_template_renders_as_before() -> None:
    source = (
        "<h1>Hello {{ first_name | capitalize }},</h1>\r\n"
        "{% capture greeting %}Your plan: {{ attributes.plan | upcase }}{% endcapture %}<p>{{ greeting }}</p>\r\n"
        "<ul>{% for item in items %}<li>{{ forloop.index }}. {{ item.name | escape }} x{{ item.qty | times: 2 }}"
        "</li>{% endfor %}</ul>{% if attributes.visits > 2 %}<p>Welcome back</p>{% endif %}"
        "{{ items | map: 'name' | join: ', ' | prepend: 'All: ' }}"
    )
    variables = RECIPIENT | {"first_name": "ana", "items": [{"name": "A&B", "qty": 1}, {"name": "C", "qty": 3}]}
    assert compile_template(source, html=False).render(variables) == (
        "<h1>Hello Ana,</h1>\r\n<p>Your plan: PRO</p>\r\n"
        "<ul><li>1. A&amp;B x2</li><li>2. C x6</li></ul><p>Welcome back</p>All: A&B, C"
    )
    # A template just under the limits renders: 9,000 iterations, 900 KiB.
    big = "{% for i in (1..9000) %}{{ line }}{% endfor %}"
    assert len(compile_template(big, html=False).render({"line": "x" * 102})) == 9000 * 102


def test_render_time_error_is_a_template_error() -> None:
    template = compile_template("{{ attributes.visits | divided_by: 0 }}", html=True, field="content.html")
    with pytest.raises(TemplateError) as raised:
        template.render(RECIPIENT)
    assert raised.value.field == "content.html"


# --- the fast path is Liquid, byte for byte -------------------------------------------------------

# A few names, so that template paths often hit the variables; a quarter of the draws are names
# Liquid treats specially (`partial` is shadowed by the render context, `size`/`first` are
# properties, `nil` is a literal). `now` is left out only because it is a clock.
PLAIN_NAMES = ["a", "b", "first_name", "x-y"]
KEYS = st.sampled_from(PLAIN_NAMES * 3 + ["partial", "size", "first", "nil"])
TEXT = st.sampled_from(["&", "<", ">", '"', "'", "it's", "", " "]) | st.text(
    alphabet=st.sampled_from("ab &<>\"'\n{}é😀\x00"), max_size=8
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
    | st.text(max_size=5)
)
VALUES = SCALARS | st.recursive(
    SCALARS, lambda inner: st.dictionaries(KEYS, inner, max_size=3) | st.lists(inner, max_size=3), max_leaves=6
)
VARIABLES = st.dictionaries(KEYS, VALUES, max_size=5)
LITERALS = st.text(alphabet=st.sampled_from("ab <>&\"'\n{}-é:;"), max_size=15)


@st.composite
def templates_for(draw: st.DrawFn, variables: dict) -> str:
    """Literal text and outputs, most of whose paths lead somewhere in `variables`."""
    pieces = []
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        kind = draw(st.sampled_from(["text", "present", "present", "random", "single-brace"]))
        if kind == "text":
            pieces.append(draw(LITERALS))
            continue
        if kind == "single-brace":
            pieces.append("{%s}" % draw(st.sampled_from(["a", "b", "first_name", "partial"])))
            continue
        path, value = [], variables
        while kind == "present" and type(value) is dict and value and (not path or draw(st.booleans())):
            path.append(draw(st.sampled_from(sorted(value))))
            value = value[path[-1]]
        # Random segments, also past an existing value: `.size` of a string, `.b` of a list.
        segments = KEYS | st.sampled_from(["size", "first", "last"])
        path += draw(st.lists(segments, min_size=0 if path else 1, max_size=3 if kind == "random" else 1))
        pieces.append("{{ %s }}" % ".".join(path))
    return "".join(pieces)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, dict, bool]:
    variables = draw(VARIABLES)
    return draw(templates_for(variables)), variables, draw(st.booleans())


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=cases())
@example(case=("{{ a }}{{ a.b }}", {"a": {"b": math.nan}}, True))
@example(case=("<{{ a.b.plan }}>", {"a": {"b": {"plan": "<&\"'>"}}}, True))
@example(case=("{{ first_name }}", {"first_name": ["<a>", None, True, 1.5]}, True))
@example(case=("{{ a.size }} {{ b.size }} {{ b.first }}", {"a": "abc", "b": ["x<", 2]}, True))
@example(case=("{{ a.b }}{{ a.size }}", {"a": {"b": "it's"}}, True))
def test_fast_path_renders_exactly_what_liquid_renders(case: tuple[str, dict, bool]) -> None:
    source, variables, html = case
    try:
        template = compile_template(source, html=html)
    except TemplateError:
        assume(False)  # random braces can form broken Liquid; that is the parse tests' business
    assert template.render(variables) == template._liquid.render(variables)


@settings(max_examples=200, deadline=None)
@given(paths=st.lists(st.lists(st.sampled_from(["first_name", "a", "b", "x-y"]), min_size=1, max_size=3), max_size=6))
def test_simple_templates_are_all_fast(paths: list[list[str]]) -> None:
    source = "<p>" + " & ".join(f"{{{{ {'.'.join(path)} }}}}" for path in paths) + "</p>"
    assert compile_template(source, html=True).fast


@settings(max_examples=300, deadline=None)
@given(source=st.text(alphabet=st.sampled_from("{}%-|:'\" ab.\n[]0"), max_size=30))
def test_any_text_compiles_or_raises_template_error(source: str) -> None:
    try:
        compile_template(source, html=True)
    except TemplateError as exc:
        assert exc.field == "template" and exc.reason


@st.composite
def contents(draw: st.DrawFn) -> tuple[tuple[str, str, str], dict]:
    variables = draw(VARIABLES)
    return (draw(templates_for(variables)), draw(templates_for(variables)), draw(templates_for(variables))), variables


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=contents())
@example(case=(("{{ a }}", "<{{ a }}>{{ a.b }}", "{{ b }}"), {"a": "<&>", "b": None}))
@example(case=(("{{ a.b }}", "{{ a.size }}", ""), {"a": OrderedDict(b="<x>")}))
def test_subject_html_and_text_rendered_together_are_what_liquid_renders(case: tuple[tuple[str, str, str], dict]) -> None:
    (subject, html, text), variables = case
    try:
        content = CompiledContent.compile(subject, html, text)
    except TemplateError:
        assume(False)
    expected = tuple(t._liquid.render(variables) for t in (content.subject, content.html, content.text))
    assert content.render(variables) == expected
    # The same with the strings that need no escaping given apart (as tracked URLs are), on either path
    given = tuple(k for k, v in variables.items() if type(v) is str and not any(c in v for c in "&<>'\""))
    values = tuple(variables[k] for k in given)
    rest = {k: v for k, v in variables.items() if k not in given}
    assert content.render_given(dict(rest), given, values) == expected
    assert content.render_given(dict(rest), given, values, Budget()) == expected


# --- Telegram MarkdownV2: values escaped, the author's markup not ---------------------------------


def markdown(source: str) -> object:
    return compile_template(source, html=False, markdown=True)


@pytest.mark.parametrize(
    ("source", "fast"),
    [("*Hi* {{ v }}, _{{ attributes.v }}_!", True), ("*Hi* {{ v }}, _{{ attributes.v }}_!{% if true %}{% endif %}", False)],
    ids=["fast-path", "liquid-path"],
)
def test_markdown_values_are_escaped_and_the_template_text_is_not(source: str, fast: bool) -> None:
    # Given a MarkdownV2 template (a tag forces the Liquid path) and a value with reserved characters
    template = markdown(source)
    assert template.fast is fast
    # When it renders, then the value arrives escaped and the author's markup as written
    assert template.render({"v": "*_[", "attributes": {"v": "a.b"}}) == r"*Hi* \*\_\[, _a\.b_!"


@pytest.mark.parametrize(
    ("source", "variables", "expected"),
    [
        pytest.param("{{ n }} {{ f }} {{ t }} {{ missing }}|", {"n": -1.5, "f": 2, "t": True}, r"\-1\.5 2 true |",
                     id="not-strings"),
        pytest.param("{{ l }}", {"l": ["a.", "-", 1]}, r"a\.\-1", id="list"),
        pytest.param("{{ v | append: '!' }}", {"v": "a.b"}, r"a\.b\!", id="filter-output"),
        pytest.param("{% echo v %} {% liquid echo v %}", {"v": "(x)"}, r"\(x\) \(x\)", id="echo"),
        pytest.param("{% cycle v, 'b.' %}{% cycle v, 'b.' %}", {"v": "a-"}, r"a\-b\.", id="cycle"),
        pytest.param("{% decrement k %}", {}, r"\-1", id="decrement"),
        # A capture is the author's markup around escaped values: written as it is, once.
        pytest.param("{% capture c %}*{{ v }}*{% endcapture %}{{ c }}", {"v": "a_b"}, r"*a\_b*", id="capture"),
        pytest.param("{% raw %}{{ v }}.{% endraw %}", {"v": "x"}, "{{ v }}.", id="raw-is-template-text"),
    ],
)
def test_markdown_escapes_everything_liquid_writes_as_a_value(source: str, variables: dict, expected: str) -> None:
    assert markdown(source).render(variables) == expected


def test_markdown_templates_render_together_like_alone() -> None:
    # Given a plain, an HTML and a MarkdownV2 template using the same variable
    parts = (compile_template("{{ v }}", html=False), compile_template("<b>{{ v }}</b>", html=True), markdown("*{{ v }}*"))
    content = CompiledContent(*parts)
    assert content._together is not None
    # When they render together, then each escapes the value its own way
    variables = {"v": "<a_b>"}
    assert content.render(variables) == ("<a_b>", "<b>&lt;a_b&gt;</b>", r"*<a\_b\>*")
    assert content.render(variables) == tuple(t.render(variables) for t in parts)


def test_a_template_is_html_or_markdown_not_both() -> None:
    with pytest.raises(ValueError):
        compile_template("x", html=True, markdown=True)


def test_tablerow_is_refused_in_markdown() -> None:
    # It writes HTML table markup, whose `=` Telegram would refuse.
    with pytest.raises(TemplateError, match="unexpected tag 'tablerow'"):
        markdown("{% tablerow i in (1..2) %}{{ i }}{% endtablerow %}")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=cases())
@example(case=("{{ a }}{{ a.b }}", {"a": {"b": -1.5}}, False))
@example(case=("*{{ a.b }}*", {"a": {"b": "_*[]()~`>#+-=|{}.!\\"}}, False))
def test_markdown_fast_path_renders_exactly_what_liquid_renders(case: tuple[str, dict, bool]) -> None:
    source, variables, _ = case
    try:
        template = markdown(source)
    except TemplateError:
        assume(False)
    assert template.render(variables) == template._liquid.render(variables)
