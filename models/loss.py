"""Losses over next-token distributions that never build the full (B, T, V) float32 logits.

With a 49k-152k vocabulary the logits dominate training memory: (8 x 2048 x 152k) fp32 is 10 GB.
So a loss only projects positions that carry a label, in chunks of `chunk_size` rows, upcasting
each chunk to float32 on its own; at most one chunk of logits is alive at a time.

Cross-entropy through a plain `nn.Linear` head (the usual case, tied or not) is fused: each
chunk's gradient, softmax - onehot, is formed right after its loss, while its logits exist, and
multiplied into dH (and dW/db only when the head trains). The backward then only scales those
by the incoming gradient: the head's logits are computed once per step, where checkpointing
computed them twice (the tied 49152 x 576 head of SmolLM2 is a fifth of the model's flops), and a
frozen head costs no weight gradient. Any other head (an adapter on lm_head, a sharded weight,
autocast) takes the checkpointed path. Gradients are those of the plain computation (tested).

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


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_rows CE(h W^T + b, y) with its gradients formed in the forward, chunk by chunk.

    h (N, D), weight (V, D), bias (V,)|None, targets (N,) int64 -> float32 scalar (float64 for
    float64 h). For each chunk: z = (h_c W^T + b) in h's dtype, upcast to float32 (as the plain
    path does);
    loss_c = sum(logsumexp(z) - z[y]); dz = softmax(z) - onehot(y) in float32, cast to h's dtype
    (the backward of the upcast) before dH_c = dz W, dW += dz^T h_c, db += sum dz.
    backward(g): g * (dH, dW, db).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size: int):
        needs = ctx.needs_input_grad[:3]  # all False under no_grad
        need_h, need_w, need_b = needs
        acc = torch.promote_types(h.dtype, torch.float32)  # float64 models keep float64
        total = torch.zeros((), dtype=acc, device=h.device)
        dh = torch.empty_like(h) if need_h else None  # (N, D)
        dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if need_b else None
        for start in range(0, h.shape[0], chunk_size):
            h_c, y_c = h[start:start + chunk_size], targets[start:start + chunk_size]  # (C, D), (C,)
            z = F.linear(h_c, weight, bias).to(acc)  # (C, V), a new tensor: edited in place
            # logsumexp by hand, in place: fewer passes over the chunk than logsumexp + sub_ + exp_,
            # and the shifted exponentials are the softmax's (figures in bench/RESULTS.md).
            z_target = z.gather(1, y_c[:, None])  # (C, 1)
            top = z.amax(dim=-1, keepdim=True)  # (C, 1)
            z.sub_(top).exp_()
            denom = z.sum(dim=-1, keepdim=True)  # (C, 1)
            total += (top + denom.log() - z_target).sum()
            if not (need_h or need_w or need_b):
                continue
            dz = z.div_(denom)  # softmax
            dz[torch.arange(dz.shape[0], device=dz.device), y_c] -= 1.0
            dz_low = dz.to(h.dtype)  # (C, V)
            if need_h:
                torch.mm(dz_low, weight, out=dh[start:start + chunk_size])
            if need_w:
                dw.addmm_(dz_low.t().to(acc), h_c.to(acc))
            if need_b:
                db += dz_low.sum(0, dtype=acc)
        ctx.save_for_backward(*(t for t in (dh, dw, db) if t is not None))
        ctx.needs = needs
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        out = []
        for need, dtype in zip(ctx.needs, ctx.dtypes):
            out.append(saved.pop(0).mul(grad).to(dtype) if need else None)
        return out[0], out[1], out[2], None, None


class _FusedLinearKL(torch.autograd.Function):
    """sum_rows KL(softmax(z_ref) || softmax(z)), z = h W^T + b, z_ref = h_ref W^T + b (no grad
    through h_ref), with the gradient formed in the forward chunk by chunk, as for the CE above:
    d KL / dz = softmax(z) - softmax(z_ref) (the CE gradient with soft targets)."""

    @staticmethod
    def forward(ctx, h, h_ref, weight, bias, chunk_size: int):
        need_h, _, need_w, need_b = ctx.needs_input_grad[:4]
        acc = torch.promote_types(h.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=h.device)
        dh = torch.empty_like(h) if need_h else None  # (N, D)
        dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if need_b else None
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            lp_ref = torch.log_softmax(F.linear(h_ref[rows], weight, bias).to(acc), dim=-1)  # (C, V)
            lp = torch.log_softmax(F.linear(h[rows], weight, bias).to(acc), dim=-1)  # (C, V)
            total += token_kl(lp_ref, lp).sum()
            if not (need_h or need_w or need_b):
                continue
            dz = lp.exp_().sub_(lp_ref.exp_()).to(h.dtype)  # softmax(z) - softmax(z_ref)
            if need_h:
                torch.mm(dz, weight, out=dh[rows])
            if need_w:
                dw.addmm_(dz.t().to(acc), h[rows].to(acc))
            if need_b:
                db += dz.sum(0, dtype=acc)
        ctx.save_for_backward(*(t for t in (dh, dw, db) if t is not None))
        ctx.needs = (need_h, need_w, need_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        dh, dw, db = (saved.pop(0).mul(grad).to(dtype) if need else None
                      for need, dtype in zip(ctx.needs, ctx.dtypes))
        return dh, None, dw, db, None


def fused_linear_kl(h: torch.Tensor, h_ref: torch.Tensor, lm_head: torch.nn.Linear,
                    chunk_size: int) -> torch.Tensor:
    """Sum over rows of KL(softmax(lm_head(h_ref)) || softmax(lm_head(h))), h_ref constant;
    logits built once, by chunks (see _FusedLinearKL)."""
    return _FusedLinearKL.apply(h, h_ref.detach(), lm_head.weight, lm_head.bias, chunk_size)


def fusable(lm_head: torch.nn.Module, device: torch.device) -> bool:
    """A plain linear head with ordinary tensors, outside autocast (see module docstring)."""
    plain = lambda t: t is None or type(t) in (torch.Tensor, torch.nn.Parameter)
    return (isinstance(lm_head, torch.nn.Linear) and plain(lm_head.weight) and plain(lm_head.bias)
            and not torch.is_autocast_enabled(device.type))


def fused_linear_cross_entropy(h: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor,
                               chunk_size: int) -> torch.Tensor:
    """Sum over rows of cross-entropy of lm_head(h) against targets, logits built once, by chunks."""
    return _FusedLinearCrossEntropy.apply(h, lm_head.weight, lm_head.bias, targets, chunk_size)


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).to(torch.float32)  # (C, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from positions <= t.

    input_ids, labels, attention_mask: (B, T). `labels` is aligned with `input_ids` (the shift is
    done here). Labels equal to `ignore_index`, and labels at padding positions (attention_mask 0),
    are not counted. Returns a float32 scalar (float64 for a float64 model with a plain linear
    head); 0 (still differentiable) when no label counts.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} "
                         f"!= input_ids shape {tuple(input_ids.shape)}")
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
    if fusable(model.lm_head, h.device):
        return fused_linear_cross_entropy(h, model.lm_head, y, chunk_size) / count
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or model.lm_head.weight.requires_grad)
    return chunked_row_sum(_chunk_loss_sum, (h, y), chunk_size, needs_grad, model.lm_head) / count
