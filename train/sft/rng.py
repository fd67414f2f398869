"""Every random generator a run draws from: seeded once from --seed, saved in each checkpoint.

A run draws from torch's global RNG (LoRA initialisation, and the dropout masks: the kernels take
their mask seed from it, kernels.dropout.draw_seed), and possibly from python's `random` and
numpy's global RNG (any code a user plugs in, e.g. an evaluation callback). Seeding only torch left
the other two to the clock, so all three are seeded together, and all are saved and restored
together, so a resumed run draws what the uninterrupted one drew.

Checkpoints are read back with torch.load(weights_only=True), which refuses numpy arrays: the
numpy state is stored as a tensor and plain numbers.
"""
from __future__ import annotations

import random

import torch

try:  # numpy is installed with the project, but nothing in training needs it
    import numpy
except ImportError:  # pragma: no cover - exercised only where numpy is absent
    numpy = None


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every GPU), python's `random` and numpy's global RNG from one number."""
    torch.manual_seed(seed)
    random.seed(seed)
    if numpy is not None:
        # numpy takes seeds in [0, 2**32); a negative --seed is still a valid, distinct seed.
        numpy.random.seed(seed % 2**32)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if numpy is not None:
        kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    # Checkpoints written before numpy/CUDA states were saved lack them: those generators then
    # keep the seed this process gave them.
    saved = state.get("numpy")
    if saved is not None and numpy is not None:
        keys = saved["keys"].numpy().astype("uint32")
        numpy.random.set_state((saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
