"""The pure-torch LoRA linear: the fast CPU path and the fallback everywhere else.

    Y = X W^T + b + s * (drop(X) A^T) B^T        X (M, K), W (N, K), A (r, K), B (N, r)

Forward is two BLAS calls on the big operands plus two skinny ones: `addmm` for the base
(bias folded in), S = drop(X) A^T (M, r), then `addmm_` of s * S B^T straight into Y, so the
adapter never materialises an (M, N) temporary and Y is written by BLAS only. The custom
backward avoids autograd's generic graph (which would keep drop(X) alive and build (M, N)
intermediates for the unfused sum):

    dS = s * dY B                 (M, r)
    dB = s * dY^T S               (N, r)
    dA = dS^T drop(X)             (r, K)
    dX = dY W + mask/(1-p) * (dS A)   (M, K); without dropout: one addmm_ into dY W
    db = sum_rows dY              (N,)
    dW = dY^T X                   only when the weight requires grad (frozen base: skipped)

Dropout keeps only a seed; the mask is regenerated in the backward (see dropout.py).
For float16/bfloat16 inputs S is computed in the input dtype (CPU BLAS has no mixed-output
mm, and upcasting X to fp32 would cost a full copy of X per call; BLAS accumulates in fp32
inside each call, so the only extra error is one rounding of S, relative eps of the dtype).

Half precision on CPU: without native bf16/fp16 instructions (this project's AVX2 machine)
the oneDNN/ATen paths for the rank-r products are pathological: measured at M=1024, K=N=2048,
r=16, bf16, one thread: `y.addmm_(S, B^T)` 173-300 ms and `dX.addmm_(dS, A)` 230-260 ms against
20 ms for an fp32 (M, r) x (r, N) product added into y, and `dY @ B` 85 ms with B row-major
against 20 ms with B column-major. So on CPU the expands run in fp32 and are added into the
half result, and B is fed column-major. Elsewhere (CUDA, fp32, fp64) plain addmm_ is fastest.
"""
from __future__ import annotations

import torch

from .dropout import torch_dropped
from .lora_context import load_lora_context, save_lora_context


def _slow_half(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)


def _add_expand_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> None:
    """out += alpha * left @ right for a rank-r product, left (M, r), right (r, P)."""
    if _slow_half(out):
        out.add_(torch.mm(left.float(), right.float()), alpha=alpha)
    else:
        out.addmm_(left, right, alpha=alpha)


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column-major (a copy of a small adapter matrix only)."""
    return t.t().contiguous().t()


class LoRALinearTorch(torch.autograd.Function):
    """autograd.Function over flattened 2-D inputs; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_a, lora_b, scale: float, dropout_p: float, seed):
        # x2d (M, K), weight (N, K), bias (N,)|None, lora_a (r, K), lora_b (N, r)
        xd = torch_dropped(x2d, seed, dropout_p) if dropout_p > 0.0 else x2d
        if bias is not None:
            y = torch.addmm(bias, x2d, weight.t())  # (M, N)
        else:
            y = torch.mm(x2d, weight.t())  # (M, N)
        s_act = torch.mm(xd, lora_a.t())  # (M, r)
        _add_expand_(y, s_act, lora_b.t(), scale)
        save_lora_context(ctx, x2d, weight, bias, lora_a, lora_b, s_act, scale, dropout_p, seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, s_act, scale, p, seed, has_bias = load_lora_context(ctx)
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        dx = dw = dbias = da = db = None

        ds = None
        if need_x or need_a:
            lb = _col_major(lora_b) if _slow_half(dy) else lora_b
            ds = torch.mm(dy, lb).mul_(scale)  # (M, r)
        if need_lb:
            db = torch.mm(s_act.t(), dy).t().mul_(scale)  # (N, r)
        if need_a:
            xd = torch_dropped(x2d, seed, p) if p > 0.0 else x2d
            da = torch.mm(ds.t(), xd)  # (r, K)
        if need_x:
            dx = torch.mm(dy, weight)  # (M, K)
            if p > 0.0:
                # drop() is elementwise on X, so its mask lands on the adapter term of dX only;
                # the same seed regenerates the forward's mask.
                lora_term = (torch.mm(ds.float(), lora_a.float()) if _slow_half(dx)
                             else torch.mm(ds, lora_a))  # (M, K)
                dx.add_(torch_dropped(lora_term, seed, p))
            else:
                _add_expand_(dx, ds, lora_a, 1.0)
        if need_w:
            dw = torch.mm(dy.t(), x2d)  # (N, K)
        if need_b and has_bias:
            dbias = dy.sum(0)  # (N,)
        return dx, dw, dbias, da, db, None, None, None


def lora_linear_torch(x2d, weight, bias, lora_a, lora_b, scale: float, dropout_p: float = 0.0,
                      seed: int | None = None) -> torch.Tensor:
    """Torch-path LoRA linear on validated 2-D inputs; returns (M, N)."""
    return LoRALinearTorch.apply(x2d, weight, bias, lora_a, lora_b, float(scale),
                                 float(dropout_p), seed)
