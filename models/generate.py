"""Text generation for evaluation and chat: continuous batching over a slot KV cache, greedy or
nucleus sampling.

Prompts are queued longest first and decoded on `batch_size` slots at once; a prompt whose answer
is finished hands its slot to the next one (continuous_batching.py), and the answers come back in
the caller's order. Each decode step runs at fixed shapes, so the same step can be compiled once
per shape bucket (compile_utils.py), and on CPU its matmuls use pre-packed weights
(packed_linear.py). A sequence stops at any EOS id of the tokenizer, at max_new_tokens, or when a
stop string appears in its new text (the text is cut before the stop string).
"""
from __future__ import annotations

from lora_core.common.progress import progress as progress_bar

from .compile_utils import compile_requested
from .continuous_batching import Decoding, decode_all
from .packed_linear import packed_linears
from .sampling import prompt_generator


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop: list[str] | str | None = None, batch_size: int = 8, seed: int = 0,
             progress: bool = True, add_special_tokens: bool | None = None,
             compile: bool | None = None, share_prefix: bool = True) -> list[str]:
    """Continue each (already chat-rendered) prompt; returns only the new text, in prompt order.

    temperature 0 -> greedy; otherwise softmax(logits / temperature) with nucleus `top_p`, each
    prompt drawing from a generator of its own seeded from (`seed`, its index in `prompts`), so
    its samples do not depend on batch_size or on the other prompts. batch_size: how many prompts
    decode at once. add_special_tokens: None = add the tokenizer's specials (BOS) unless the
    prompt already starts with the BOS text, as chat templates do. compile: torch.compile the
    decode step's decoder layer (None = the LORA_CORE_COMPILE environment variable, off when
    unset); see compile_utils.py for its cost and fallback. share_prefix: prefill the prefix all
    prompts share once (False: each prompt in full; the same tokens up to rounding).
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
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
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

    generators = None
    if temperature > 0:
        generators = [prompt_generator(seed, i, model.device) for i in range(len(prompts))]
    how = Decoding(max_new_tokens, temperature, top_p, stop, generators, use_compile)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[str | None] = [None] * len(prompts)
    # progress True/None: a bar on a terminal, a line now and then in a log; False: silent.
    bar = progress_bar(total=len(prompts), desc="generate", unit="prompt", enabled=False if progress is False else None)

    def done(index: int, text: str) -> None:
        results[index] = text
        bar.update(1)

    # Packed weights serve the eager step. The compiled layers keep their modules' own forward
    # (a patched forward closes over per-layer packs, and dynamo would compile once per layer);
    # lm_head runs outside them, a fifth of the weights, and stays packed either way.
    packed_root = model.lm_head if use_compile else model
    try:
        with packed_linears(packed_root, min(batch_size, len(prompts))):
            decode_all(model, tokenizer, encoded, order, batch_size, how, done, shared_prefix=share_prefix)
    finally:
        bar.close()
    return results  # type: ignore[return-value]
