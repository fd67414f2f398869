"""The config a resumed run continues with: the one stored in its run directory, plus the flags
given now where that is safe, and an error naming every flag that would change what is learned.

Before this, flags given with --resume (--lr, --max-steps) were dropped without a word: a user who
asked for more steps got none, and one who changed the learning rate believed they had.

What may change on resume follows from each field's role (train.sft.config, derived once there):
- "invocation" keys (`out`, progress display) are this invocation's: the run is wherever --out
  names it now (a moved or copied run resumes where it is);
- "bookkeeping" keys change what is written, not what is learned (checkpoint and evaluation
  cadence, TensorBoard): applied when given;
- extendable keys (`max_steps`), upward only: the run is extended and the learning-rate schedule
  is stretched to the new end from the current step on (a pure function of the step,
  train.sft.schedule).
Everything else is the run's identity: a different value is refused by name.
"""
from __future__ import annotations

from pathlib import Path

from lora_core.common.files import read_json
from lora_core.train.sft.config import BOOKKEEPING_KEYS, EXTENDABLE_KEYS, INVOCATION_KEYS, TrainConfig

# What the trainer writes into config.json beside the config itself.
_RECORDS = ("data_info", "total_steps", "trainable_params")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resumed_config(config: TrainConfig, given: set[str] | None = None, log=print) -> TrainConfig:
    """The config to continue the run in `config.out` with.

    `given`: the fields the user set for this invocation (the CLI passes the flags typed on the
    command line); None means every field of `config` (a library caller passes a whole config).
    """
    out = config.checkpoints.out
    saved_path = Path(out) / "config.json"
    if not saved_path.is_file():
        raise FileNotFoundError(f"--resume: {saved_path} not found (no run to continue in --out {out})")
    on_disk = read_json(saved_path)
    if not isinstance(on_disk, dict):
        raise ValueError(f"{saved_path}: expected a JSON object, got {type(on_disk).__name__}")
    stored_total = on_disk.get("total_steps")
    try:
        stored = TrainConfig.from_dict({k: v for k, v in on_disk.items() if k not in _RECORDS})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{saved_path}: not a run config this version can resume ({error})") from None
    now, before = config.to_dict(), stored.to_dict()
    wanted = set(now) if given is None else set(given)
    changes, conflicts = {}, []
    for name in now:
        if name in INVOCATION_KEYS or name not in wanted:
            continue
        new, old = now[name], before[name]
        if new == old:
            continue
        if name in BOOKKEEPING_KEYS:
            changes[name] = new
        elif name in EXTENDABLE_KEYS and new is not None and new >= (stored_total or old or 0):
            changes[name] = new
        else:
            conflicts.append(f"{_flag(name)} {new!r} (the run has {old!r})")
    if conflicts:
        raise ValueError(f"--resume continues the run in {out} with its stored config, and these "
                         f"flags differ from it: {'; '.join(conflicts)}. Drop them to resume, or start a "
                         "new run with another --out" + _max_steps_hint(stored_total, conflicts))
    for name, value in changes.items():
        note = ""
        if name in EXTENDABLE_KEYS:
            note = (f" (the run had {stored_total} steps; the {stored.optim.scheduler} schedule now ends at "
                    f"step {value})")
        log(f"--resume: applying {_flag(name)} {value!r} (was {before[name]!r}){note}")
    return stored.replace(**{name: now[name] for name in INVOCATION_KEYS}, **changes)


def _max_steps_hint(stored_total, conflicts: list[str]) -> str:
    if stored_total is not None and any(c.startswith("--max-steps") for c in conflicts):
        return f" (--max-steps can only extend a run: {stored_total} or more)"
    return ""
