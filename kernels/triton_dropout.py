"""The Triton path's dropout keep-mask, materialised: for tests and debugging only.

The kernels never store a mask; they regenerate Philox(seed, m * K + k) >= p in place. This
writes the same bits to a tensor so a reference can apply exactly the mask the kernels used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import check_triton_device


@triton.jit
def _keep_mask_kernel(OUT, M, K, seed, p, BLOCK: tl.constexpr):
    """OUT[m, k] = Philox(seed, m * K + k) >= p, OUT contiguous (M, K) int8."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, offs) >= p
    tl.store(OUT + offs, keep.to(tl.int8), mask=offs < M * K)


def triton_keep_mask(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """Bool (M, K) keep-mask exactly as the Triton kernels draw it for this seed and p."""
    out = torch.zeros((M, K), dtype=torch.int8, device=device)
    check_triton_device(out.float())
    if M * K:
        block = 1024
        _keep_mask_kernel[(triton.cdiv(M * K, block),)](out, M, K, int(seed), float(p), BLOCK=block)
    return out.bool()
