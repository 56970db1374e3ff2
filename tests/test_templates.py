"""Per-recipient rendering: Liquid semantics, escaping, single-brace placeholders, and the fast path."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from shared.content.templates import CompiledContent, TemplateError, compile_template

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


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("{% for i in (1..1000) %}{% for j in (1..1000) %}x{% endfor %}{% endfor %}", "loop iteration limit"),
        ("{% assign s = 'ab' %}{% for i in (1..64) %}{% assign s = s | append: s %}{% endfor %}", "namespace limit"),
    ],
)
def test_a_runaway_template_stops_with_a_template_error(source: str, reason: str) -> None:
    with pytest.raises(TemplateError, match=reason):
        compile_template(source, html=True, field="content.html").render({})


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
