"""Input checks shared by every backend of `lora_linear`.

Kept apart from the math so the torch path and the Triton launcher refuse exactly the same
inputs with exactly the same messages (shapes and dtypes named), before any kernel runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LoRAShapes:
    """Problem sizes of one call: M rows (leading dims flattened), K in, N out, r rank."""

    M: int
    K: int
    N: int
    r: int


def _check_tensor(name: str, t, allow_none: bool = False) -> None:
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"lora_linear: {name} has dtype {t.dtype}; expected one of "
            f"{', '.join(str(d) for d in FLOAT_DTYPES)}"
        )


def check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p) -> LoRAShapes:
    """Validate one call and return its sizes; raise TypeError/ValueError naming the culprit."""
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        _check_tensor(name, t)
    _check_tensor("bias", bias, allow_none=True)
    if x.dtype != weight.dtype:
        # The base GEMM runs in one dtype; silently casting the (large) frozen weight per call
        # would cost a full copy of it, so the caller must decide.
        raise TypeError(f"lora_linear: x dtype {x.dtype} differs from weight dtype {weight.dtype}")
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(f"lora_linear: scale must be a Python float, got {type(scale).__name__}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be a float in [0, 1), got {dropout_p!r}")

    if x.dim() < 1:
        raise ValueError(f"lora_linear: x must have at least 1 dim (..., K), got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must be (N, K), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(
            f"lora_linear: x shape {tuple(x.shape)} has last dim {x.shape[-1]}, "
            f"but weight shape {tuple(weight.shape)} expects K={K}"
        )
    if lora_a.dim() != 2 or lora_a.shape[1] != K:
        raise ValueError(
            f"lora_linear: lora_a must be (r, K={K}), got shape {tuple(lora_a.shape)}"
        )
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"lora_linear: rank must be >= 1, got lora_a shape {tuple(lora_a.shape)}")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (N, r):
        raise ValueError(
            f"lora_linear: lora_b must be (N={N}, r={r}) to match weight {tuple(weight.shape)} "
            f"and lora_a {tuple(lora_a.shape)}, got shape {tuple(lora_b.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"lora_linear: bias must be (N={N},), got shape {tuple(bias.shape)}")

    devices = {name: t.device for name, t in
               (("x", x), ("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b))
               if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k}={v}" for k, v in devices.items())
        raise ValueError(f"lora_linear: all tensors must be on one device, got {listing}")

    return LoRAShapes(M=math.prod(x.shape[:-1]), K=K, N=N, r=r)
