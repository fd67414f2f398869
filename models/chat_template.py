"""Render a checkpoint's Jinja chat template, sandboxed.

Chat templates arrive inside model files we did not write, so they are untrusted code: they run in
jinja2's ImmutableSandboxedEnvironment (no dunder access, no mutation of the objects passed in),
and templates reach only plain copies of the messages. The environment mirrors the one HF uses so
real templates render byte-identically: `trim_blocks` and `lstrip_blocks` on, the `loopcontrols`
extension, a `{% generation %}` block tag (rendered as its body), the globals `raise_exception`
and `strftime_now`, a `tojson` filter that does not HTML-escape, and special tokens (`bos_token`,
`eos_token`, ...) in the context.

A checkpoint without a template is an error unless the caller asks, explicitly, for the documented
ChatML fallback (`fallback="chatml"`); the fallback is never chosen silently.

The sandbox blocks escapes, not exhaustion, so rendering is also bounded (see `_Budget`): a step
budget on the template's own code (loop iterations, macro calls) and a wall-clock limit, an output
size limit, and `*`, `**` and `+` refuse results too large to build. Any exception a template
raises (division by zero, recursion, ...) becomes a one-line ChatTemplateError. Not covered: a
single built-in filter asked for a huge result (`center(10**9)`); jinja's sandbox documents the
same limit.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Documented fallback for checkpoints without a template, used only on request.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FALLBACKS = {"chatml": CHATML_TEMPLATE}

# Render limits. A real template takes tens of steps per message (SmolLM2's: 2000 messages in
# 12k steps and 0.17 s), so these only stop templates that would run for minutes or fill memory.
MAX_STEPS = 2_000_000  # line events in template code, plus STEPS_PER_INPUT_CHAR per input character
STEPS_PER_INPUT_CHAR = 50
MAX_SECONDS = 10.0
MAX_OUTPUT_CHARS = 4 * 1024 * 1024  # plus OUTPUT_PER_INPUT_CHAR per input character
OUTPUT_PER_INPUT_CHAR = 8
MAX_INT_BITS = 1 << 16  # `**` on integers: results beyond ~20k decimal digits are refused
# jinja compiles templates made from strings under this file name; only their frames are counted.
_TEMPLATE_FILE = "<template>"


class ChatTemplateError(ValueError):
    """The template could not be rendered (it raised, or the sandbox blocked it)."""


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot park dunders on it."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")


def _raise_exception(message):
    raise TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's built-in tojson HTML-escapes '<', '>' and '&', which would change prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _RenderLimit(Exception):
    """A template exceeded a render limit (the message says which)."""


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with `*`, `**` and `+` refusing results too large to build in one step."""

    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and _is_int(left) and _is_int(right) and right > 0:
            if max(abs(left).bit_length() - 1, 1) * right > MAX_INT_BITS and abs(left) > 1:
                raise _RenderLimit(f"a result too large: {left} ** {right} has more than {MAX_INT_BITS} bits")
        elif operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and _is_int(count) and len(seq) * count > MAX_OUTPUT_CHARS:
                    raise _RenderLimit(f"a result too large: a {type(seq).__name__} of {len(seq)} times {count}")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, type(left)):
            if len(left) + len(right) > MAX_OUTPUT_CHARS:
                raise _RenderLimit(f"a result too large: {len(left) + len(right)} items from '+'")
        return super().call_binop(context, operator, left, right)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Budget:
    """Counts the template's line events (every loop iteration and macro call makes some) with
    `sys.settrace`, raising _RenderLimit past the step budget or the wall-clock deadline.

    The global trace function returns a local tracer only for template frames, so jinja's and
    Python's own code run untraced, and the cost per render is negligible beside generation
    (figures in bench/RESULTS.md). settrace is per thread, so other threads are unaffected.
    """

    def __init__(self, steps: int, seconds: float):
        self.steps, self.left = steps, steps
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def on_call(self, frame, event, arg):
        return self.on_line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    def on_line(self, frame, event, arg):
        self.left -= 1
        if self.left <= 0:
            raise _RenderLimit(f"it ran more than {self.steps} steps (a loop or recursion too large)")
        if self.left % 1024 == 0 and time.monotonic() > self.deadline:
            raise _RenderLimit(f"it ran longer than {self.seconds:g} seconds")
        return self.on_line


def _render_bounded(compiled: jinja2.Template, context: dict, input_chars: int) -> str:
    budget = _Budget(MAX_STEPS + STEPS_PER_INPUT_CHAR * input_chars, MAX_SECONDS)
    limit = MAX_OUTPUT_CHARS + OUTPUT_PER_INPUT_CHAR * input_chars
    pieces: list[str] = []
    size = 0
    previous = sys.gettrace()  # a debugger's or coverage's tracer, given back afterwards
    sys.settrace(budget.on_call)
    try:
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > limit:
                raise _RenderLimit(f"its output passed {limit} characters")
            pieces.append(piece)
    finally:
        sys.settrace(previous)
    return "".join(pieces)


def _input_chars(value) -> int:
    """Characters of text in the template's input (the limits scale with it)."""
    if isinstance(value, dict):
        return sum(len(str(k)) + _input_chars(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_input_chars(v) for v in value)
    return len(value) if isinstance(value, str) else 8


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    try:
        return env.from_string(template)
    except TemplateError as error:
        raise ChatTemplateError(f"chat template does not compile: {type(error).__name__}: {error}") from error


def _plain(value):
    """Deep copy into plain dict/list/str/number data, refusing anything else."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"chat data must be dicts, lists, strings and numbers; got {type(value).__name__}")


def render_chat_template(
    template: str | None,
    messages: list[dict],
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    fallback: str | None = None,
    **kwargs,
) -> str:
    """Render `messages` ([{"role", "content"}, ...]) with `template`.

    special_tokens: e.g. {"bos_token": "<s>", "eos_token": "</s>"}; kwargs: extra template
    variables (tools, documents, enable_thinking, ...). fallback: None (no template -> error) or
    "chatml" to use CHATML_TEMPLATE when `template` is None.
    """
    if template is None:
        if fallback is None:
            raise ChatTemplateError(
                "this tokenizer has no chat template; pass a template, or fallback='chatml' to use ChatML explicitly"
            )
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown chat template fallback {fallback!r} (known: {', '.join(FALLBACKS)})")
        template = FALLBACKS[fallback]
    if not isinstance(template, str):
        raise TypeError(f"chat template must be a string, got {type(template).__name__}")
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
    compiled = _compile(template)
    context = dict(special_tokens or {})
    context.update(_plain(copy.deepcopy(kwargs)))
    context["messages"] = _plain(messages)
    context["add_generation_prompt"] = add_generation_prompt
    try:
        return _render_bounded(compiled, context, _input_chars(context))
    except _RenderLimit as error:
        raise ChatTemplateError(f"chat template stopped: {error}; it came with the model, so fix or "
                                f"replace it (tokenizer_config.json or chat_template.jinja)") from None
    except SecurityError as error:
        raise ChatTemplateError(f"chat template blocked by the sandbox: SecurityError: {_line(error)}") from None
    except RecursionError:
        raise ChatTemplateError("chat template recursed too deeply (a macro that calls itself without end)") from None
    except Exception as error:  # noqa: BLE001 - the template is foreign code: whatever it raises is its fault
        raise ChatTemplateError(f"chat template raised: {type(error).__name__}: {_line(error)}") from None


def _line(error: Exception) -> str:
    return " ".join(str(error).split())
