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
    dX = dY W + mask/(1-p) * (dS A)   (M, K)
    db = sum_rows dY              (N,)
    dW = dY^T X                   only when the weight requires grad (frozen base: skipped)

Dropout (dropout.py) draws the dropped positions once in the forward and keeps them (int32,
about p * M * K of them). drop(X) is one copy of X with zeros scattered in, built in the
forward and again in the backward instead of being kept alive between them. The mask lands on
dX's adapter term only: dX gets the full expand by one addmm_ and the dropped positions are
then restored to their dY W values (a gather before, a scatter after: p * M * K elements).

For float16/bfloat16 inputs S is computed in the input dtype (CPU BLAS has no mixed-output
mm, and upcasting X to fp32 would cost a full copy of X per call; BLAS accumulates in fp32
inside each call, so the only extra error is one rounding of S, relative eps of the dtype).

Half precision on CPU, two routes chosen by cpu_caps.native_half:
- without native bf16/fp16 units (an AVX2 machine) the oneDNN/ATen paths for the rank-r
  products are pathological (an order of magnitude slower than the same product in fp32, and a
  row-major B several times slower than a column-major one), so there the expands run in fp32
  and are added into the half result, and B is fed column-major;
- with them (AVX512-BF16/AMX) half-precision addmm_ is the fast one and row-major B is best:
  plain addmm_, as on CUDA, fp32 and fp64.
Figures: bench/RESULTS.md, "Measurements cited by the code".
"""
from __future__ import annotations

import torch

from .cpu_caps import native_half
from .dropout import dropped_copy, dropped_positions


def _emulated_half(t: torch.Tensor) -> bool:
    """Half precision on a CPU that has no units for it: take the fp32 route (docstring)."""
    return (t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)
            and not native_half(t.dtype))


def _add_expand_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> None:
    """out += alpha * left @ right for a rank-r product, left (M, r), right (r, P)."""
    if _emulated_half(out):
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
        if bias is not None:
            y = torch.addmm(bias, x2d, weight.t())  # (M, N)
        else:
            y = torch.mm(x2d, weight.t())  # (M, N)
        if dropout_p > 0.0:
            dropped = dropped_positions(seed, x2d.numel(), dropout_p, x2d.device)  # (~pMK,)
            s_act = torch.mm(dropped_copy(x2d, dropped), lora_a.t())  # (M, r)
            s_act.mul_(1.0 / (1.0 - dropout_p))
        else:
            dropped = None
            s_act = torch.mm(x2d, lora_a.t())  # (M, r)
        _add_expand_(y, s_act, lora_b.t(), scale)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, s_act, dropped)
        ctx.scale, ctx.dropout_p, ctx.has_bias = float(scale), float(dropout_p), bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, s_act, dropped = ctx.saved_tensors
        scale, p = ctx.scale, ctx.dropout_p
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        dx = dw = dbias = da = db = None
        keep_scale = 1.0 / (1.0 - p) if p > 0.0 else 1.0

        ds = None
        if need_x or need_a:
            lb = _col_major(lora_b) if _emulated_half(dy) else lora_b
            ds = torch.mm(dy, lb).mul_(scale)  # (M, r)
        if need_lb:
            db = torch.mm(s_act.t(), dy).t().mul_(scale)  # (N, r)
        if need_a:
            xd = dropped_copy(x2d, dropped) if p > 0.0 else x2d  # (M, K), freed on return
            da = torch.mm(ds.t(), xd)  # (r, K)
            if p > 0.0:
                da.mul_(keep_scale)
        if need_x:
            dx = torch.mm(dy, weight)  # (M, K), contiguous
            if p > 0.0:
                # drop() is elementwise on X, so its mask lands on the adapter term of dX only:
                # add the whole expand, then put the dropped entries back to dY W.
                index = dropped.long()
                base_at_dropped = dx.view(-1).take(index)  # (~pMK,)
                _add_expand_(dx, ds, lora_a, keep_scale)
                dx.view(-1).index_copy_(0, index, base_at_dropped)
            else:
                _add_expand_(dx, ds, lora_a, 1.0)
        if need_w:
            dw = torch.mm(dy.t(), x2d)  # (N, K)
        if need_b and ctx.has_bias:
            dbias = dy.sum(0)  # (N,)
        return dx, dw, dbias, da, db, None, None, None


def lora_linear_torch(x2d, weight, bias, lora_a, lora_b, scale: float, dropout_p: float = 0.0,
                      seed: int | None = None) -> torch.Tensor:
    """Torch-path LoRA linear on validated 2-D inputs; returns (M, N).

    Args:
        x2d: (M, K) input, already flattened and validated (kernels.dispatch does both).
        weight: (N, K) frozen or trainable base weight; bias: (N,) or None.
        lora_a: (r, K) and lora_b: (N, r), the adapter's factors.
        scale: s in Y = X W^T + b + s * (drop(X) A^T) B^T (alpha / r).
        dropout_p: dropout on the adapter's input only; 0 draws nothing.
        seed: the dropout mask's seed; needed when dropout_p > 0 (kernels.dispatch draws one).
    """
    return LoRALinearTorch.apply(x2d, weight, bias, lora_a, lora_b, float(scale),
                                 float(dropout_p), seed)
