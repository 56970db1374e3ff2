"""Per-recipient rendering of broadcast content: Liquid, with a fast path for plain substitutions."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Callable, Mapping

from liquid import BoundTemplate, Environment
from liquid.builtin.content import ContentNode
from liquid.builtin.expressions import FilteredExpression
from liquid.builtin.expressions.path import Path
from liquid.builtin.output import OutputNode
from liquid.exceptions import LiquidError
from liquid.stringify import to_liquid_string
from markupsafe import escape

__all__ = ["CompiledContent", "Template", "TemplateError", "compile_template"]


class TemplateError(Exception):
    """A template that does not parse (or fails to render), named by the content field it came from."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class _Environment(Environment):
    # Templates are tenant input run inside the sender: bound what one render can cost. Not with
    # output_stream_limit: its buffer is a StringIO(newline=None), which turns every \r\n into \n.
    loop_iteration_limit = 100_000
    local_namespace_limit = 1_000_000


def _environment(*, autoescape: bool) -> Environment:
    env = _Environment(autoescape=autoescape)
    # Crier has no partial templates, so these could only fail at send time; reject them on save.
    for name in ("include", "render"):
        env.tags.pop(name, None)
    return env


_ENVS = {True: _environment(autoescape=True), False: _environment(autoescape=False)}

# Skipped whole so that nothing inside them is touched: raw blocks, outputs and tags (Liquid's
# lexer also ends these at the first closing delimiter). Then the seeds' `{identifier}`.
_SINGLE_BRACE = re.compile(
    r"\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}"
    r"|\{\{.*?\}\}"
    r"|\{%.*?%\}"
    r"|(?<!\{)\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}(?!\})",
    re.DOTALL,
)


@lru_cache(maxsize=1024)
def _is_variable_name(name: str) -> bool:
    """True when `{{ name }}` is a variable, not a literal (`true`, `nil`) or a keyword (`if`, `in`)."""
    try:
        nodes = _ENVS[False].from_string(f"{{{{ {name} }}}}").nodes
    except LiquidError:
        return False
    return type(nodes[0].expression.left) is Path  # type: ignore[attr-defined]


def _convert_single_braces(source: str) -> str:
    if "{" not in source:
        return source

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        return f"{{{{ {name} }}}}" if name and _is_variable_name(name) else match[0]

    return _SINGLE_BRACE.sub(replace, source)


def _reason(exc: LiquidError) -> str:
    context = exc.context()
    message = str(exc.message)
    return f"{message} on line {context[0]}" if context else message


class Template:
    """A compiled template; `render` is safe to call from many tasks at once."""

    __slots__ = ("field", "html", "_liquid")
    fast = False

    def __init__(self, field: str, html: bool, liquid: BoundTemplate) -> None:
        self.field, self.html, self._liquid = field, html, liquid

    def render(self, variables: Mapping[str, Any]) -> str:
        try:
            return self._liquid.render(variables)
        except LiquidError as exc:  # e.g. `divided_by: 0` on this recipient's data, or a limit
            raise TemplateError(self.field, _reason(exc)) from exc


_MISSING: Any = object()
# Types whose `obj["key"]` raises TypeError in Liquid's path lookup, i.e. an undefined (empty) value.
_NOT_SUBSCRIPTABLE_BY_NAME = frozenset({str, list, tuple, int, float, bool, type(None)})
# Liquid resolves these segments specially (`.size` is a length, `.first` an item).
_SPECIAL_SEGMENTS = frozenset({"size", "first", "last"})
# Exactly the characters markupsafe.escape replaces.
_needs_escape = re.compile(r"[&<>'\"]").search


class _Unusual(Exception):
    """This recipient's data has a shape the fast path does not mirror: render it with Liquid."""


class _FastTemplate(Template):
    """Literal text and `{{ path }}` outputs only: a join instead of a Liquid render (~10x faster).

    Its output must equal Liquid's byte for byte (tests/test_templates.py checks that with hypothesis).
    """

    __slots__ = ("_parts", "_slots")
    fast = True

    def __init__(self, field: str, html: bool, liquid: BoundTemplate, parts: list[str],
                 slots: list[tuple[int, str, tuple[str, ...] | None]]) -> None:
        super().__init__(field, html, liquid)
        self._parts, self._slots = parts, slots

    def render(self, variables: Mapping[str, Any]) -> str:
        parts = self._parts.copy()
        get, html = variables.get, self.html
        try:
            for index, root, rest in self._slots:
                value = get(root, _MISSING)
                if rest is not None:
                    value = _follow(value, rest)
                if type(value) is str:
                    # escape() builds a Markup (~0.35 us); most values have nothing to escape.
                    if html and _needs_escape(value) is not None:
                        value = escape(value)
                else:
                    value = _text(value, html)
                parts[index] = value
        except _Unusual:
            return super().render(variables)
        return "".join(parts)


def _follow(value: Any, rest: tuple[str, ...]) -> Any:
    """`value.rest` as Liquid looks it up, or _MISSING; raises _Unusual where only Liquid can tell."""
    for segment in rest:
        if type(value) is dict:
            value = value.get(segment, _MISSING)
        elif value is _MISSING or type(value) in _NOT_SUBSCRIPTABLE_BY_NAME:
            return _MISSING
        else:  # a Mapping subclass, a drop, ...: Liquid's own lookup decides
            raise _Unusual
    return value


def _text(value: Any, html: bool) -> str:
    """What Liquid's output node writes for a value that is not a str."""
    kind = type(value)
    if kind is int or kind is float:  # str() of these never holds a character to escape
        return str(value)
    if value is None or value is _MISSING:
        return ""
    # The very function Liquid's output node uses, so bools, lists, objects agree.
    return to_liquid_string(value, html)


def _compile_together(templates: tuple[_FastTemplate, ...]) -> Callable[[Mapping[str, Any]], tuple[str, ...]]:
    """One Python function rendering fast templates together: each variable they use is looked up
    and turned into text once, escaped once if an HTML one uses it, and each template is one join.
    Same output as their render() (tests/test_templates.py checks), about twice as fast: rendering
    was the largest cost of a worker.

    The generated code holds only names made here; template text and variable names reach it as
    constants in its namespace, never as source."""
    namespace: dict[str, Any] = {"MISSING": _MISSING, "follow": _follow, "text": _text, "needs_escape": _needs_escape,
                                 "escape": escape, "str": str, "type": type}
    slots: dict[tuple[str, tuple[str, ...] | None], int] = {}
    for t in templates:
        for _, root, rest in t._slots:
            slots.setdefault((root, rest), len(slots))
    plain_used = {slots[(root, rest)] for t in templates if not t.html for _, root, rest in t._slots}
    html_used = {slots[(root, rest)] for t in templates if t.html for _, root, rest in t._slots}
    lines = ["def render(variables):", "    get = variables.get"]
    for (root, rest), i in slots.items():
        namespace[f"K{i}"], namespace[f"R{i}"] = root, rest
        lookup = f"get(K{i}, MISSING)" if rest is None else f"follow(get(K{i}, MISSING), R{i})"
        lines += [f"    v{i} = {lookup}", f"    if type(v{i}) is str:"]
        if i in plain_used:
            lines.append(f"        p{i} = v{i}")
        if i in html_used:
            lines.append(f"        e{i} = v{i} if needs_escape(v{i}) is None else str(escape(v{i}))")
        lines.append("    else:")
        if i in plain_used:
            lines.append(f"        p{i} = text(v{i}, False)")
        if i in html_used:
            lines.append(f"        e{i} = text(v{i}, True)")
    outputs = []
    for n, t in enumerate(templates):
        # Each template's pieces in order: its text as constants L<n>_<j>, its values as p<i> (plain)
        # or e<i> (escaped).
        values = {index: f"{'e' if t.html else 'p'}{slots[(root, rest)]}" for index, root, rest in t._slots}
        names = []
        for j, piece in enumerate(t._parts):
            if j in values:
                names.append(values[j])
            elif piece:
                namespace[f"L{n}_{j}"] = piece
                names.append(f"L{n}_{j}")
        outputs.append(f"''.join(({', '.join(names)},))" if names else "''")
    lines.append(f"    return ({', '.join(outputs)},)")
    exec(compile("\n".join(lines), "<crier templates>", "exec"), namespace)
    return namespace["render"]  # type: ignore[no-any-return]


# A root the render context shadows or supplies itself (`partial` is always false, `now` is a clock).
@lru_cache(maxsize=1024)
def _plain_root(env: Environment, root: str) -> bool:
    try:
        probe = env.from_string(f"{{{{ {root} }}}}")
    except LiquidError:  # a bracketed root such as `['a b']`: not worth a fast path
        return False
    return probe.render({}) == "" and probe.render({root: "\x00probe"}) == "\x00probe"


def _fast_plan(env: Environment, source: str, nodes: list[Any]) -> tuple[list[str], list[Any]] | None:
    """The literal parts and variable slots of a template made only of text and `{{ a.b }}`, else None."""
    # Whitespace control and tags (raw, comment, if, ...) change what the text around them becomes: Liquid.
    if "{%" in source or "{{-" in source or "-}}" in source:
        return None
    parts: list[str] = []
    slots: list[tuple[int, str, tuple[str, ...] | None]] = []
    for node in nodes:
        if type(node) is ContentNode:
            parts.append(node.text)
            continue
        if type(node) is not OutputNode:
            return None
        expression = node.expression
        if type(expression) is not FilteredExpression or expression.filters:
            return None
        path = expression.left
        if type(path) is not Path or not all(type(s) is str for s in path.path):
            return None
        root, *rest = path.path
        if _SPECIAL_SEGMENTS.intersection(rest) or not _plain_root(env, root):
            return None
        slots.append((len(parts), root, tuple(rest) or None))
        parts.append("")
    return parts, slots


def _check_filters(env: Environment, field: str, source: str, liquid: Any) -> None:
    """python-liquid looks filters up only when rendering: find an unknown one on save instead."""
    for name, spans in liquid.analyze(include_partials=False).filters.items():
        if name not in env.filters:
            line = source.count("\n", 0, spans[0].index) + 1
            raise TemplateError(field, f"unknown filter '{name}' on line {line}")


def compile_template(source: str, *, html: bool, field: str = "template") -> Template:
    """Parse once (raises TemplateError); the result renders per recipient. `html` turns on autoescape."""
    env = _ENVS[html]
    converted = _convert_single_braces(source)
    try:
        liquid = env.from_string(converted)
    except LiquidError as exc:
        raise TemplateError(field, _reason(exc)) from exc
    _check_filters(env, field, converted, liquid)
    plan = _fast_plan(env, converted, liquid.nodes)
    if plan is None:
        return Template(field, html, liquid)
    return _FastTemplate(field, html, liquid, *plan)


class CompiledContent:
    """A broadcast's subject (plain), HTML body (escaped) and text body (plain), compiled once per job."""

    __slots__ = ("subject", "html", "text", "_together")

    def __init__(self, subject: Template, html: Template, text: Template) -> None:
        self.subject, self.html, self.text = subject, html, text
        parts = (subject, html, text)
        self._together = (
            _compile_together(parts) if all(type(t) is _FastTemplate for t in parts) else None  # type: ignore[arg-type]
        )

    @classmethod
    def compile(cls, subject: str, html: str, text: str) -> CompiledContent:
        return cls(
            compile_template(subject, html=False, field="content.subject"),
            compile_template(html, html=True, field="content.html"),
            compile_template(text, html=False, field="content.text"),
        )

    def render(self, variables: Mapping[str, Any]) -> tuple[str, str, str]:
        if self._together is not None:
            try:
                return self._together(variables)  # type: ignore[return-value]
            except _Unusual:  # a value only Liquid's lookup can resolve: each template decides
                pass
        return self.subject.render(variables), self.html.render(variables), self.text.render(variables)
