"""Dropout masks for the LoRA branch, reproducible from a seed.

The backward must see the mask the forward used. Saving a (M, K) mask costs activation
memory on every adapted layer, so both backends keep only an integer seed and regenerate:
the torch path with a seeded `torch.Generator`, the Triton path with Philox (`tl.rand`) inside
its kernels. The two generators differ, so a seed names a mask per backend, not across them.
"""
from __future__ import annotations

import torch

_SEED_BOUND = 2**31 - 1  # Philox in Triton takes a 32-bit seed; keep one range for both paths.


def draw_seed(device: torch.device | None = None) -> int:
    """Draw a fresh seed from torch's global RNG, so `torch.manual_seed` makes runs repeatable."""
    return int(torch.randint(0, _SEED_BOUND, (1,)).item())


def torch_keep_mask(seed: int, shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Boolean keep-mask (True = kept, probability 1 - p) for the torch path."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


def torch_dropped(x2d: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """drop(x) = x * mask / (1 - p), a new tensor (x itself is saved for the backward)."""
    mask = torch_keep_mask(seed, tuple(x2d.shape), p, x2d.device)
    return x2d.mul(mask).mul_(1.0 / (1.0 - p))
