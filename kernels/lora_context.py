"""What the Triton LoRA autograd Function keeps between forward and backward: the inputs, the
fp32 shrink output S = drop(X) A^T, and the scalars that regenerate the dropout mask (Philox
from the seed). The torch path keeps the dropped positions instead (dropout.py)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class SavedLoRA(NamedTuple):
    x2d: torch.Tensor      # (M, K)
    weight: torch.Tensor   # (N, K)
    lora_a: torch.Tensor   # (r, K)
    lora_b: torch.Tensor   # (N, r)
    s_act: torch.Tensor    # (M, r) fp32
    scale: float
    dropout_p: float
    seed: object
    has_bias: bool


def save_lora_context(ctx, x2d, weight, bias, lora_a, lora_b, s_act, scale, dropout_p, seed) -> None:
    ctx.save_for_backward(x2d, weight, lora_a, lora_b, s_act)
    ctx.scale, ctx.dropout_p, ctx.seed = float(scale), float(dropout_p), seed
    ctx.has_bias = bias is not None


def load_lora_context(ctx) -> SavedLoRA:
    return SavedLoRA(*ctx.saved_tensors, ctx.scale, ctx.dropout_p, ctx.seed, ctx.has_bias)
