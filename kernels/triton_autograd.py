"""autograd.Function tying the Triton forward and backward kernels together.

Layers: @triton.jit kernels (triton_forward.py, triton_backward.py) -> their launchers ->
this Function -> `kernels.lora_linear` (dispatch.py). The frozen base weight normally gets no
gradient; if it does require one, dW = dY^T X is computed with torch.mm rather than dropped.
"""
from __future__ import annotations

import torch

from .lora_context import load_lora_context, save_lora_context
from .triton_backward import grad_a, grad_b, grad_s, grad_x
from .triton_common import check_triton_device
from .triton_forward import fused_forward


class LoRALinearTriton(torch.autograd.Function):
    """Fused LoRA linear on 2-D inputs; the math is in the kernels' docstrings."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_a, lora_b, scale: float, dropout_p: float, seed):
        y, s_act = fused_forward(x2d, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
        save_lora_context(ctx, x2d, weight, bias, lora_a, lora_b, s_act, scale, dropout_p, seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, s_act, scale, p, seed, has_bias = load_lora_context(ctx)
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dx = dw = dbias = da = db = None
        ds = grad_s(dy, lora_b, scale) if (need_x or need_a) else None  # (M, r) fp32
        if need_b:
            db = grad_b(dy, s_act, scale, lora_b.dtype)
        if need_a:
            da = grad_a(ds, x2d, p, seed, lora_a.dtype)
        if need_x:
            dx = grad_x(dy, weight, ds, lora_a, p, seed)
        if need_w:
            dw = torch.mm(dy.t(), x2d)  # (N, K): torch path, the kernels assume W frozen
        if need_bias and has_bias:
            dbias = dy.sum(0)
        return dx, dw, dbias, da, db, None, None, None


def lora_linear_triton(x2d, weight, bias, lora_a, lora_b, scale: float, dropout_p: float = 0.0,
                       seed: int | None = None) -> torch.Tensor:
    """Triton-path LoRA linear on validated 2-D inputs; returns (M, N)."""
    check_triton_device(x2d)
    return LoRALinearTriton.apply(x2d, weight, bias, lora_a, lora_b, float(scale),
                                  float(dropout_p), seed)
