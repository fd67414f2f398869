"""LaTeX answers as MATH solutions and models write them: the last `\\boxed{...}`.

Here, below both users: the data parsers read MATH's gold answers with it (train.data.parsers) and
the evaluation reads models' answers with it (train.eval.answers).
"""
from __future__ import annotations

import re


def braced_group(text: str, start: int) -> tuple[str, int] | None:
    """Content of the balanced `{...}` group opening at text[start] and the index after it."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (braces balanced), or None.

    `\\boxed 5` (no braces, as some models write it) yields the next token.
    """
    best = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        pos = match.end()
        group = braced_group(text, pos)
        if group is not None:
            best = group[0]
        else:
            token = re.match(r"[^\s$.,]+", text[pos:])
            if token:
                best = token.group(0)
    return best
