"""Batched text generation: left padding, a pre-allocated KV cache, greedy or nucleus sampling.

Prompts are sorted by token length before batching so each batch pads little, and the answers are
returned in the caller's order. Each step projects only the last position through lm_head (the
full (B, T, V) logits of the prompt are never built). A sequence stops at any EOS id of the
tokenizer or when a stop string appears in its new text (the text is cut before the stop string);
the batch stops when every sequence has stopped.
"""
from __future__ import annotations


import torch

from lora_core.common.progress import progress as progress_bar


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """logits (B, V) float32 -> next ids (B,)."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
def _generate_batch(model, tokenizer, batch_ids: list[list[int]], max_new_tokens: int, temperature: float,
                    top_p: float, stop: list[str], generator) -> list[str]:
    device = model.device
    batch = len(batch_ids)
    width = max(len(ids) for ids in batch_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)  # left padding
        mask[row, width - len(ids):] = True
    input_ids, mask = input_ids.to(device), mask.to(device)

    cache = model.new_kv_cache(width + max_new_tokens)
    eos = torch.tensor(sorted(tokenizer.eos_token_ids), dtype=torch.long, device=device)
    hidden = model.hidden_states(input_ids, attention_mask=mask, kv_cache=cache)  # (B, T, D)
    positions = mask.long().sum(-1) - 1  # (B,) position of the next token minus one
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    stopped_by_string = [False] * batch
    step_mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model.lm_head(hidden[:, -1]).float()  # (B, V)
        next_ids = _sample(logits, temperature, top_p, generator)  # (B,)
        next_ids = next_ids.masked_fill(done, pad_id)
        new_tokens.append(next_ids)
        if eos.numel():
            done = done | torch.isin(next_ids, eos)
        if stop:
            generated = torch.stack(new_tokens, dim=1).tolist()
            for row in range(batch):
                if not stopped_by_string[row] and not bool(done[row]):
                    _, hit = _cut_at_stop(tokenizer.decode(generated[row]), stop)
                    if hit:
                        stopped_by_string[row] = True
                        done[row] = True
        if bool(done.all()):
            break
        positions = positions + 1
        hidden = model.hidden_states(next_ids.unsqueeze(1), attention_mask=step_mask,
                                     position_ids=positions.unsqueeze(1), kv_cache=cache)  # (B, 1, D)

    generated = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(batch)]
    eos_set = tokenizer.eos_token_ids
    texts = []
    for row in range(batch):
        ids = generated[row]
        end = next((i for i, t in enumerate(ids) if t in eos_set), len(ids))
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        if stop:
            text, _ = _cut_at_stop(text, stop)
        texts.append(text)
    return texts


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop: list[str] | str | None = None, batch_size: int = 8, seed: int = 0,
             progress: bool = True, add_special_tokens: bool | None = None) -> list[str]:
    """Continue each (already chat-rendered) prompt; returns only the new text, in prompt order.

    temperature 0 -> greedy; otherwise softmax(logits / temperature) with nucleus `top_p`, drawn
    from a torch.Generator seeded with `seed`. add_special_tokens: None = add the tokenizer's
    specials (BOS) unless the prompt already starts with the BOS text, as chat templates do.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    if not prompts:
        return []

    bos_text = tokenizer.special_tokens.get("bos_token")
    encoded = []
    for prompt in prompts:
        add = add_special_tokens
        if add is None:
            add = not (bos_text and prompt.startswith(bos_text))
        ids = tokenizer.encode(prompt, add_special_tokens=add)
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        encoded.append(ids)

    generator = torch.Generator(device=model.device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[str | None] = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    # progress True/None: a bar on a terminal, a line now and then in a log; False: silent.
    bar = progress_bar(batches, desc="generate", unit="batch", enabled=False if progress is False else None)
    for indices in bar:
        texts = _generate_batch(model, tokenizer, [encoded[i] for i in indices], max_new_tokens,
                                temperature, top_p, stop, generator)
        for i, text in zip(indices, texts):
            results[i] = text
    return results  # type: ignore[return-value]
