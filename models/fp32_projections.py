"""Run a bf16 model's projections in float32 on a CPU without native bf16 units.

On such a CPU a bf16 matmul is emulated and runs far slower than float32, while a 7B model does
not fit in 24 GB as float32 (30 GB). So the weights stay stored in bf16 and each projection is
computed in float32 from an upcast of its weight, a slice of rows at a time so that the float32
copy never exceeds `chunk_bytes` (lm_head of the 7B is 2.2 GB in float32). The input is upcast
too and the output is cast back to the input's dtype, so the rest of the model is untouched.

How it is applied: `fp32_projections()` is a TorchFunctionMode that reroutes `F.linear(x, W, b)`
with a bf16 W; every other call (and every non-bf16 weight) goes through unchanged, so the
decoder's code is the same on every CPU (the same mechanism as models.packed_linear).

Without bf16 units, float32 from the upcast is about twice as fast as emulated bf16 on a prefill's
many rows, while on one row (decode) the upcast costs more than the matmul; so only calls with at
least `min_rows` rows are rerouted. With bf16 units native bf16 wins everywhere and this mode is
not wanted (`cpu_has_native_bf16`). Figures: bench/RESULTS.md, "Measurements cited by the code".
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

CHUNK_BYTES = 64 * 1024 * 1024


def cpu_has_native_bf16() -> bool:
    """True when this x86 CPU advertises bf16 arithmetic (AVX512-BF16 or AMX-BF16); False when it
    does not or cannot be read (then float32 projections are the safe choice)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """F.linear computed in float32 from a bf16 weight upcast `chunk_bytes` at a time."""
    x32 = x.float()
    rows = max(1, chunk_bytes // (4 * weight.shape[1]))
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows].float()  # (rows, in) float32, freed after the matmul
        out[..., start:start + rows] = x32 @ block.t()
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


class fp32_projections(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch's modes
    """Within this block, every inference F.linear with a bf16 CPU weight and at least `min_rows`
    rows of input runs as `linear_fp32`; the rest, and anything under autograd, runs unchanged."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, min_rows: int = 16):
        super().__init__()
        self.chunk_bytes = chunk_bytes
        self.min_rows = min_rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // max(1, x.shape[-1])
            if (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and rows >= self.min_rows
                    and not torch.is_grad_enabled()):
                return linear_fp32(x, weight, bias, self.chunk_bytes)
        return func(*args, **kwargs)


__all__ = ["cpu_has_native_bf16", "fp32_projections", "linear_fp32"]
