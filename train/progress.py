"""A tqdm progress bar that stays quiet when stderr is not a terminal.

Every long loop in the project shows progress; in CI logs and in pipes the bar's carriage returns
only add noise, so the bar is disabled there unless the caller forces it.
"""
from __future__ import annotations

import sys
from typing import Iterable

from tqdm.auto import tqdm


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             enabled: bool | None = None, **kwargs) -> tqdm:
    """Return a tqdm bar; `enabled=None` shows it only when stderr is a TTY."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True,
                leave=False, **kwargs)
