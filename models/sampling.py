"""Choosing the next token, and the stop-string checks generation runs after each one.

Sampled rows draw from a generator of their own, seeded from (seed, the prompt's index in the
caller's list): a prompt's samples then depend on the seed and the prompt alone, not on which
other prompts shared its batch, the batch size, or when it joined a continuous batch.
"""
from __future__ import annotations

import numpy as np
import torch


def prompt_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator prompt `index` of a call seeded with `seed` samples from.

    SeedSequence mixes the pair into one 64-bit seed, so neighbouring indices (and seeds) get
    unrelated streams, which seed + index would not guarantee.
    """
    mixed = int(np.random.SeedSequence([int(seed) & (2**63 - 1), int(index)]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(mixed)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generators: list[torch.Generator] | torch.Generator | None) -> torch.Tensor:
    """logits (B, V) float32 -> next ids (B,).

    temperature 0 is greedy (argmax, no draw). Otherwise softmax(logits / temperature), cut to the
    smallest prefix of the sorted distribution whose mass reaches top_p (the top token always
    stays), and one draw per row from that row's generator (one generator shared by the rows
    when a single one is given).
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        drop = (probs.cumsum(-1) - probs) >= top_p
        probs = probs.masked_fill(drop, 0.0)
    if generators is None or isinstance(generators, torch.Generator):
        choice = torch.multinomial(probs, 1, generator=generators)  # (B, 1)
    else:
        if len(generators) != probs.shape[0]:
            raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
        choice = torch.cat([torch.multinomial(row.unsqueeze(0), 1, generator=g)
                            for row, g in zip(probs, generators)])  # (B, 1)
    if order is not None:
        choice = order.gather(-1, choice)
    return choice.squeeze(-1)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` cut before the first stop string it contains, and whether there was one."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_in_tail(tokenizer, ids: list[int], stop: list[str], longest: int) -> bool:
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
