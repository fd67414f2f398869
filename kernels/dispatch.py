"""`lora_linear`: the one public entry point; validates, flattens, picks a backend.

Backend choice: an explicit `backend=` argument wins; otherwise the environment variable
LORA_CORE_BACKEND ("torch" | "triton") forces one; otherwise CUDA tensors go to Triton and
everything else to the torch path (Triton on CPU runs only under TRITON_INTERPRET=1, which
is a numpy emulator: correct but orders of magnitude slower than BLAS).
"""
from __future__ import annotations

import os

import torch

from .dropout import draw_seed
from .torch_path import lora_linear_torch
from .validation import check_inputs

BACKENDS = ("torch", "triton")
ENV_VAR = "LORA_CORE_BACKEND"


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """Return "torch" or "triton" for this call (see module docstring for the order)."""
    if backend is None:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={env!r} is not one of {BACKENDS}")
            backend = env
        else:
            # fp64 has no tensor-core tl.dot worth having; BLAS/cuBLAS is the better path.
            backend = "triton" if x.is_cuda and x.dtype != torch.float64 else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"lora_linear: backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, training=False,
                backend=None, *, seed=None):
    """Y = x @ weight.T + bias + scale * (dropout(x) @ lora_a.T) @ lora_b.T.

    x (..., K), weight (N, K), bias (N,)|None, lora_a (r, K), lora_b (N, r) -> (..., N).
    Dropout (probability `dropout_p`, only when `training`) applies to the LoRA branch only.
    `seed` (keyword-only, optional) fixes the dropout mask; by default one is drawn from torch's
    global RNG. Adapter/bias tensors of another float dtype are cast to x's dtype (differentiably).
    Differentiable in x, lora_a, lora_b, bias, and weight when it requires grad.
    """
    shapes = check_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p)
    chosen = resolve_backend(backend, x)
    dtype = x.dtype
    # Mixed precision setups keep adapters in fp32; casting these small tensors is cheap and
    # autograd routes their gradients back to the original dtype.
    lora_a = lora_a if lora_a.dtype == dtype else lora_a.to(dtype)
    lora_b = lora_b if lora_b.dtype == dtype else lora_b.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)

    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_seed()
    lead = x.shape[:-1]
    x2d = x.reshape(shapes.M, shapes.K)  # a view whenever the layout allows it

    if chosen == "triton":
        from .triton_autograd import lora_linear_triton  # deferred: importing triton is slow

        y2d = lora_linear_triton(x2d, weight, bias, lora_a, lora_b, float(scale), p, seed)
    else:
        y2d = lora_linear_torch(x2d, weight, bias, lora_a, lora_b, float(scale), p, seed)
    return y2d.reshape(*lead, shapes.N)
