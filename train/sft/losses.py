"""The retain term: KL(base || adapted) on benign prompts, base = the same model with its
adapters switched off (no second copy in memory)."""
from __future__ import annotations

import torch

from lora_core import disable_adapters
from lora_core.models.loss import chunked_row_sum, fusable, fused_linear_kl, token_kl
from lora_core.train.sft.batches import IGNORE_INDEX


def _chunk_kl_sum(model, h: torch.Tensor, h_base: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(base || adapted) of the next-token distributions; h, h_base (N, D)."""
    # lm_head may itself carry an adapter: the base logits must come with adapters switched off.
    with torch.no_grad(), disable_adapters(model):
        lp_base = torch.log_softmax(model.lm_head(h_base).float(), dim=-1)  # (N, V)
    lp = torch.log_softmax(model.lm_head(h).float(), dim=-1)  # (N, V)
    return token_kl(lp_base, lp).sum()


def retain_kl(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
              chunk_size: int = 256) -> torch.Tensor:
    """Mean per-token KL(base || adapted) in nats over the positions that predict a label.

    The base is the same model under lora_core.disable_adapters (no copy in memory). input_ids,
    labels, attention_mask: (B, T), labels aligned with input_ids as for models.causal_lm_loss.
    Decoder states are computed once per model; the (N, V) logits only per chunk of `chunk_size`
    rows, so full fp32 logits are never held. A plain linear head (the usual case: adapters
    sit on the projections) gets the fused form, gradient formed with the logits, nothing
    recomputed; an adapted head is recomputed in backward (checkpoint).
    Exactly 0 while every LoRA B is 0. Differentiable in the adapters only.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    with torch.no_grad(), disable_adapters(model):
        hidden_base = model.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, D)
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, D)
    valid = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts label t+1
    if attention_mask is not None:
        valid = valid & (attention_mask[:, 1:] != 0)
    h, hb = hidden[:, :-1][valid], hidden_base[:, :-1][valid]  # (N, D)
    count = h.shape[0]
    if count == 0:
        return hidden.sum().float() * 0.0
    if fusable(model.lm_head, h.device):
        # The same head serves base and adapted rows: no adapter on it, so nothing to switch off.
        return fused_linear_kl(h, hb, model.lm_head, chunk_size) / count
    checkpointed = torch.is_grad_enabled() and h.requires_grad
    return chunked_row_sum(_chunk_kl_sum, (h, hb), chunk_size, checkpointed, model) / count
