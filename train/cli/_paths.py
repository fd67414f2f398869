"""Output folders are checked before the first model loads: a command that would fail to write
its results after minutes of work fails at once instead, naming the folder."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["check_output_dir"]


def check_output_dir(path, flag: str = "--out") -> Path:
    """Refuse `path` unless it is (or can become) a folder we can write: it must not be a file,
    and its nearest existing ancestor must be a writable folder. Nothing is created."""
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{flag} {out} exists and is not a directory; choose another folder")
        existing = out
    else:
        existing = out.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ValueError(f"{flag} {out} is not writable ({existing} is a file); choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out} is not writable ({existing} is read-only); choose another folder")
    return out
