"""Batched text generation: left padding, a static KV cache, greedy or nucleus sampling.

Prompts are sorted by token length before batching so each batch pads little, and the answers are
returned in the caller's order. The prompt is prefilled in one pass through the model's own
forward; each decode step then runs at fixed shapes over a StaticKVCache (kv_cache.py), so the
same step can be compiled once per shape bucket (compile_utils.py), and on CPU its matmuls use
pre-packed weights (packed_linear.py). Only the last position goes through lm_head (the full
(B, T, V) logits of the prompt are never built). A sequence stops at any EOS id of the tokenizer or
when a stop string appears in its new text (the text is cut before the stop string); each step
decodes only the tail of a row that could complete one. The batch stops when every row has.
"""
from __future__ import annotations

import torch

from lora_core.common.progress import progress as progress_bar

from .compile_utils import compile_requested, run_layers
from .kv_cache import StaticKVCache
from .packed_linear import packed_linears


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


def _stop_in_tail(tokenizer, ids: list[int], stop: list[str], longest: int) -> bool:
    """Whether the newest token completed a stop string, decoding only the tail of `ids`.

    A stop string completed now ends inside the newest token's text, so it lies within the last
    len(newest text) + longest characters. The window of tokens decoded grows (doubling) until its
    text covers that plus a margin of 4 characters, or the whole sequence: a margin because the
    window's first token may decode differently alone (a cut UTF-8 sequence, a dropped leading
    space), and a growing window because special tokens decode to nothing. Earlier occurrences
    need no search: they would have stopped the row at their own step.
    """
    need = len(tokenizer.decode(ids[-1:])) + longest + 4
    width = 4 * longest + 4
    while True:
        start = max(0, len(ids) - width)
        text = tokenizer.decode(ids[start:])
        if start == 0 or len(text) >= need:
            return any(s in text for s in stop)
        width *= 2


def _capacity(positions: int) -> int:
    """Static cache length, rounded up to 64 so batches of nearby widths share one compiled shape."""
    return -(-positions // 64) * 64


def _prefill(model, batch_ids: list[list[int]], max_new_tokens: int, pad_id: int):
    """Left-pad the batch, run the prompt through the model in one pass into a static cache.

    -> (cache, logits of each row's last prompt token (B, V) float32, positions (B,) of those tokens).
    """
    device = model.device
    batch = len(batch_ids)
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)  # left padding
        mask[row, width - len(ids):] = True
    input_ids, mask = input_ids.to(device), mask.to(device)
    cfg = model.config
    cache = StaticKVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim,
                          _capacity(width + max_new_tokens), model.dtype, device)
    hidden = model.hidden_states(input_ids, attention_mask=mask, kv_cache=cache)  # (B, T, D)
    logits = model.lm_head(hidden[:, -1]).float()  # (B, V): only the last position is projected
    return cache, logits, mask.long().sum(-1) - 1


def _decode_step(model, cache: StaticKVCache, views, ids: torch.Tensor, positions: torch.Tensor,
                 use_compile: bool) -> torch.Tensor:
    """ids (B,) at positions (B,) -> next-token logits (B, V) float32; writes the cache's next slot."""
    mask = cache.begin_step(fixed_shape=use_compile)  # (B, 1, 1, L): prompt, earlier steps, this one
    h = model.model.embed_tokens(ids.unsqueeze(1))  # (B, 1, D)
    cos, sin = model.rotary(positions.unsqueeze(1), h.dtype)  # (B, 1, 1, D)
    h = run_layers(model.model.layers, views, h, cos, sin, mask, use_compile)
    cache.advance(1)
    return model.lm_head(model.model.norm(h[:, 0])).float()


@torch.inference_mode()
def _generate_batch(model, tokenizer, batch_ids: list[list[int]], max_new_tokens: int, temperature: float,
                    top_p: float, stop: list[str], generator, use_compile: bool) -> list[str]:
    batch = len(batch_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cache, logits, positions = _prefill(model, batch_ids, max_new_tokens, pad_id)
    views = cache.layer_views()
    eos = torch.tensor(sorted(tokenizer.eos_token_ids), dtype=torch.long, device=model.device)
    done = torch.zeros(batch, dtype=torch.bool, device=model.device)
    new_tokens: list[torch.Tensor] = []
    rows: list[list[int]] = [[] for _ in range(batch)]  # host copy, only kept for stop strings
    longest = max((len(s) for s in stop), default=0)
    for step in range(max_new_tokens):
        next_ids = _sample(logits, temperature, top_p, generator)  # (B,)
        next_ids = next_ids.masked_fill(done, pad_id)
        new_tokens.append(next_ids)
        if eos.numel():
            done = done | torch.isin(next_ids, eos)
        if stop:
            finished = done.tolist()
            for row, token in enumerate(next_ids.tolist()):
                if finished[row]:
                    continue
                rows[row].append(token)
                if _stop_in_tail(tokenizer, rows[row], stop, longest):
                    done[row] = True
        if step == max_new_tokens - 1 or bool(done.all()):
            break  # the last token needs no forward pass
        positions = positions + 1
        logits = _decode_step(model, cache, views, next_ids, positions, use_compile)

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
             progress: bool = True, add_special_tokens: bool | None = None,
             compile: bool | None = None) -> list[str]:
    """Continue each (already chat-rendered) prompt; returns only the new text, in prompt order.

    temperature 0 -> greedy; otherwise softmax(logits / temperature) with nucleus `top_p`, drawn
    from a torch.Generator seeded with `seed`. add_special_tokens: None = add the tokenizer's
    specials (BOS) unless the prompt already starts with the BOS text, as chat templates do.
    compile: torch.compile the decode step's decoder layer (None = the LORA_CORE_COMPILE
    environment variable, off when unset); see compile_utils.py for its cost and fallback.
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
    use_compile = compile_requested(compile)
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
    if max_new_tokens == 0:
        return [""] * len(prompts)  # nothing to generate: no prefill either

    generator = torch.Generator(device=model.device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[str | None] = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    # progress True/None: a bar on a terminal, a line now and then in a log; False: silent.
    bar = progress_bar(batches, desc="generate", unit="batch", enabled=False if progress is False else None)
    # Packed weights serve the eager step. The compiled layers keep their modules' own forward
    # (a patched forward closes over per-layer packs, and dynamo would compile once per layer);
    # lm_head runs outside them, a fifth of the weights, and stays packed either way.
    packed_root = model.lm_head if use_compile else model
    with packed_linears(packed_root, min(batch_size, len(prompts)), ):
        for indices in bar:
            texts = _generate_batch(model, tokenizer, [encoded[i] for i in indices], max_new_tokens,
                                    temperature, top_p, stop, generator, use_compile)
            for i, text in zip(indices, texts):
                results[i] = text
    return results  # type: ignore[return-value]
