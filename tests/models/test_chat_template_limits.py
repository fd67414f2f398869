"""Chat templates are untrusted code: one that fails, recurses, loops for ever or floods its
output ends in a one-line ChatTemplateError naming the problem, quickly, and the limits leave real
templates alone. (Division by zero and recursion used to escape as ZeroDivisionError and
RecursionError tracebacks; nested huge loops used to hang.)"""
from __future__ import annotations

import sys
import time

import pytest

import lora_core.models.chat_template as chat_template
from lora_core.models.chat_template import ChatTemplateError, render_chat_template

MESSAGES = [{"role": "user", "content": "hi"}]
# SmolLM2-135M-Instruct's own template (tokenizer_config.json of the pinned model).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _error(template, **kwargs) -> str:
    with pytest.raises(ChatTemplateError) as info:
        render_chat_template(template, MESSAGES, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "a template error must be one line"
    return message


@pytest.mark.parametrize("expression", ["1 / 0", "1 // 0", "1 % 0", "(1.5 / 0)"])
def test_division_by_zero_is_a_template_error(expression):
    assert "ZeroDivisionError" in _error("{{ " + expression + " }}")


def test_other_python_errors_are_template_errors():
    assert "TypeError" in _error("{{ 1 + 'a' }}")
    assert "OverflowError" in _error("{{ 10.0 ** 400 }}")


def test_recursion_is_a_template_error():
    message = _error("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    assert "recurs" in message


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set xs = range(100000) | list %}{% for i in xs %}{% for j in xs %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
], ids=["nested-range", "nested-list", "exponential-macro"])
def test_endless_work_is_stopped_quickly(template, monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_STEPS", 200_000)
    start = time.monotonic()
    message = _error(template)
    assert time.monotonic() - start < 30
    assert "steps" in message


def test_wall_clock_limit(monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.2)
    start = time.monotonic()
    message = _error("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert time.monotonic() - start < 10 and "seconds" in message


def test_output_flood_is_stopped(monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_OUTPUT_CHARS", 100_000)
    message = _error("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}")
    assert "characters" in message


@pytest.mark.parametrize("expression", ["'x' * 10 ** 10", "[0] * 10 ** 10", "10 ** 100000", "2 ** 99999999"])
def test_single_huge_values_are_refused_before_they_are_built(expression):
    assert "too large" in _error("{{ " + expression + " }}")


def test_limits_leave_real_templates_alone_and_restore_the_tracer():
    def tracer(frame, event, arg):
        return None

    sys.settrace(tracer)
    try:
        long_chat = [{"role": r, "content": f"message {i} " * 50}
                     for i, r in zip(range(2000), ["user", "assistant"] * 1000)]
        text = render_chat_template(SMOLLM2, long_chat)
        after = sys.gettrace()
    finally:
        sys.settrace(None)
    assert after is tracer, "the caller's trace function (a debugger, coverage) must be restored"
    assert text.count("<|im_start|>") == 2000 + 2 and text.endswith("<|im_start|>assistant\n")
    assert render_chat_template("{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ [1] * 2 }}{{ 'a' + 'b' }}", []) == "ababab1024[1, 1]ab"
