"""Final-answer extraction and normalisation for GSM8K- and MATH-style exact match.

A model's text is reduced to one short answer string (`extract_answer`), then both that and the
gold answer are put into one canonical form (`normalize_answer`) before comparison
(`answers_match`). The rules are the ones math benchmarks agree on (GSM8K's `#### N`, MATH's
`\\boxed{...}`, "the answer is X", else the last number), kept deliberately simple: this is exact
match after normalisation, not a symbolic-equivalence checker. `answers_match` additionally treats
two answers as equal when both are plain rational numbers with the same value (`0.5` == `\\frac12`).
"""
from __future__ import annotations

import re
from fractions import Fraction

from lora_core.train.data.latex import braced_group, last_boxed

__all__ = ["strip_thinking", "unfinished_thought", "thinks_anywhere", "final_answer_text", "last_boxed",
           "extract_answer", "normalize_answer", "answers_match"]

_THINK_START, _THINK_END = "<think>", "</think>"
# A number as people write it in answers: sign, thousands commas, decimals, or a plain fraction a/b.
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*(.+)")
# "The final answer is $x$." (Minerva prompts) and "So the answer is x." (GSM8K chains).
_ANSWER_IS_RE = re.compile(r"answer is[: \t]*(.+?)(?:\.\s*(?:I hope|$)|\n|$)", re.IGNORECASE)
# "3 + 4 = 7": numbers and operators only, ending in "= number" (an equation with letters is an answer).
_ARITHMETIC_RE = re.compile(r"^[\d\s+\-*/×().,$]+=\s*\$?(-?[\d,]*\.?\d+)\.?$")


def strip_thinking(text: str) -> str:
    """The part of a reasoning model's output after its last `</think>` (all of it when absent)."""
    if not isinstance(text, str):
        raise TypeError(f"strip_thinking expects str, got {type(text).__name__}")
    idx = text.rfind(_THINK_END)
    return text if idx < 0 else text[idx + len(_THINK_END):]


def unfinished_thought(prompt: str, response: str) -> bool:
    """True when the model was still inside `<think>` when it stopped (budget or end of text).

    The thought opens either in the response or at the end of the prompt (reasoning models'
    chat templates often end the generation prompt with `<think>`), and is closed by `</think>`.
    """
    opened = _THINK_START in response or prompt.rstrip().endswith(_THINK_START)
    return opened and _THINK_END not in response


def thinks_anywhere(prompts, responses) -> bool:
    """Whether a model thinks at all here: a thought opened in a prompt or in a response."""
    return any(p.rstrip().endswith(_THINK_START) or _THINK_START in r or _THINK_END in r
               for p, r in zip(prompts, responses))


def final_answer_text(prompt: str, response: str) -> str | None:
    """The answer a reader would judge: the text after the thinking, or None when the model never
    left its thinking (that answer is missing, not wrong in some particular way)."""
    if unfinished_thought(prompt, response):
        return None
    return strip_thinking(response)


def extract_answer(text: str, strip_think: bool = True) -> str | None:
    """The final answer a solution states, or None when it states nothing recognisable.

    Priority: last `\\boxed{}`, then `#### X`, then "answer is X", then the last number.
    With `strip_think`, only the text after `</think>` is read (falls back to the whole text when
    that part has no answer: a model cut off mid-thought still gets credit for a boxed answer).
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects str, got {type(text).__name__}")
    candidates = [strip_thinking(text), text] if strip_think else [text]
    for part in candidates:
        boxed = last_boxed(part)
        if boxed is not None and boxed.strip():
            return boxed.strip()
        hashes = _HASHES_RE.findall(part)
        if hashes:
            return hashes[-1].strip()
        said = [s.strip() for s in _ANSWER_IS_RE.findall(part) if s.strip().strip("$.")]
        if said:
            answer = said[-1]
            inner = last_boxed(answer)
            if inner is not None:
                return inner.strip()
            # "the answer is 3 + 4 = 7": the value is what the arithmetic arrives at.
            arithmetic = _ARITHMETIC_RE.match(answer)
            return arithmetic.group(1) if arithmetic else answer
        numbers = _NUMBER_RE.findall(part)
        if numbers:
            return numbers[-1].rstrip(",")
    return None


def _frac_to_slash(s: str) -> str:
    r"""\frac{a}{b} -> (a)/(b) with balanced braces; \frac12 -> 1/2."""
    out = []
    i = 0
    while i < len(s):
        if s.startswith("\\frac", i):
            j = i + len("\\frac")
            num = braced_group(s, j)
            if num is not None:
                den = braced_group(s, num[1])
                if den is not None:
                    a, b = _frac_to_slash(num[0]), _frac_to_slash(den[0])
                    a = a if re.fullmatch(r"-?[\w.]+", a) else f"({a})"
                    b = b if re.fullmatch(r"[\w.]+", b) else f"({b})"
                    out.append(f"{a}/{b}")
                    i = den[1]
                    continue
            short = re.match(r"(\d)(\d)", s[j:])  # \frac12
            if short:
                out.append(f"{short.group(1)}/{short.group(2)}")
                i = j + 2
                continue
        out.append(s[i])
        i += 1
    return "".join(out)


def _canonical_number(s: str) -> str:
    """'18.0' -> '18', '0.50' -> '0.5', '-007' -> '-7'; other strings unchanged."""
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", s):
        value = Fraction(s)
        if value.denominator == 1:
            return str(value.numerator)
        return s.rstrip("0").rstrip(".") if "." in s else s
    return s


def normalize_answer(answer: str | None) -> str:
    """Canonical string form of a short answer (see module docstring for the rules)."""
    if answer is None:
        return ""
    if not isinstance(answer, str):
        raise TypeError(f"normalize_answer expects str or None, got {type(answer).__name__}")
    s = answer.strip()
    inner = last_boxed(s)
    if inner is not None:
        s = inner
    s = s.replace("\n", " ").strip().strip("$").strip()
    s = re.sub(r"\\(?:dfrac|tfrac)", r"\\frac", s)
    # \sqrt2 -> \sqrt{2}; "\frac 59" -> "\frac{5}{9}": one-character arguments get braces.
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac\s*(\w)\s*(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\w)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\w)", r"\\frac\1{\2}", s)
    # Spacing macros and sizing pairs carry no value.
    s = re.sub(r"\\[,;:! ]", "", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigl|bigr|displaystyle)\b", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)  # degrees
    s = s.replace("\\%", "").replace("%", "")
    # A trailing unit in text after a number: "5\text{ cm}" -> "5"; "\text{Evelyn}" -> "Evelyn".
    s = re.sub(r"^(-?[\d.,/]+)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?$", r"\1", s)
    # Units are written with a leading space inside the braces: "\\frac{270}7\\text{ degrees}".
    s = re.sub(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{\s+[A-Za-z ]+\}(?:\^\{?\d\}?)?$", "", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm|mathbf)\{([^{}]*)\}", r"\1", s)
    # A trailing plain-word unit: "18 dollars", "5 cm", "12 apples".
    s = re.sub(r"^(-?[\d.,]+)\s+[A-Za-z][A-Za-z ]*$", r"\1", s)
    # "x = 5" -> "5" when a single variable is being named.
    s = re.sub(r"^[A-Za-z]\s*=\s*", "", s)
    s = _frac_to_slash(s)
    s = s.replace(" ", "")
    # Thousands separators only (so tuples like "1,-2" or "(3,5)" survive).
    s = re.sub(r"(?<=\d),(?=\d{3}(?:\D|$))", "", s)
    s = s.rstrip(".")
    s = _canonical_number(s)
    return s.lower()


def _as_rational(s: str) -> Fraction | None:
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?|-?\.\d+)(?:/(\d+(?:\.\d+)?))?", s)
    if not m:
        return None
    value = Fraction(m.group(1))
    if m.group(2) is not None:
        den = Fraction(m.group(2))
        if den == 0:
            return None
        value /= den
    return value


def answers_match(predicted: str | None, gold: str) -> bool:
    """Exact match after normalisation, or equal value when both are plain rationals."""
    p, g = normalize_answer(predicted), normalize_answer(gold)
    if not p:
        return False
    if p == g:
        return True
    pv, gv = _as_rational(p), _as_rational(g)
    return pv is not None and gv is not None and pv == gv
