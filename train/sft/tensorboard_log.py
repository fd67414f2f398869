"""Optional TensorBoard event files next to metrics.jsonl (`lora-core train --tensorboard`).

metrics.jsonl stays the record; the event files are for people whose dashboards already read
TensorBoard. `torch.utils.tensorboard` needs the `tensorboard` package, an optional extra
(`pip install 'lora-core[tensorboard]'`), so a missing package is reported before training starts.
"""
from __future__ import annotations

import math
from pathlib import Path

__all__ = ["TensorBoardSink", "open_sink", "summary_writer_class"]


def summary_writer_class():
    """torch's SummaryWriter, or a ValueError that says which package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: "
                         "pip install 'lora-core[tensorboard]'") from None
    return SummaryWriter


class TensorBoardSink:
    """Scalars of each metrics record under their own names, at the record's step."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.writer = summary_writer_class()(log_dir=str(self.log_dir))

    def write(self, record: dict) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        for name, value in _numbers(record):
            if name != "step":
                self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _NoSink:
    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_sink(run_dir: Path, enabled: bool):
    """A TensorBoard sink writing into run_dir/tensorboard, or one that does nothing."""
    return TensorBoardSink(Path(run_dir) / "tensorboard") if enabled else _NoSink()


def _numbers(record: dict, prefix: str = ""):
    """(name, float) of every finite number in a (nested) record; nested keys joined by '/'."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _numbers(value, name + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield name, float(value)
