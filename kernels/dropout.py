"""Dropout masks for the LoRA branch, reproducible from a seed.

The backward must see the mask the forward used.

Torch path (CPU): the mask is drawn once per forward as the sorted flat positions of the
*dropped* entries, not as a dense (M, K) tensor. Dropped positions of iid Bernoulli(p) trials
are a renewal process whose gaps are Geometric(p), so `p * M * K` uniform draws (plus a few
sigmas of slack) give exactly the Bernoulli mask, instead of M * K draws: at the paper's p = 0.05
that is 20x fewer random numbers. The dense `torch.rand(M, K)` it replaces, drawn three times
per layer per step, was the largest single cost of a bf16 training step in the profile (figures
in bench/RESULTS.md; the profile in bench/results/profile_train_before.md). The positions are
kept for the backward (4 bytes per dropped entry: 0.2 bytes per element at p = 0.05, against
1 byte for a bool mask), and drop(X) is rebuilt from them by one copy of X plus a scatter of zeros.

Triton path: Philox (`tl.rand`) regenerated inside its kernels, nothing stored. The two
generators differ, so a seed names a mask per backend, not across them.
"""
from __future__ import annotations

import math

import torch

_SEED_BOUND = 2**31 - 1  # Philox in Triton takes a 32-bit seed; keep one range for both paths.
_INT32_LIMIT = 2**31 - 1


def draw_seed(device: torch.device | None = None) -> int:
    """Draw a fresh seed from torch's global RNG, so `torch.manual_seed` makes runs repeatable."""
    return int(torch.randint(0, _SEED_BOUND, (1,)).item())


def dropped_positions(seed: int, numel: int, p: float, device) -> torch.Tensor:
    """Sorted flat indices in [0, numel) of the entries a Bernoulli(p) dropout drops.

    Gaps between consecutive drops are iid Geometric(p) on {1, 2, ...}, drawn by inversion:
    floor(log(1 - u) / log(1 - p)) + 1 with u ~ U[0, 1) in float64. The cumulative sum is exact
    in float64 up to 2**53 elements. int32 when numel allows it (half the memory), else int64.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    log_q = math.log1p(-p)
    mean = numel * p
    chunk = int(mean + 6.0 * math.sqrt(mean * (1.0 - p))) + 16  # one draw almost always suffices
    parts, last = [], -1.0  # `last`: position of the previous drop
    while True:
        u = torch.rand(chunk, generator=gen, dtype=torch.float64, device=device)
        gaps = torch.log1p(u.neg_()).div_(log_q).floor_().add_(1.0)  # (chunk,) Geometric(p)
        pos = gaps.cumsum_(0).add_(last)
        parts.append(pos)
        last = float(pos[-1])
        if last >= numel:
            break
    pos = torch.cat(parts) if len(parts) > 1 else parts[0]
    count = int(torch.searchsorted(pos, float(numel)))  # positions are strictly increasing
    index_dtype = torch.int32 if numel <= _INT32_LIMIT else torch.int64
    return pos[:count].to(index_dtype)


def dropped_copy(x2d: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """mask * x as a new contiguous tensor (zeros at `positions`); the 1/(1-p) is the caller's."""
    out = x2d.clone(memory_format=torch.contiguous_format)  # (M, K)
    out.view(-1).index_fill_(0, positions.long(), 0)
    return out


def torch_keep_mask(seed: int, shape: tuple[int, ...], p: float, device) -> torch.Tensor:
    """Boolean keep-mask (True = kept, probability 1 - p) exactly as the torch path draws it for
    a flattened (M, K) input of this shape; materialised for tests and references only."""
    numel = math.prod(shape)
    keep = torch.ones(numel, dtype=torch.bool, device=device)
    if p > 0.0 and numel:
        keep[dropped_positions(seed, numel, p, device).long()] = False
    return keep.view(shape)
