"""Losses over next-token distributions that never build the full (B, T, V) float32 logits.

With a 49k-152k vocabulary the logits dominate training memory: (8 x 2048 x 152k) fp32 is 10 GB.
So a loss only projects positions that carry a label, in chunks of `chunk_size` rows, upcasts
each chunk to float32 on its own, and wraps each chunk in activation checkpointing: backward
recomputes the chunk's logits instead of keeping them, so at most one chunk of logits is alive in
either direction. Gradients are those of the plain computation (tested).

`chunked_row_sum` is that chunking, once; `causal_lm_loss` (cross-entropy) and the trainer's
retain KL use it, and `token_kl` is the one KL formula (the evaluation's drift uses it too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def token_kl(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || model) per row of two log-probability tensors (..., V) -> (...), in nats.

    exp(-inf) is 0 and 0 * finite stays 0, so tokens the reference rules out cost nothing.
    """
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1)


def chunked_row_sum(fn, rows: tuple[torch.Tensor, ...], chunk_size: int, checkpointed: bool,
                    *context) -> torch.Tensor:
    """sum_k fn(*context, *chunk_k) over chunks of `chunk_size` rows of every tensor in `rows`.

    With `checkpointed`, each chunk runs under activation checkpointing, so its logits are
    recomputed in backward instead of kept. `fn` returns a float32 scalar per chunk.
    """
    count = rows[0].shape[0]
    total = rows[0].new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_size):
        chunk = [r[start:start + chunk_size] for r in rows]
        if checkpointed:
            total = total + checkpoint(fn, *context, *chunk, use_reentrant=False)
        else:
            total = total + fn(*context, *chunk)
    return total


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).to(torch.float32)  # (C, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from positions <= t.

    input_ids, labels, attention_mask: (B, T). `labels` is aligned with `input_ids` (the shift is
    done here). Labels equal to `ignore_index`, and labels at padding positions (attention_mask 0),
    are not counted. Returns a float32 scalar; 0 (still differentiable) when no label counts.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, D)
    targets = labels[:, 1:]  # (B, T-1)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, ignore_index)
    valid = targets != ignore_index  # (B, T-1)
    h = hidden[:, :-1][valid]  # (N, D) only rows with a label
    y = targets[valid]  # (N,)
    count = y.numel()
    if count == 0:
        return hidden.sum().to(torch.float32) * 0.0
    # lm_head may be an nn.Linear or a LoRALinear (both expose out_features); wrappers may lack .config.
    vocab = model.lm_head.out_features
    if int(y.min()) < 0 or int(y.max()) >= vocab:
        raise ValueError(f"labels outside [0, {vocab}) other than ignore_index={ignore_index}: "
                         f"min {int(y.min())}, max {int(y.max())}")
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or model.lm_head.weight.requires_grad)
    return chunked_row_sum(_chunk_loss_sum, (h, y), chunk_size, needs_grad, model.lm_head) / count
