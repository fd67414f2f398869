"""matplotlib for files: the Agg backend (no display needed), and a figure saved as PNG bytes or
written atomically. Every PNG the project writes (compare, demo, reproduce, overlap) goes through
here. matplotlib is imported only when a plot is made.
"""
from __future__ import annotations

import io
from pathlib import Path

from lora_core.common.files import atomic_write_bytes

__all__ = ["pyplot", "png_bytes", "write_png"]


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, **savefig) -> bytes:
    """The figure laid out (tight_layout), saved as PNG with `savefig`'s options, then closed."""
    plt = pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig)
    plt.close(fig)
    return buffer.getvalue()


def write_png(fig, path: str | Path, **savefig) -> Path:
    """`png_bytes(fig)` written to `path` atomically; returns the path."""
    return atomic_write_bytes(path, png_bytes(fig, **savefig))
