"""Numbers and values as short text for tables and error messages: one formatter for the project.

`fmt_number` is what every Markdown table uses for a number (the demo's, the reproduce report's,
the overlap report's), each with its own precision; `short_repr` keeps an offending value from
turning a one-line error into a page.
"""
from __future__ import annotations

import math

__all__ = ["fmt_number", "short_repr"]


def fmt_number(x, spec: str = ".3f", *, small: str | None = None, large: str | None = None,
               nan: str = "nan") -> str:
    """`x` formatted with `spec`, or with `small` when 0 < |x| < 0.001 and `large` when
    |x| >= 100 (when given); "-" for None, `nan` for NaN, "inf" for infinity. A value that is not
    a number (a bool, a string) is shown as str(x).

    The tables: demo `fmt_number(x, large=".0f")`, reproduce report `fmt_number(x, small=".2e")`,
    overlap report `fmt_number(x, ".4g", nan="-")`.
    """
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and math.isnan(x):
        return nan
    if small is not None and 0 < abs(x) < 1e-3:
        spec = small
    elif large is not None and abs(x) >= 100:
        spec = large
    return format(x, spec)


def short_repr(value, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters with '...' (a long string or list in an error)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
