"""Progress for long loops, on a terminal and in a log file alike.

On a terminal: a tqdm bar (`disable=None` is tqdm's own "only on a TTY" rule). Off a terminal
(`lora-core demo > log`, CI): the bar's carriage returns would only add noise, so a plain line
goes to stderr every `every_s` seconds and at the end instead, and a user who wrote `> log` still
sees the work move. `enabled=False` silences both; `enabled=True` forces the bar.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable

from tqdm.auto import tqdm

__all__ = ["progress", "LOG_EVERY_S"]

LOG_EVERY_S = 30.0


class _LineProgress(tqdm):
    """tqdm with the bar off and a plain status line every `every_s` seconds instead."""

    def __init__(self, *args, every_s: float = LOG_EVERY_S, **kwargs):
        self._every_s = every_s
        self._last_line = time.monotonic()
        self._line_desc = kwargs.get("desc") or "progress"
        super().__init__(*args, **{**kwargs, "disable": True})
        # A disabled tqdm neither counts nor yields through __iter__ bookkeeping; count here.
        self.n = kwargs.get("initial", 0) or 0
        self.total = kwargs.get("total")
        self._postfix_text = ""
        self._printed_n = None

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self._last_line >= self._every_s:
            self._last_line = now
            self._print_line()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        items = dict(ordered_dict or {}, **kwargs)
        self._postfix_text = ", ".join(f"{k}={v}" for k, v in items.items())

    def _print_line(self) -> None:
        self._printed_n = self.n
        total = f"/{self.total}" if self.total else ""
        extra = f" ({self._postfix_text})" if self._postfix_text else ""
        print(f"{self._line_desc}: {self.n}{total}{extra}", file=sys.stderr, flush=True)

    def close(self):
        if self.n and self.n != self._printed_n:
            self._print_line()
        super().close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             enabled: bool | None = None, every_s: float = LOG_EVERY_S, **kwargs) -> tqdm:
    """A bar on a terminal, a line every `every_s` seconds elsewhere; enabled=False: silent."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if enabled is False:
        return tqdm(iterable, total=total, desc=desc, disable=True, **kwargs)
    if enabled or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, disable=False, dynamic_ncols=True,
                    leave=False, **kwargs)
    return _LineProgress(iterable, total=total, desc=desc, every_s=every_s, **kwargs)
