"""Per-recipient rendering of broadcast content: Liquid, with a fast path for plain substitutions.

Each value an output writes is escaped for where it lands: HTML (markupsafe, Liquid's autoescape),
Telegram MarkdownV2 (escape_markdown_v2), or not at all (subjects, plain text)."""
from __future__ import annotations

import re
from functools import lru_cache
from io import StringIO
from typing import Any, Callable, Mapping, TextIO

from liquid import BoundTemplate, Environment, RenderContext
from liquid.ast import BlockNode, ConditionalBlockNode
from liquid.builtin.content import ContentNode
from liquid.builtin.expressions import FilteredExpression
from liquid.builtin.expressions.path import Path
from liquid.builtin.output import Output, OutputNode
from liquid.builtin.tags.capture_tag import CaptureNode, CaptureTag
from liquid.builtin.tags.cycle_tag import CycleNode, CycleTag
from liquid.builtin.tags.decrement_tag import DecrementNode, DecrementTag
from liquid.builtin.tags.echo_tag import EchoNode, EchoTag
from liquid.builtin.tags.for_tag import ForNode, ForTag
from liquid.builtin.tags.increment_tag import IncrementNode, IncrementTag
from liquid.builtin.tags.tablerow_tag import TablerowNode, TablerowTag
from liquid.exceptions import (
    ContextDepthError,
    LiquidError,
    LocalNamespaceLimitError,
    LoopIterationLimitError,
    OutputStreamLimitError,
    ResourceLimitError,
)
from liquid.output import LimitedStringIO
from liquid.stringify import to_liquid_string
from liquid.token import Token
from markupsafe import escape

from shared.content.markdown import MARKDOWN_V2_SPECIAL, escape_markdown_v2

__all__ = ["Budget", "CompiledContent", "Template", "TemplateError", "compile_template", "preview_budget"]


class TemplateError(Exception):
    """A template that does not parse (or fails to render), named by the content field it came from."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


# --- what one message may cost ------------------------------------------------------------------
# Templates are tenant input, rendered in the API (save check, preview, test sends) and per recipient
# in the senders: each message's render is bounded in output and in work, so no template stalls a
# process the other tenants share.
#
# Output: 1 MiB per message (subject, HTML and text together, UTF-8). Providers take 10 MB (SES) to
# 25-30 MB (Mailgun, SendGrid) per message after MIME encoding (base64 adds a third), and Gmail
# clips an HTML body past ~100 KB, so a real email is a few tens of KiB and fits comfortably.
OUTPUT_LIMIT = 1024 * 1024
# Loop iterations: 10,000 per message, counted across all loops (nested and one after another);
# python-liquid's own loop_iteration_limit only bounds the product of the loops nested at one point,
# so sibling loops, or a loop inside a loop inside a loop, add up unchecked. A real email loops over
# a contact's items (tens), perhaps nested (hundreds); 10,000 is far above that and costs at most a
# few tens of milliseconds.
LOOP_LIMIT = 10_000
# Steps: 20,000 per message, each node of a loop's body rendered once (a loop of 100 items whose body
# holds 30 tags and outputs is 3,000) and each filter call. The loop limit alone lets a body of a
# thousand `{% if %}` tags run ten million times; a step costs 3-5 us, so a message stays within
# ~0.1 s. A real email's loops (tens of items, tens of nodes) take a few thousand.
STEP_LIMIT = 20_000
# Work of filters and captures: 2 million characters (or items) per message: each filter call
# counts the size of its input and arguments (and, for `replace` and `join`, of the output it
# would build) and each capture what is written into it. Output and loop limits do not see a value
# built without being written, such as `s | append: s` or a capture of itself in a loop, a range
# `(1..100000000) | join`, or a quadratic `replace`. Real templates filter short strings.
WORK_LIMIT = 2_000_000
# Assigned values (python-liquid's local_namespace_limit, sys.getsizeof of the values): a couple of
# values up to the output limit; anything bigger could never be written.
NAMESPACE_LIMIT = 2 * OUTPUT_LIMIT
# Numbers a filter returns: `times` squaring a number in a loop would build ever longer integers.
_NUMBER_BITS = 256
# Up to this many characters a message is under OUTPUT_LIMIT bytes whatever they are (UTF-8 takes at
# most 4 bytes a character): the fast path counts bytes only past it.
_SURELY_UNDER = OUTPUT_LIMIT // 4


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB"


class _WorkLimitError(ResourceLimitError):
    """Filters and captures handled more than WORK_LIMIT characters."""


class Budget:
    """What is left of one message's output, loop iterations, steps and work (`scale` messages'
    worth for a preview, which charges each of its messages' use to it)."""

    __slots__ = ("loops", "output", "scale", "steps", "weight", "work")

    def __init__(self, scale: int = 1) -> None:
        self.output, self.loops, self.work = OUTPUT_LIMIT * scale, LOOP_LIMIT * scale, WORK_LIMIT * scale
        self.steps = STEP_LIMIT * scale
        self.scale = scale
        self.weight = 1  # the nodes in the body of the loop about to start (set by _ForNode)

    def charge(self, message: Budget) -> None:
        """Count what `message` used against this budget."""
        self.output -= OUTPUT_LIMIT * message.scale - message.output
        self.loops -= LOOP_LIMIT * message.scale - message.loops
        self.steps -= STEP_LIMIT * message.scale - message.steps
        self.work -= WORK_LIMIT * message.scale - message.work

    @property
    def used_up(self) -> bool:
        return self.output <= 0 or self.loops <= 0 or self.steps <= 0 or self.work <= 0

    # The errors a message's render raises past its limits (the worker prefixes "template: ").
    @staticmethod
    def output_error() -> OutputStreamLimitError:
        return OutputStreamLimitError(f"output over {_mib(OUTPUT_LIMIT)} (the limit per message)", token=None)

    @staticmethod
    def loop_error() -> LoopIterationLimitError:
        return LoopIterationLimitError(f"more than {LOOP_LIMIT:,} loop iterations (the limit per message)", token=None)

    @staticmethod
    def step_error(token: Token | None = None) -> _WorkLimitError:
        return _WorkLimitError(
            f"more than {STEP_LIMIT:,} template steps, loop body nodes and filter calls (the limit per message)",
            token=token,
        )

    @staticmethod
    def work_error(token: Token | None = None) -> _WorkLimitError:
        return _WorkLimitError(
            f"filters and captures handle more than {WORK_LIMIT:,} characters (the limit per message)", token=token
        )


def preview_budget() -> Budget:
    """A preview's budget: two messages' worth, charged with what each message used (each renders
    within a message's limits, as in a send). Once it is used up the preview renders no more, so it
    stops within three messages' worst case (~0.3 s) whatever the template."""
    return Budget(scale=2)


def _size(value: Any) -> int:
    """Characters of a string, items of a sequence or mapping, 1 for anything else."""
    if isinstance(value, (str, list, tuple, dict, range)):
        try:
            return len(value)
        except OverflowError:  # range(0, 10**30)
            return WORK_LIMIT * 1000
    return 1


def _text_size(value: Any) -> int:
    """Characters a string or a sequence of strings stands for (a list may repeat one long string)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(len(item) if isinstance(item, str) else 1 for item in value)
    return _size(value)


def _filter_cost(name: str, left: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    cost = _size(left) + sum(_size(a) for a in args) + sum(_size(v) for v in kwargs.values())
    # The two filters whose output can be many times their input: charge that output up front.
    if name == "replace" and isinstance(left, str) and len(args) == 2:
        old, new = str(args[0]), str(args[1])
        cost += left.count(old) * max(len(new) - len(old), 0)
    elif name == "join" and isinstance(left, (list, tuple, range)):
        separator = args[0] if args else kwargs.get("separator", " ")
        cost += _text_size(left) + max(_size(left) - 1, 0) * len(str(separator))
    return cost


class _Buffer(LimitedStringIO):
    """python-liquid's output stream limit (LimitedStringIO), with two changes: line endings are kept
    (its default newline=None turns every CR LF into LF), and what is written also counts as work."""

    def __init__(self, limit: int, budget: Budget) -> None:
        super().__init__(limit, newline="\n")
        self.budget = budget

    def write(self, text: str) -> int:
        if text:
            size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
            self.size += size
            if self.size > self.limit:
                raise self.budget.output_error()
            budget = self.budget
            budget.work -= size
            if budget.work < 0:
                raise budget.work_error()
        return StringIO.write(self, text)


class _Context(RenderContext):
    """A render context drawing on a Budget: loop iterations counted across all loops, and each
    filter call charged and its result checked."""

    __slots__ = ("budget",)

    def __init__(self, *args: Any, budget: Budget | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget if budget is not None else Budget()

    def raise_for_loop_limit(self, length: int = 1) -> None:
        # Called by python-liquid as each loop starts, with the number of items it will go through.
        try:
            super().raise_for_loop_limit(length)  # the loops nested here, multiplied: fails early
        except LoopIterationLimitError:
            raise self.budget.loop_error() from None
        budget = self.budget
        budget.loops -= length
        if budget.loops < 0:
            raise budget.loop_error()
        budget.steps -= length * budget.weight
        budget.weight = 1
        if budget.steps < 0:
            raise budget.step_error()

    def get_buffer(self, buf: TextIO | None = None) -> StringIO:
        # A capture's buffer: what is left of the enclosing one's output limit, as python-liquid does.
        limit = buf.limit - buf.size if isinstance(buf, LimitedStringIO) else self.budget.output
        return _Buffer(limit, self.budget)

    def filter(self, name: str, token: Token | None) -> Callable[..., object]:
        func = super().filter(name, token)
        budget = self.budget

        def bounded(left: Any, *args: Any, **kwargs: Any) -> object:
            budget.steps -= 1
            if budget.steps < 0:
                raise budget.step_error(token)
            budget.work -= _filter_cost(name, left, args, kwargs)
            if budget.work < 0:
                raise budget.work_error(token)
            result = func(left, *args, **kwargs)
            if type(result) is int and result.bit_length() > _NUMBER_BITS:
                raise _WorkLimitError(f"{name}: a number over {_NUMBER_BITS} bits", token=token)
            if _text_size(result) > OUTPUT_LIMIT:
                raise _WorkLimitError(f"{name}: a value over {_mib(OUTPUT_LIMIT)}", token=token)
            return result

        return bounded


def _weight(node: Any) -> int:
    """Tags, outputs and text in a loop body, at least 1: what one pass through it renders. A nested
    loop counts one here (its own body it charges as it runs); blocks only hold the others."""
    if isinstance(node, (ForNode, TablerowNode)):
        return 1
    own = 0 if isinstance(node, (BlockNode, ConditionalBlockNode)) else 1
    return own + sum(_weight(child) for child in node.children(None, include_partials=False))  # type: ignore[arg-type]


class _ForNode(ForNode):
    __slots__ = ("weight",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight = max(_weight(self.block), 1)

    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        context.budget.weight = self.weight  # type: ignore[attr-defined]  # taken by raise_for_loop_limit
        return super().render_to_output(context, buffer)


class _TablerowNode(TablerowNode):
    __slots__ = ("weight",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight = max(_weight(self.block), 1)

    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        context.budget.weight = self.weight  # type: ignore[attr-defined]
        return super().render_to_output(context, buffer)


class _ForTag(ForTag):
    node_class = _ForNode


class _TablerowTag(TablerowTag):
    node_class = _TablerowNode


class _BoundTemplate(BoundTemplate):
    context_class = _Context

    def render(self, *args: Any, **kwargs: Any) -> str:
        return self.render_within(dict(*args, **kwargs), Budget())

    def render_within(self, variables: Mapping[str, Any], budget: Budget) -> str:
        """BoundTemplate.render, drawing on `budget` (shared by a message's parts, or a preview's)."""
        context = _Context(self, globals=self.make_globals(variables), budget=budget)
        buf = _Buffer(budget.output, budget)
        self.render_with_context(context, buf)
        budget.output -= buf.size
        return buf.getvalue()


class _Environment(Environment):
    # The library's own limits where it has them (see above for the values): the loop limit it
    # checks per nesting, the output stream limit (through _Buffer), assigned values, and the depth
    # of contexts (its default 30; include/render, the only ways to nest them, are removed below).
    template_class = _BoundTemplate
    loop_iteration_limit = LOOP_LIMIT
    local_namespace_limit = NAMESPACE_LIMIT
    output_stream_limit = OUTPUT_LIMIT


# --- Telegram MarkdownV2: values escaped, the author's markup not ---------------------------------
# Liquid's autoescape is HTML only (markupsafe, in to_liquid_string). For MarkdownV2 the markdown
# environment (autoescape off) uses its own nodes for everything that writes a value: outputs,
# echo, cycle, increment and decrement (a negative number's `-` is reserved too). Each renders as
# the library's node does, into a stream that escapes what is written; literal text (content
# nodes, raw blocks) is written as is, since the author writes MarkdownV2 themselves.


class _MarkdownText(str):
    """Text already MarkdownV2 (a capture's: the author's markup around escaped values), like
    markupsafe's Markup: written as it is, not escaped again. A filter applied to it returns a
    plain str, which is escaped again when written."""

    __slots__ = ()


class _EscapingWriter:
    """The output stream of a node that writes values: each write escaped for MarkdownV2."""

    __slots__ = ("_buffer",)

    def __init__(self, buffer: TextIO) -> None:
        self._buffer = buffer

    def write(self, text: str) -> int:
        return self._buffer.write(text if type(text) is _MarkdownText else escape_markdown_v2(text))


class _WritesMarkdownValues:
    """Mixed into a node class: what the node writes is escaped."""

    __slots__ = ()

    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        return super().render_to_output(context, _EscapingWriter(buffer))  # type: ignore[misc, arg-type]

    async def render_to_output_async(self, context: RenderContext, buffer: TextIO) -> int:
        return await super().render_to_output_async(context, _EscapingWriter(buffer))  # type: ignore[misc, arg-type]


class _MarkdownOutputNode(_WritesMarkdownValues, OutputNode):
    __slots__ = ()


class _MarkdownEchoNode(_WritesMarkdownValues, EchoNode):
    __slots__ = ()


class _MarkdownCycleNode(_WritesMarkdownValues, CycleNode):
    __slots__ = ()


class _MarkdownIncrementNode(_WritesMarkdownValues, IncrementNode):
    __slots__ = ()


class _MarkdownDecrementNode(_WritesMarkdownValues, DecrementNode):
    __slots__ = ()


class _MarkdownCaptureNode(CaptureNode):
    __slots__ = ()

    def _assign(self, context: RenderContext, buf: StringIO) -> None:
        context.assign(self.name, _MarkdownText(buf.getvalue()))


class _MarkdownOutput(Output):
    node_class = _MarkdownOutputNode


class _MarkdownEchoTag(EchoTag):
    node_class = _MarkdownEchoNode


class _MarkdownCycleTag(CycleTag):
    node_class = _MarkdownCycleNode


class _MarkdownIncrementTag(IncrementTag):
    node_class = _MarkdownIncrementNode


class _MarkdownDecrementTag(DecrementTag):
    node_class = _MarkdownDecrementNode


class _MarkdownCaptureTag(CaptureTag):
    node_class = _MarkdownCaptureNode


_MARKDOWN_TAGS = (
    _MarkdownOutput, _MarkdownEchoTag, _MarkdownCycleTag, _MarkdownIncrementTag, _MarkdownDecrementTag,
    _MarkdownCaptureTag,
)


def _environment(*, autoescape: bool, markdown: bool = False) -> Environment:
    env = _Environment(autoescape=autoescape)
    # Loops that know the size of their body, for the step limit.
    env.add_tag(_ForTag)
    env.add_tag(_TablerowTag)
    # Crier has no partial templates, so these could only fail at send time; reject them on save.
    for name in ("include", "render"):
        env.tags.pop(name, None)
    if markdown:
        for tag in _MARKDOWN_TAGS:
            env.add_tag(tag)
        # tablerow writes HTML table markup, whose `=` MarkdownV2 reserves: Telegram would refuse
        # the message, so it is refused on save instead.
        env.tags.pop("tablerow", None)
    return env


_ENVS = {True: _environment(autoescape=True), False: _environment(autoescape=False)}
_MARKDOWN_ENV = _environment(autoescape=False, markdown=True)

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
    if isinstance(exc, LocalNamespaceLimitError):  # python-liquid's words: "local namespace limit reached"
        message = f"assigned values over {_mib(NAMESPACE_LIMIT)}"
    elif isinstance(exc, ContextDepthError):
        message = "nested too deeply"
    return f"{message} on line {context[0]}" if context else message


class Template:
    """A compiled template; `render` is safe to call from many tasks at once."""

    __slots__ = ("field", "html", "markdown", "_liquid")
    fast = False

    def __init__(self, field: str, html: bool, liquid: _BoundTemplate, markdown: bool = False) -> None:
        self.field, self.html, self.markdown, self._liquid = field, html, markdown, liquid

    def render(self, variables: Mapping[str, Any], budget: Budget | None = None) -> str:
        """Raises TemplateError, also when the render goes past what is left of `budget` (by
        default one message's)."""
        try:
            return self._liquid.render_within(variables, Budget() if budget is None else budget)
        except LiquidError as exc:  # e.g. `divided_by: 0` on this recipient's data, or a limit
            raise TemplateError(self.field, _reason(exc)) from exc
        except OverflowError as exc:  # `(1..n).size` past what Python's len() takes
            raise TemplateError(self.field, f"a number too large ({exc})") from exc


_MISSING: Any = object()
# Types whose `obj["key"]` raises TypeError in Liquid's path lookup, i.e. an undefined (empty) value.
_NOT_SUBSCRIPTABLE_BY_NAME = frozenset({str, list, tuple, int, float, bool, type(None)})
# Liquid resolves these segments specially (`.size` is a length, `.first` an item).
_SPECIAL_SEGMENTS = frozenset({"size", "first", "last"})
# Exactly the characters markupsafe.escape replaces, and those escape_markdown_v2 does.
_needs_escape = re.compile(r"[&<>'\"]").search
_HTML_SPECIAL_IN = " or ".join(f"{c!r} in {{v}}" for c in "&<>'\"")  # the same test, as source
_needs_markdown_escape = re.compile(f"[{re.escape(MARKDOWN_V2_SPECIAL)}]").search


class _Unusual(Exception):
    """This recipient's data has a shape the fast path does not mirror: render it with Liquid."""


class _FastTemplate(Template):
    """Literal text and `{{ path }}` outputs only: a join instead of a Liquid render (~10x faster).

    Its output must equal Liquid's byte for byte (tests/test_templates.py checks that with hypothesis).
    """

    __slots__ = ("_parts", "_slots")
    fast = True

    def __init__(self, field: str, html: bool, liquid: _BoundTemplate, parts: list[str],
                 slots: list[tuple[int, str, tuple[str, ...] | None]], markdown: bool = False) -> None:
        super().__init__(field, html, liquid, markdown)
        self._parts, self._slots = parts, slots

    def render(self, variables: Mapping[str, Any], budget: Budget | None = None) -> str:
        parts = self._parts.copy()
        get, html, markdown = variables.get, self.html, self.markdown
        try:
            for index, root, rest in self._slots:
                value = get(root, _MISSING)
                if rest is not None:
                    value = _follow(value, rest)
                if type(value) is str:
                    # escape() builds a Markup (~0.35 us); most values have nothing to escape.
                    if html and _needs_escape(value) is not None:
                        value = escape(value)
                    elif markdown and _needs_markdown_escape(value) is not None:
                        value = escape_markdown_v2(value)
                else:
                    value = _markdown_text(value) if markdown else _text(value, html)
                parts[index] = value
        except _Unusual:
            return super().render(variables, budget)
        text = "".join(parts)
        if budget is None:
            if len(text) > _SURELY_UNDER:  # many values of the size the input limits allow
                _charge_output(Budget(), self.field, text)
        else:
            _charge_output(budget, self.field, text)
        return text


def _charge_output(budget: Budget, field: str, text: str) -> None:
    """What Liquid's output limit does for a render, for the fast path's joined text."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > budget.output:
        raise TemplateError(field, str(budget.output_error().message))
    budget.output -= size


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


def _markdown_text(value: Any) -> str:
    """What the markdown output node writes for a value that is not a str (`-1.5` is `\\-1\\.5`)."""
    return escape_markdown_v2(_text(value, False))


def _compile_together(
    templates: tuple[_FastTemplate, ...], given: tuple[str, ...] = (),
) -> Callable[..., tuple[str, ...]]:
    """One Python function rendering fast templates together: each variable they use is looked up
    and turned into text once, escaped once for the HTML (or MarkdownV2) ones that use it, and each
    template is one join.
    Same output as their render() (tests/test_templates.py checks), about twice as fast: rendering
    was the largest cost of a worker.

    With `given` names, the function takes a second argument, their values in that order: strings
    written as they are, with no lookup and no escaping (CompiledContent.render_given).

    The generated code holds only names made here; template text and variable names reach it as
    constants in its namespace, never as source."""
    def too_long(rendered: tuple[str, ...]) -> None:
        """The output limit, counted in bytes, once the characters could be past it."""
        budget = Budget()
        for template, text in zip(templates, rendered):
            _charge_output(budget, template.field, text)

    namespace: dict[str, Any] = {"MISSING": _MISSING, "follow": _follow, "text": _text, "needs_escape": _needs_escape,
                                 "escape": escape, "str": str, "type": type, "len": len, "too_long": too_long,
                                 "needs_markdown_escape": _needs_markdown_escape, "escape_markdown": escape_markdown_v2,
                                 "markdown_text": _markdown_text}
    slots: dict[tuple[str, tuple[str, ...] | None], int] = {}
    for t in templates:
        for _, root, rest in t._slots:
            slots.setdefault((root, rest), len(slots))

    def kind(t: _FastTemplate) -> str:
        """The variable prefix of a template's values: p (plain), e (HTML-escaped), m (MarkdownV2)."""
        return "e" if t.html else "m" if t.markdown else "p"

    used = {k: {slots[(root, rest)] for t in templates if kind(t) == k for _, root, rest in t._slots} for k in "pem"}
    lines = ["def render(variables, given):" if given else "def render(variables):", "    get = variables.get"]
    if given:
        lines.append(f"    {', '.join(f'g{k}' for k in range(len(given)))}, = given")
    for (root, rest), i in slots.items():
        if rest is None and root in given:  # the caller's value, as it is, whatever the template's kind
            k = given.index(root)
            lines.append(f"    p{i} = e{i} = m{i} = g{k}")
            continue
        namespace[f"K{i}"], namespace[f"R{i}"] = root, rest
        lookup = f"get(K{i}, MISSING)" if rest is None else f"follow(get(K{i}, MISSING), R{i})"
        lines += [f"    v{i} = {lookup}", f"    if type(v{i}) is str:"]
        if i in used["p"]:
            lines.append(f"        p{i} = v{i}")
        if i in used["e"]:
            # Five `in` tests, not the regex: 0.1 µs whatever the length, the regex 0.4 µs on a
            # 70-character value (a tracked link's URL).
            lines.append(f"        e{i} = str(escape(v{i})) if {_HTML_SPECIAL_IN.format(v=f'v{i}')} else v{i}")
        if i in used["m"]:
            lines.append(f"        m{i} = v{i} if needs_markdown_escape(v{i}) is None else escape_markdown(v{i})")
        lines.append("    else:")
        if i in used["p"]:
            lines.append(f"        p{i} = text(v{i}, False)")
        if i in used["e"]:
            lines.append(f"        e{i} = text(v{i}, True)")
        if i in used["m"]:
            lines.append(f"        m{i} = markdown_text(v{i})")
    outputs = []
    for n, t in enumerate(templates):
        # Each template's pieces in order: its text as constants L<n>_<j>, its values as p<i> (plain),
        # e<i> (HTML-escaped) or m<i> (MarkdownV2-escaped).
        values = {index: f"{kind(t)}{slots[(root, rest)]}" for index, root, rest in t._slots}
        names = []
        for j, piece in enumerate(t._parts):
            if j in values:
                names.append(values[j])
            elif piece:
                namespace[f"L{n}_{j}"] = piece
                names.append(f"L{n}_{j}")
        outputs.append(f"''.join(({', '.join(names)},))" if names else "''")
    for n, output in enumerate(outputs):
        lines.append(f"    o{n} = {output}")
    together = ", ".join(f"o{n}" for n in range(len(outputs)))
    # The one check the fast path adds: a len() per template (a message's output limit).
    lines += [f"    if {' + '.join(f'len(o{n})' for n in range(len(outputs))) or '0'} > {_SURELY_UNDER}:",
              f"        too_long(({together},))",
              f"    return ({together},)"]
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
        if type(node) is not OutputNode and type(node) is not _MarkdownOutputNode:
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


def compile_template(source: str, *, html: bool, markdown: bool = False, field: str = "template") -> Template:
    """Parse once (raises TemplateError); the result renders per recipient. `html` turns on
    autoescape; `markdown` escapes every value an output writes for Telegram's MarkdownV2 (the
    template's own text is the author's MarkdownV2, left as it is)."""
    if html and markdown:
        raise ValueError("a template is HTML or MarkdownV2, not both")
    env = _MARKDOWN_ENV if markdown else _ENVS[html]
    converted = _convert_single_braces(source)
    try:
        liquid = env.from_string(converted)
    except LiquidError as exc:
        raise TemplateError(field, _reason(exc)) from exc
    _check_filters(env, field, converted, liquid)
    plan = _fast_plan(env, converted, liquid.nodes)
    if plan is None:
        return Template(field, html, liquid, markdown)
    return _FastTemplate(field, html, liquid, *plan, markdown=markdown)


class CompiledContent:
    """A broadcast's subject (plain), HTML body (escaped) and text body (plain), compiled once per job."""

    __slots__ = ("subject", "html", "text", "_together", "_with_given")

    def __init__(self, subject: Template, html: Template, text: Template) -> None:
        self.subject, self.html, self.text = subject, html, text
        parts = (subject, html, text)
        self._together = (
            _compile_together(parts) if all(type(t) is _FastTemplate for t in parts) else None  # type: ignore[arg-type]
        )
        self._with_given: dict[tuple[str, ...], Callable[..., tuple[str, ...]]] = {}

    @classmethod
    def compile(cls, subject: str, html: str, text: str) -> CompiledContent:
        return cls(
            compile_template(subject, html=False, field="content.subject"),
            compile_template(html, html=True, field="content.html"),
            compile_template(text, html=False, field="content.text"),
        )

    def render(self, variables: Mapping[str, Any], budget: Budget | None = None) -> tuple[str, str, str]:
        """The message's three parts, within one message's limits (or what is left of `budget`,
        such as a preview's); raises TemplateError naming the part that went past them."""
        if budget is None:
            if self._together is not None:  # it checks the output limit itself
                try:
                    return self._together(variables)  # type: ignore[return-value]
                except _Unusual:  # a value only Liquid's lookup can resolve: each template decides
                    pass
            budget = Budget()
        return (
            self.subject.render(variables, budget),
            self.html.render(variables, budget),
            self.text.render(variables, budget),
        )

    def render_given(self, variables: dict[str, Any], names: tuple[str, ...], values: tuple[str, ...],
                     budget: Budget | None = None) -> tuple[str, str, str]:
        """render() with `variables[names[i]] = values[i]`, where the caller promises each value is a
        string with nothing any part would escape (a tracked link's URL, base64url). On the fast
        path the values go straight into the output, with no lookup and no check (four tracked
        links took 0.8 µs of a message through the variables); otherwise they are set and escaped
        as any value is, which leaves them as they are."""
        if budget is None and self._together is not None and names:
            render = self._with_given.get(names)
            if render is None and len(self._with_given) < 16:  # one set of names per variant
                render = self._with_given[names] = _compile_together(
                    (self.subject, self.html, self.text), names)  # type: ignore[arg-type]
            if render is not None:
                try:
                    return render(variables, values)  # type: ignore[return-value]
                except _Unusual:
                    pass
        variables.update(zip(names, values))
        return self.render(variables, budget)

    def check(self) -> None:
        """Render once with no variables and raise TemplateError if that goes past a limit: such a
        template could not render for anybody (a failure that depends on the data is the
        recipient's, at send time)."""
        budget = Budget()
        for template in (self.subject, self.html, self.text):
            try:
                template._liquid.render_within({}, budget)
            except ResourceLimitError as exc:
                raise TemplateError(template.field, _reason(exc)) from exc
            except LiquidError:  # e.g. `divided_by: 0` on a missing value: the data decides
                pass
