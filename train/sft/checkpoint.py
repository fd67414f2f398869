"""Atomic training checkpoints and resume.

A checkpoint is a directory `checkpoints/step-NNNNNN/` with
  trainable.safetensors   the trainable parameters by qualified name (LoRA A/B, or all weights)
  state.pt                optimiser state, schedule step, RNG states, data position (our own file,
                          read back with torch.load(weights_only=True))
  meta.json               step, file checksums
It is built in a hidden temp sibling and renamed into place, then `checkpoints/LATEST` is replaced
(temp file + os.replace). A process killed at any point leaves either the previous LATEST pointing
to a complete checkpoint, or the new one complete: never a half-written checkpoint that resume
would pick. The checksums catch files damaged afterwards.

A kill mid-write does leave the temp sibling behind (a hidden `.step-NNNNNN.*.tmp` folder, or a
`.LATEST.*.tmp` file): `clean_interrupted_writes` removes them when the run next starts. A write
that fails (a full disk) is raised as CheckpointWriteError, an OSError that names the checkpoint:
torch.save reports a full disk as a RuntimeError from its zip writer, and safetensors as its own
error type, neither of which says which file or what to do.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_core.common.fetch import sha256_of
from lora_core.common.files import atomic_directory, atomic_write_text

_STEP_DIR = re.compile(r"^step-(\d+)$")
# The temp names lora_core.common.files gives: ".<name>.<random>.tmp" while a file or folder is
# written, ".<name>.<random>.old" for the moment a folder being replaced is moved aside.
_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.(?P<kind>tmp|old)$")


class CheckpointWriteError(OSError):
    """A checkpoint (or the final output) could not be written: full disk, vanished folder. The
    newest complete checkpoint is kept."""


@dataclass
class Checkpoint:
    step: int
    path: Path
    trainable: dict[str, torch.Tensor]
    state: dict


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, detached and contiguous (tied weights appear once)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().contiguous()
    return out


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict,
                    keep: int = 2, trainable: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` atomically and point LATEST at it; keep the newest `keep`.

    `trainable`: the tensors to store, when the model's own are shards (train.sft.distributed
    gathers them); default: the model's trainable parameters."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{step:06d}"
    # The same step may be saved again (end of run on a save boundary): it is replaced whole.
    with naming_write_failures(final):
        with atomic_directory(final) as tmp:
            tensors = trainable_state(model) if trainable is None else trainable
            save_file(tensors, str(tmp / "trainable.safetensors"))
            torch.save(state, tmp / "state.pt")
            meta = {"step": step, "sha256": {name: sha256_of(tmp / name)
                                             for name in ("trainable.safetensors", "state.pt")}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        atomic_write_text(ckpt_root / "LATEST", final.name + "\n")
    steps = sorted(_list_steps(ckpt_root))
    for old in steps[:-keep] if keep > 0 else []:
        if old != step:
            shutil.rmtree(ckpt_root / f"step-{old:06d}", ignore_errors=True)
    return final


@contextlib.contextmanager
def naming_write_failures(path: Path, what: str = "checkpoint"):
    """Re-raise a failed write as CheckpointWriteError naming `path` (see the module docstring)."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except (OSError, RuntimeError, SafetensorError) as error:
        code = getattr(error, "errno", None)
        why = os.strerror(code) if code else f"{type(error).__name__}: {str(error).strip().splitlines()[-1]}"
        hint = "free some space" if code == errno.ENOSPC else "check the disk and the folder"
        failure = CheckpointWriteError(f"could not write {what} {path} ({why}); {hint}, then continue "
                                       "with --resume: the newest complete checkpoint is kept")
        failure.errno = code  # a one-argument OSError keeps its message as str(); errno set apart
        raise failure from error


def clean_interrupted_writes(run_dir: str | Path) -> list[Path]:
    """Remove what a killed write left in a run directory and its checkpoints/; returns the removed.

    A ".old" folder is the previous version of a folder that was being replaced; if the kill came
    between the two renames, the folder itself is missing and the ".old" is put back instead.
    """
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            match = _TEMP.match(path.name)
            if match is None:
                continue
            target = folder / match.group("name")
            if match.group("kind") == "old" and not target.exists():
                os.replace(path, target)
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def _list_steps(ckpt_root: Path) -> list[int]:
    return [int(m.group(1)) for p in ckpt_root.iterdir() if p.is_dir()
            and (m := _STEP_DIR.match(p.name))]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory LATEST names (or the highest complete step directory when LATEST is missing)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return None
    pointer = ckpt_root / "LATEST"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _STEP_DIR.match(name) or not (ckpt_root / name).is_dir():
            raise ValueError(f"corrupt checkpoint pointer {pointer}: names {name!r}, not a checkpoint")
        return ckpt_root / name
    steps = [s for s in _list_steps(ckpt_root) if (ckpt_root / f"step-{s:06d}" / "meta.json").is_file()]
    return ckpt_root / f"step-{max(steps):06d}" if steps else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint directory; any damage is a ValueError naming the file."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"corrupt checkpoint {path}: meta.json missing")
    try:
        meta = json.loads(meta_path.read_text())
        step, sums = int(meta["step"]), dict(meta["sha256"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"corrupt checkpoint {meta_path}: {error}") from None
    for name, expected in sums.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"corrupt checkpoint {path}: {name} missing")
        if sha256_of(file) != expected:
            raise ValueError(f"corrupt checkpoint {file}: sha256 does not match meta.json")
    try:
        trainable = load_file(str(path / "trainable.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors/pickle raise many types for damaged bytes
        raise ValueError(f"corrupt checkpoint {path}: {type(error).__name__}: {error}") from None
    return Checkpoint(step, path, trainable, state)


def restore_trainable(model: torch.nn.Module, trainable: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed (whole) trainable tensors into the model, its parameters sharded by FSDP2
    or not; names and shapes must match exactly either way (a DTensor reports its whole shape)."""
    params = dict(model.named_parameters())
    current = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(current - set(trainable)), sorted(set(trainable) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (was it written with other --targets/--rank?)")
    with torch.no_grad():
        for name, tensor in trainable.items():
            p = params[name]
            if p.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name}: shape {tuple(tensor.shape)} != model {tuple(p.shape)}")
            if hasattr(p, "device_mesh"):  # this rank keeps its own shard of the whole tensor
                # Imported here: a torch built without torch.distributed still trains in one process.
                from torch.distributed.tensor import distribute_tensor

                tensor = distribute_tensor(tensor.to(p.dtype), p.device_mesh, p.placements)
            p.copy_(tensor)
