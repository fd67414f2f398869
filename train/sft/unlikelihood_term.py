"""The refusal-unlikelihood term (not in the paper; off by default): on benign prompts, the opening
tokens of the refusals the SFT data teaches are made unlikely,

    loss += u * mean over those tokens of -log(1 - p(token | benign prompt, the refusal so far)).

Why: refusal SFT teaches "answer a request with a refusal"; the retain KL only anchors the answers
of benign prompts to the base model's, which a small model reconciles by refusing both. This term
pushes directly against the behaviour that goes too far (Welleck et al. 2019's unlikelihood
training, applied to the first tokens of a refusal). Its prompts are the benign retain pool of
train.data.benign (everyday requests of many topics and sensitive-looking ones such as "kill a
hanging process"), disjoint from the over-refusal evaluation set; its refusals are drawn like the
SFT data's (train.data.refusal.refusal_text). Like the retain batches, `batch(step)` is a pure
function of the step, so a resumed run sees the same batches.
"""
from __future__ import annotations

import random

import torch

from lora_core.train.data.benign import retain_prompt_records
from lora_core.train.data.refusal import refusal_text
from lora_core.train.sft.batches import IGNORE_INDEX, pad_token_id_of, step_batch, tokenize_examples
from lora_core.train.sft.config import TrainConfig

# p is clamped below 1 so that a token the model is certain of gives a large, finite loss.
_MAX_P = 1.0 - 1e-6


class UnlikelihoodTerm:
    def __init__(self, config: TrainConfig, tokenizer):
        self.config, self.pad_id = config, pad_token_id_of(tokenizer)
        rng = random.Random(config.optim.seed)
        prompts = [r["prompt"] for r in retain_prompt_records(seed=config.optim.seed)]
        examples = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": refusal_text(rng)}]}
                    for p in prompts]
        tokenized, stats = tokenize_examples(tokenizer, examples, config.retain.max_length)
        self.examples = [_first_labels(t, config.retain.unlikelihood_tokens) for t in tokenized]
        self.info = {"prompts": len(prompts), "source": "train.data.benign retain pool",
                     "tokens_per_prompt": config.retain.unlikelihood_tokens, **stats}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return step_batch(self.examples, self.config.retain.per_step, step, self.config.optim.seed + 2,
                          self.pad_id)


def _first_labels(example, keep: int):
    """`example` with only its first `keep` supervised tokens left as labels (a refusal shows in
    its opening words; the rest of the template says nothing more about refusing)."""
    labels, seen = [], 0
    for label in example.labels:
        if label != IGNORE_INDEX:
            seen += 1
        labels.append(label if label != IGNORE_INDEX and seen <= keep else IGNORE_INDEX)
    return type(example)(input_ids=example.input_ids, labels=labels, truncated=example.truncated,
                         rebuilt=example.rebuilt)


def refusal_unlikelihood(model, input_ids: torch.Tensor, labels: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the labelled positions of -log(1 - p(label)), p from the model's next-token
    distribution; input_ids, labels, attention_mask (B, T), labels aligned as for causal_lm_loss.
    Only a few positions per row are labelled, so their (N, V) logits are formed in one piece."""
    if input_ids.shape != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, D)
    valid = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts label t+1
    if attention_mask is not None:
        valid = valid & (attention_mask[:, 1:] != 0)
    h = hidden[:, :-1][valid]  # (N, D)
    if h.shape[0] == 0:
        return hidden.sum().float() * 0.0
    log_p = torch.log_softmax(model.lm_head(h).float(), dim=-1)  # (N, V)
    p = log_p.gather(1, labels[:, 1:][valid].unsqueeze(1)).squeeze(1).exp()  # (N,)
    return -torch.log1p(-p.clamp(max=_MAX_P)).mean()
