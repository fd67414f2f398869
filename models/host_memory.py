"""How much host memory is free, and a refusal, with the figures, when a job needs more.

A 7B import or load that runs out of memory is killed by the kernel with no message after minutes
of work; checking `MemAvailable` first turns that into one line that says what is needed and what
is there. Linux only (/proc/meminfo); elsewhere the check is skipped rather than guessed.
"""
from __future__ import annotations

from pathlib import Path

GB = 1e9


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class InsufficientMemory(ValueError):
    """Not enough free memory for a job (a ValueError, so the CLI prints it as one line)."""


def check_memory(needed: int, what: str, available: int | None = None) -> None:
    """Raise InsufficientMemory (one line: the estimate and what is available) when `needed` bytes are
    not available; `available` overrides the reading (tests)."""
    have = available_bytes() if available is None else available
    if have is not None and have < needed:
        raise InsufficientMemory(f"{what} needs about {needed / GB:.1f} GB of memory (estimate), only "
                          f"{have / GB:.1f} GB is available; close other programs or use a machine "
                          f"with more memory")


__all__ = ["available_bytes", "check_memory", "InsufficientMemory", "GB"]
