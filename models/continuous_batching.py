"""Continuous batching: a fixed set of slots decodes together, and a prompt whose answer is
finished hands its slot to the next waiting prompt, so a batch no longer runs at the pace of its
longest answer.

One call of `decode_all` works through a queue of encoded prompts (the caller orders it):
1. free slots take the next prompts (once a quarter of the slots is free: `_time_to_refill`):
   they are prefilled together (left-padded, one pass through the model's own forward, only their
   last position through lm_head) and copied into the slot cache without their padding
   (kv_cache.SlotKVCache);
2. every live slot chooses its next token (sampling.sample_next, each prompt with its own
   generator); a row ends at an EOS id, at a stop string (checked on the tail of its text only),
   or at max_new_tokens, and its text is handed to `on_done` at once;
3. one decode step runs every slot at fixed shapes over the slot cache (compile_utils.run_layers);
   finished slots that no prompt is left to fill are dropped (the cache keeps the others), unless
   the step is compiled, whose shapes must not change.
The loop ends when the queue is empty and no slot is live; the last token of a row costs no
forward pass.

A prefix shared by every prompt (a chat template's system prompt, a few-shot header) is prefilled
once, and each prompt's own prefill starts from its keys and values (`SharedPrefix`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .compile_utils import run_layers
from .kv_cache import KVCache, SlotKVCache
from .sampling import cut_at_stop, sample_next, stop_in_tail

# A shared prefix shorter than this is prefilled with each prompt: copying its keys and values
# into every joiner's cache would cost about what recomputing a few tokens does.
MIN_SHARED_PREFIX = 16


@dataclass
class SharedPrefix:
    """The keys and values (1, Hkv, P, D) per layer of the first P tokens every prompt starts with."""
    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def compute(cls, model, prompts: list[list[int]]) -> "SharedPrefix | None":
        """The longest common prefix of `prompts`, stopping one token short of the shortest prompt
        (each prompt needs a token of its own to prefill for its first logits), or None when it is
        shorter than MIN_SHARED_PREFIX or there is a single prompt."""
        if len(prompts) < 2:
            return None
        shortest = min(len(p) for p in prompts) - 1
        length = 0
        first = prompts[0]
        while length < shortest and all(p[length] == first[length] for p in prompts):
            length += 1
        if length < MIN_SHARED_PREFIX:
            return None
        cache = KVCache(model.config.num_hidden_layers, length)
        ids = torch.tensor([first[:length]], dtype=torch.long, device=model.device)
        model.hidden_states(ids, kv_cache=cache)
        stored = [cache.stored(layer) for layer in range(model.config.num_hidden_layers)]
        return cls(length, [k for k, _ in stored], [v for _, v in stored])

    def cache_for(self, rows: int, extra: int) -> KVCache:
        """A KVCache holding the prefix for `rows` rows, with room for `extra` more positions."""
        cache = KVCache(len(self.keys), self.length + extra)
        cache.append_mask(torch.ones(rows, self.length, dtype=torch.bool, device=self.keys[0].device))
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(layer, k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
        cache.advance(self.length)
        return cache


def _prefill(model, prompts: list[list[int]], pad_id: int, prefix: SharedPrefix | None):
    """Left-pad the prompts (less the shared prefix) and run them through the model in one pass.
    -> (the filled KVCache, logits (n, V) float32 of each prompt's last token)."""
    skip = prefix.length if prefix is not None else 0
    tails = [ids[skip:] for ids in prompts]
    width = max(len(t) for t in tails)
    input_ids = torch.full((len(tails), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(tails), width, dtype=torch.bool)
    for row, ids in enumerate(tails):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)  # left padding
        mask[row, width - len(ids):] = True
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)
    if prefix is not None:
        cache = prefix.cache_for(len(tails), width)
    else:
        cache = KVCache(model.config.num_hidden_layers, width)
    hidden = model.hidden_states(input_ids, attention_mask=mask, kv_cache=cache)  # (n, W, D)
    return cache, model.lm_head(hidden[:, -1]).float()  # only the last position is projected


def _time_to_refill(free: int, slots: int, waiting: int) -> bool:
    """Whether free slots take waiting prompts now: once a quarter of the slots is free (or as many
    as there are prompts left, or all of them). A prefill pass has a fixed cost (every layer's
    calls) whatever the number of prompts in it, so refilling one slot at a time as rows finish
    ran many small prefills; a slot left empty for a few steps costs less."""
    return free > 0 and (free >= min(max(1, slots // 4), waiting) or free == slots)


def _decode_step(model, cache: SlotKVCache, ids: torch.Tensor, use_compile: bool) -> torch.Tensor:
    """ids (S,), each at its slot's length -> next-token logits (S, V) float32."""
    positions = cache.lengths.clone()  # a token's position is the count of tokens before it
    mask = cache.begin_step(fixed_shape=use_compile)  # (S, 1, 1, L)
    h = model.model.embed_tokens(ids.unsqueeze(1))  # (S, 1, D)
    cos, sin = model.rotary(positions.unsqueeze(1), h.dtype)  # (S, 1, 1, D)
    h = run_layers(model.model.layers, cache.layer_views(), h, cos, sin, mask, use_compile)
    return model.lm_head(model.model.norm(h[:, 0])).float()


@dataclass
class Decoding:
    """What every row of one call shares: budget, sampling, stopping."""
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    generators: list[torch.Generator] | None  # per prompt index; None when greedy
    use_compile: bool


class _Row:
    __slots__ = ("index", "tokens")

    def __init__(self, index: int):
        self.index, self.tokens = index, []


def _finish_text(tokenizer, tokens: list[int], stop: list[str]) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return cut_at_stop(text, stop)[0] if stop else text


@torch.inference_mode()
def decode_all(model, tokenizer, encoded: list[list[int]], order: list[int], slots: int, how: Decoding,
               on_done, shared_prefix: bool = True) -> None:
    """Generate for encoded[i], i in `order` (the queue), on `slots` rows at once; on_done(i, text)
    is called as each prompt finishes."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_ids
    longest_stop = max((len(s) for s in how.stop), default=0)
    queue = deque(order)
    prefix = SharedPrefix.compute(model, [encoded[i] for i in order]) if shared_prefix else None
    capacity = -(-(max(len(encoded[i]) for i in order) + how.max_new_tokens) // 64) * 64  # one shape per 64
    cfg = model.config
    # Keys and values are kept in float32 on a CPU: the decode step's attention computes in float32
    # (decoder.single_query_attention), and converting a bf16 cache's whole history every step cost
    # more than the step's attention itself at batch 16. Holding bf16 values in float32 is exact.
    cache_dtype = torch.float32 if model.device.type == "cpu" else model.dtype
    cache = SlotKVCache(cfg.num_hidden_layers, min(slots, len(order)), cfg.num_key_value_heads, cfg.head_dim,
                        capacity, cache_dtype, model.device)
    rows: list[_Row | None] = [None] * cache.slots
    logits = torch.zeros(cache.slots, cfg.vocab_size, dtype=torch.float32, device=model.device)

    while True:
        free = [s for s, row in enumerate(rows) if row is None]
        if queue and _time_to_refill(len(free), cache.slots, len(queue)):
            joining = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            prefilled, first_logits = _prefill(model, [encoded[i] for i in joining], pad_id, prefix)
            taken = free[:len(joining)]
            cache.fill(taken, prefilled)
            logits[taken] = first_logits
            for slot, index in zip(taken, joining):
                rows[slot] = _Row(index)
        live = [s for s, row in enumerate(rows) if row is not None]
        if not live:
            return
        next_ids = _choose(logits, live, rows, how)  # (S,) with pad_id in free slots
        next_list = next_ids.tolist()
        for slot in live:
            row, token = rows[slot], next_list[slot]
            finished = token in eos
            if not finished:
                row.tokens.append(token)
                finished = (len(row.tokens) >= how.max_new_tokens
                            or (how.stop and stop_in_tail(tokenizer, row.tokens, how.stop, longest_stop)))
            if finished:
                on_done(row.index, _finish_text(tokenizer, row.tokens, how.stop))
                rows[slot] = None
                cache.release(slot)
        live = [s for s, row in enumerate(rows) if row is not None]
        if not live:
            if not queue:
                return  # the last token needs no forward pass
            continue  # every slot is free: refill before the next step
        if not queue and not how.use_compile and len(live) <= cache.slots // 2:
            cache.keep(live)  # nothing left to join: decode the live rows only
            rows = [rows[s] for s in live]
            next_ids = next_ids[live]
            live = list(range(len(live)))
        active = torch.zeros(cache.slots, dtype=torch.bool, device=model.device)
        active[live] = True
        logits = _decode_step(model, cache, next_ids.masked_fill(~active, pad_id), how.use_compile)
        cache.advance(active)


def _choose(logits: torch.Tensor, live: list[int], rows: list, how: Decoding) -> torch.Tensor:
    """Next ids for every slot (S,): chosen for the live ones, whatever argmax gives elsewhere."""
    if how.temperature <= 0.0:
        return logits.argmax(dim=-1)
    chosen = logits.argmax(dim=-1)
    generators = [how.generators[rows[s].index] for s in live]
    chosen[live] = sample_next(logits[live], how.temperature, how.top_p, generators)
    return chosen
