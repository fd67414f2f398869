"""Small helpers shared by the Triton launchers: interpreter detection, block sizes, checks."""
from __future__ import annotations

import os

import torch
import triton

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs its numpy interpreter (TRITON_INTERPRET=1, read at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_device(x: torch.Tensor) -> None:
    """Refuse tensors the Triton path cannot run on, naming device and dtype."""
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"lora_linear(backend='triton'): dtype {x.dtype} unsupported; use one of "
                        f"{', '.join(str(d) for d in TRITON_DTYPES)} or backend='torch'")
    if not x.is_cuda and not interpreting():
        raise ValueError(f"lora_linear(backend='triton'): tensors on {x.device} need a CUDA device "
                         "or TRITON_INTERPRET=1 set before triton is imported; use backend='torch'")


def upcast_flag(dtype: torch.dtype) -> bool:
    """The interpreter keeps bf16 as raw uint16 bits and tl.dot multiplies the bit patterns
    (results ~1e10), so bf16 tiles are converted to fp32 before every dot when interpreting."""
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE dots to match torch's default (no TF32); for half inputs only the
    small fp32 adapter dots see this and TF32 there is as precise as the half inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_r(r: int) -> int:
    """Rank padded to a power of two >= 16: tl.dot needs every dimension >= 16."""
    return max(16, triton.next_power_of_2(r))


def gemm_blocks(br: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). Under the interpreter big blocks mean fewer
    numpy program instances (the cost there); on GPU a standard 128x128x32 tile, halved in M
    when a wide rank tile (fp32 S, up to 256 columns) would crowd registers. Untuned: no GPU
    was available to this project when these were chosen."""
    if interpreting():
        return 64, 64, 64, 4
    if br > 64:
        return 64, 128, 32, 8
    return 128, 128, 32, 8
