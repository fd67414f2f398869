"""Scoring maths: continuation log-likelihoods, bits per byte, choice accuracy, KL drift, proportions.

All model-facing functions take any causal LM that maps `(input_ids (B,T), attention_mask=(B,T))`
to logits (B,T,V) (our `models.CausalLM`, or anything returning an object with `.logits`), and a
tokenizer with `encode(text, add_special_tokens=False) -> list[int]`. Sequences are right-padded
(causal attention never lets a real token see the padding to its right), sorted by length so a batch
wastes little, and only the continuation positions go through log-softmax, in float32.

Conventions (stated because benchmark numbers depend on them):
- context and continuation are tokenised separately and concatenated, so the continuation's tokens
  are the same whatever the context (lm-eval-harness does the same); the context is encoded with
  the tokenizer's own special tokens (`add_special_tokens=True`: a BOS for Llama-style tokenizers,
  nothing for SmolLM2/Qwen), as the model saw text in training.
- bits per byte = (sum over continuation tokens of -log2 p) / (UTF-8 bytes of the continuation).
- acc_norm divides each choice's log-likelihood by its length in UTF-8 bytes (OLMES/lm-eval
  "acc_norm" uses characters; for the ASCII text of ARC the two agree).
- drift = mean over continuation tokens of KL(p_base || p_model), in nats; it is computed from the
  two models' log-softmax outputs on identical inputs, so identical models give exactly 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from lora_core.models.loss import token_kl
from lora_core.common.progress import progress

__all__ = ["wilson_interval", "wilson_interval_at", "proportion", "mean_with_stderr", "ContinuationScore",
           "score_continuations",
           "bits_per_byte", "item_bits_per_byte", "choice_hits", "choice_accuracy", "kl_drift"]


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default).

    Unlike p ± z*stderr it is not empty at 0/n or n/n (0 refusals in 48 prompts still allows a
    rate up to 0.074) and stays inside [0, 1].
    """
    if n <= 0 or k < 0 or k > n:
        raise ValueError(f"a proportion needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    return wilson_interval_at(k / n, n, z)


def wilson_interval_at(p: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson's interval at a success share p that need not be k/n (e.g. a mean over items of
    per-item rates from k samples each), with n the number of independent units."""
    if n <= 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"a share needs 0 <= p <= 1 and n > 0, got p={p}, n={n}")
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 (p = 1) the bound is exactly 0 (1); rounding would leave ~1e-17 past the estimate.
    return (0.0 if p == 0.0 else max(0.0, centre - half)), (1.0 if p == 1.0 else min(1.0, centre + half))


def proportion(k: int, n: int) -> dict:
    """{"value": k/n, "n", "k", "stderr": sqrt(p(1-p)/n), "ci95": Wilson 95% interval}."""
    if n <= 0 or k < 0 or k > n:
        raise ValueError(f"a proportion needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    return {"value": p, "n": n, "k": k, "stderr": math.sqrt(p * (1.0 - p) / n),
            "ci95": list(wilson_interval(k, n))}


def mean_with_stderr(values: Sequence[float]) -> dict:
    """{"value": mean, "n", "stderr": sample std / sqrt(n)} (stderr NaN for n = 1)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean of no values")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return {"value": mean, "n": n, "stderr": math.sqrt(var / n) if n > 1 else float("nan")}


@dataclass
class ContinuationScore:
    """Log-likelihood of one continuation: total in nats, its token count and UTF-8 byte count."""

    logprob: float
    n_tokens: int
    n_bytes: int
    greedy: bool  # every continuation token is the argmax given what precedes it


class _Rows:
    """Per-row log-probs of chosen positions, projecting only those positions through lm_head.

    For short continuations after long contexts (ARC: ~5 of ~40 tokens) the (B, T, V) logits would
    cost more than the decoder itself at V = 49152, so models exposing `hidden_states` + `lm_head`
    (our CausalLM) get only the needed rows projected; others fall back to full logits.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.head = getattr(model, "lm_head", None) if hasattr(model, "hidden_states") else None
        if self.head is not None:
            self.states = model.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, D)
        else:
            out = model(input_ids, attention_mask=attention_mask)
            self.states = out.logits if hasattr(out, "logits") else out  # (B, T, V)

    def logprobs(self, row: int, start: int, length: int) -> torch.Tensor:
        """(length, V) float32 log-probs predicting tokens start..start+length-1 of `row`."""
        # Position t predicts token t+1, hence the shift by one.
        x = self.states[row, start - 1:start - 1 + length]
        logits = self.head(x) if self.head is not None else x
        return torch.log_softmax(logits.float(), dim=-1)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _encode_pairs(tokenizer, contexts, continuations, add_special_tokens: bool):
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    pairs = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        if not isinstance(ctx, str) or not isinstance(cont, str):
            raise TypeError(f"item {i}: context and continuation must be str")
        ctx_ids = list(tokenizer.encode(ctx, add_special_tokens=add_special_tokens))
        cont_ids = list(tokenizer.encode(cont, add_special_tokens=False))
        if not cont_ids:
            raise ValueError(f"item {i}: continuation {cont!r} encodes to no tokens")
        if not ctx_ids:
            raise ValueError(f"item {i}: context {ctx!r} encodes to no tokens (nothing to condition on)")
        pairs.append((ctx_ids, cont_ids))
    return pairs


def _batches(pairs, batch_size: int):
    """Yield (indices, input_ids (B,T), attention_mask (B,T), starts, lengths), longest first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        starts = [len(pairs[i][0]) for i in idx]
        lengths = [len(pairs[i][1]) for i in idx]
        yield idx, ids, mask, starts, lengths


@torch.no_grad()
def score_continuations(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str],
                        batch_size: int = 8, add_special_tokens: bool = True, progress_bar: bool | None = None,
                        desc: str = "log-likelihood") -> list[ContinuationScore]:
    """Log-likelihood of each continuation given its context (see module docstring)."""
    pairs = _encode_pairs(tokenizer, contexts, continuations, add_special_tokens)
    device = _model_device(model)
    scores: list[ContinuationScore | None] = [None] * len(pairs)
    batches = list(_batches(pairs, batch_size))
    for idx, ids, mask, starts, lengths in progress(batches, desc=desc, enabled=progress_bar):
        rows = _Rows(model, ids.to(device), mask.to(device))
        for row, i in enumerate(idx):
            lp = rows.logprobs(row, starts[row], lengths[row])  # (L, V)
            target = torch.tensor(pairs[i][1], device=lp.device)  # (L,)
            token_lp = lp.gather(1, target[:, None])[:, 0]
            scores[i] = ContinuationScore(
                logprob=float(token_lp.double().sum()), n_tokens=lengths[row],
                n_bytes=len(continuations[i].encode("utf-8")),
                greedy=bool((lp.argmax(-1) == target).all()))
    return scores  # type: ignore[return-value]


def bits_per_byte(scores: Sequence[ContinuationScore]) -> dict:
    """Corpus bits per byte: total -log2 p over all continuation tokens / total UTF-8 bytes.

    Also reports the mean of per-item BPB with its standard error (items weigh equally there).
    """
    if not scores:
        raise ValueError("bits_per_byte of no scores")
    total_bits = sum(-s.logprob for s in scores) / math.log(2)
    total_bytes = sum(s.n_bytes for s in scores)
    item = mean_with_stderr(item_bits_per_byte(scores))
    return {"value": total_bits / total_bytes, "n": len(scores), "bytes": total_bytes,
            "item_mean": item["value"], "stderr": item["stderr"]}


def item_bits_per_byte(scores: Sequence[ContinuationScore]) -> list[float]:
    """Bits per byte of each continuation on its own (what paired comparisons resample)."""
    return [-s.logprob / math.log(2) / s.n_bytes for s in scores]


def choice_hits(choice_scores: Sequence[Sequence[ContinuationScore]], gold: Sequence[int]) -> dict:
    """Per question: is the gold choice the argmax of total log-likelihood ("acc") and of
    log-likelihood per byte ("acc_norm")? Ties go to the lowest index, deterministically."""
    if len(choice_scores) != len(gold) or not gold:
        raise ValueError(f"need one gold index per question, got {len(choice_scores)} and {len(gold)}")
    hits: dict[str, list[bool]] = {"acc": [], "acc_norm": []}
    for i, (scores, g) in enumerate(zip(choice_scores, gold)):
        if not 0 <= g < len(scores):
            raise ValueError(f"question {i}: gold index {g} out of range for {len(scores)} choices")
        raw = [s.logprob for s in scores]
        norm = [s.logprob / s.n_bytes for s in scores]
        hits["acc"].append(raw.index(max(raw)) == g)
        hits["acc_norm"].append(norm.index(max(norm)) == g)
    return hits


def choice_accuracy(choice_scores: Sequence[Sequence[ContinuationScore]], gold: Sequence[int]) -> dict:
    """acc and acc_norm (see `choice_hits`) as proportions."""
    return {name: proportion(sum(h), len(h)) for name, h in choice_hits(choice_scores, gold).items()}


@torch.no_grad()
def kl_drift(base_model, model, tokenizer, contexts: Sequence[str], continuations: Sequence[str],
             batch_size: int = 8, add_special_tokens: bool = True, progress_bar: bool | None = None,
             per_item: bool = False):
    """Mean per-token KL(base || model) in nats over the continuation tokens (teacher-forced).

    Returns {"value": mean over all tokens, "n": items, "tokens": token count,
             "stderr": standard error of the per-item means, "max_token": largest single-token KL},
    and with `per_item` also the list of per-item mean KLs: (summary, per_item).
    """
    pairs = _encode_pairs(tokenizer, contexts, continuations, add_special_tokens)
    base_device, device = _model_device(base_model), _model_device(model)
    sums: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)  # (KL sum, tokens) per item
    max_token = 0.0
    for idx, ids, mask, starts, lengths in progress(list(_batches(pairs, batch_size)), desc="KL drift",
                                                    enabled=progress_bar):
        base_rows = _Rows(base_model, ids.to(base_device), mask.to(base_device))
        rows = _Rows(model, ids.to(device), mask.to(device))
        for row, i in enumerate(idx):
            lp_base = base_rows.logprobs(row, starts[row], lengths[row])  # (L, V)
            lp = rows.logprobs(row, starts[row], lengths[row]).to(lp_base.device)
            kl = token_kl(lp_base, lp).clamp_min(0.0)  # (L,)
            sums[i] = (float(kl.double().sum()), lengths[row])
            max_token = max(max_token, float(kl.max()))
    tokens = sum(n for _, n in sums)
    means = [s / n for s, n in sums]
    summary = {"value": sum(s for s, _ in sums) / tokens, "n": len(pairs), "tokens": tokens,
               "stderr": mean_with_stderr(means)["stderr"], "max_token": max_token}
    return (summary, means) if per_item else summary
