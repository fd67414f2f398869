"""`lora-core reproduce --tensorboard`: the grid as TensorBoard runs, next to report.json.

Two kinds of event files, both optional (the report is the record):
- each training run's curves (loss, lr, regulariser, ...), written while it trains by train.sft into
  runs/<arm>/seed-<s>/train/tensorboard, as `lora-core train --tensorboard` does;
- one HParams entry per finished run in <out>/tensorboard/<arm>/seed-<s>: the arm's settings
  (kind, lr, rank, targets, layers, regulariser, merge) against its evaluation metrics and overlap
  energies, so TensorBoard's HPARAMS tab lists the arms side by side.
`tensorboard --logdir <out>` shows both. The HParams entries are derived from the run directories,
so they are rewritten whole at every report (a rerun adds no duplicates).
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from lora_core.train.repro.preset import Arm
from lora_core.train.sft.tensorboard_log import summary_writer_class

__all__ = ["write_grid_events"]

# The arm settings that tell arms apart, as text: HParams wants one type per key across runs, and
# a setting an arm does not have (rank of a full run) shows as "-".
_SETTINGS = ("lr", "rank", "targets", "layers", "ortho_beta", "ortho_k")


def arm_hparams(arm: Arm, seed: int, shared_train: dict) -> dict:
    """Arm, kind, seed and the settings in _SETTINGS (the preset's shared value where the arm has none)."""
    params = {"arm": arm.name, "kind": arm.kind, "seed": str(seed)}
    if arm.kind in ("lora", "full"):
        train = {**shared_train, **arm.train}
        for key in _SETTINGS:
            value = train.get(key)
            params[key] = "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    else:
        params.update({key: "-" for key in _SETTINGS})
    params["merge"] = f"{arm.source} {arm.projection} k={arm.k}" if arm.kind == "merge" else "-"
    return params


def run_metrics(row: dict) -> dict:
    """Every finite evaluation value, overlap summary number and final training loss of one run."""
    metrics = {}
    for name, record in (row.get("metrics") or {}).items():
        value = record.get("value") if isinstance(record, dict) else None
        if _finite(value):
            metrics[f"eval/{name}"] = float(value)
    for k, summary in (row.get("overlap") or {}).items():
        for name, value in summary.items():
            if _finite(value):
                metrics[f"overlap/k{k}/{name}"] = float(value)
    loss = (row.get("train") or {}).get("final_loss")
    if _finite(loss):
        metrics["train/final_loss"] = float(loss)
    return metrics


def write_grid_events(out: Path, run_rows: list[dict], arms: dict[str, Arm], shared_train: dict) -> Path:
    """Rewrite <out>/tensorboard from the finished runs' rows (train.repro.report.collect)."""
    SummaryWriter = summary_writer_class()
    root = Path(out) / "tensorboard"
    shutil.rmtree(root, ignore_errors=True)
    # add_hparams writes each run into <root>/<run_name> with a writer of its own.
    with SummaryWriter(log_dir=str(root)) as writer:
        for row in run_rows:
            arm = arms[row["arm"]]
            writer.add_hparams(arm_hparams(arm, row["seed"], shared_train), run_metrics(row),
                               run_name=f"{arm.name}/seed-{row['seed']}")
    return root


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
