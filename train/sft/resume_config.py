"""The config a resumed run continues with: the one stored in its run directory, plus the flags
given now where that is safe, and an error naming every flag that would change what is learned.

Before this, flags given with --resume (--lr, --max-steps) were dropped without a word: a user who
asked for more steps got none, and one who changed the learning rate believed they had.

What may change on resume:
- `out`: the run is wherever --out names it now (a moved or copied run resumes where it is);
- bookkeeping that changes what is written, not what is learned (checkpoint and evaluation
  cadence, progress display);
- `max_steps`, upward only: the run is extended and the learning-rate schedule is stretched to
  the new end from the current step on (a pure function of the step, train.sft.schedule).
Everything else is the run's identity: a different value is refused by name.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from lora_core.common.files import read_json
from lora_core.train.sft.config import TrainConfig

# Never compared: where the run is now, and what the trainer fills in itself.
_NOT_COMPARED = ("out", "progress", "data_info")
# Changing these changes what is written or shown, not the adapter that is trained.
_BOOKKEEPING = ("save_every", "keep_checkpoints", "eval_every", "eval_suite", "log_every", "tensorboard")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resumed_config(config: TrainConfig, given: set[str] | None = None, log=print) -> TrainConfig:
    """The config to continue the run in `config.out` with.

    `given`: the fields the user set for this invocation (the CLI passes the flags typed on the
    command line); None means every field of `config` (a library caller passes a whole config).
    """
    saved_path = Path(config.out) / "config.json"
    if not saved_path.is_file():
        raise FileNotFoundError(f"--resume: {saved_path} not found (no run to continue in --out {config.out})")
    on_disk = read_json(saved_path)
    if not isinstance(on_disk, dict):
        raise ValueError(f"{saved_path}: expected a JSON object, got {type(on_disk).__name__}")
    stored_total = on_disk.pop("total_steps", None)
    on_disk.pop("trainable_params", None)
    try:
        stored = TrainConfig.from_dict(on_disk)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{saved_path}: not a run config this version can resume ({error})") from None
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    wanted = set(names) if given is None else set(given)
    changes, conflicts = {}, []
    for name in names:
        if name in _NOT_COMPARED or name not in wanted:
            continue
        new, old = getattr(config, name), getattr(stored, name)
        if new == old:
            continue
        if name in _BOOKKEEPING:
            changes[name] = new
        elif name == "max_steps" and new is not None and new >= (stored_total or old or 0):
            changes[name] = new
        else:
            conflicts.append(f"{_flag(name)} {new!r} (the run has {old!r})")
    if conflicts:
        raise ValueError(f"--resume continues the run in {config.out} with its stored config, and these "
                         f"flags differ from it: {'; '.join(conflicts)}. Drop them to resume, or start a "
                         "new run with another --out" + _max_steps_hint(stored_total, conflicts))
    for name, value in changes.items():
        note = ""
        if name == "max_steps":
            note = f" (the run had {stored_total} steps; the {stored.scheduler} schedule now ends at step {value})"
        log(f"--resume: applying {_flag(name)} {value!r} (was {getattr(stored, name)!r}){note}")
    keep = {"out": config.out, "progress": config.progress}
    return dataclasses.replace(stored, **keep, **changes)


def _max_steps_hint(stored_total, conflicts: list[str]) -> str:
    if stored_total is not None and any(c.startswith("--max-steps") for c in conflicts):
        return f" (--max-steps can only extend a run: {stored_total} or more)"
    return ""
