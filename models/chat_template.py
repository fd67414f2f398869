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
"""
from __future__ import annotations

import copy
import json
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


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
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
        return compiled.render(**context)
    except SecurityError as error:
        raise ChatTemplateError(f"chat template blocked by the sandbox: SecurityError: {error}") from error
    except TemplateError as error:
        raise ChatTemplateError(f"chat template raised: {type(error).__name__}: {error}") from error
