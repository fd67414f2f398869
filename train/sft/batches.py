"""Chat examples -> token ids with an assistant-only loss mask -> padded batches.

Each example is rendered with the model's own chat template. The tokens that carry loss are the
assistant's: for every assistant turn, the rendering of the conversation up to that turn with
`add_generation_prompt=True` is the prompt prefix, and the rendering that includes the turn ends it.
The end-of-turn marker the template writes after the reply is inside the span on purpose: a model
that is never trained on it does not learn to stop after refusing.

Rendered text is tokenised as a whole, and each prefix must tokenise to a token-prefix of the whole
(a template that rewrites earlier turns, or a BPE merge across the boundary, would silently shift the
mask). That is checked, and a violation is an error naming the example.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]          # IGNORE_INDEX outside assistant spans
    truncated: bool = False
    rebuilt: bool = False      # final turn rebuilt from the generation prompt (see render_conversation)


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


_PROBE = "\u2063lora-core-probe\u2063"


def render_conversation(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """The full training text, and whether the final turn had to be rebuilt.

    Normally the template's own rendering. Some reasoning templates rewrite the final assistant
    turn: DeepSeek-R1's drops everything up to `</think>` from assistant messages (it is meant for
    chat history) and opens `<think>\n` in its generation prompt. Training on that rendering would
    lose the reasoning line or break the prompt prefix. Then the text is rebuilt as the model sees
    it at inference: generation prompt + reply (minus the part the prompt already opened) + the
    template's end-of-turn text, found by rendering a probe reply.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    reply = messages[-1]["content"]
    if messages[-1]["role"] != "assistant" or "</think>" not in reply:
        return full, False
    prefix = _render(tokenizer, messages[:-1], add_generation_prompt=True)
    if full.startswith(prefix) and reply in full[len(prefix):]:
        return full, False
    probe = _render(tokenizer, messages[:-1] + [{"role": "assistant", "content": _PROBE}],
                    add_generation_prompt=False)
    if _PROBE not in probe:
        return full, False  # leave it to the prefix checks to report
    suffix = probe[probe.index(_PROBE) + len(_PROBE):]
    body = reply
    head = prefix.rstrip("\n")
    if reply.startswith("<think>") and head.endswith("<think>"):
        opened = prefix[len(head) - len("<think>"):]  # e.g. "<think>\n", already in the prompt
        body = reply[len(opened):] if reply.startswith(opened) else reply[len("<think>"):].lstrip("\n")
    return prefix + body + suffix, True


def tokenize_example(tokenizer, messages: list[dict], max_length: int | None = None,
                     index: int = 0) -> TokenizedExample:
    """Token ids and labels of one conversation; loss on every assistant turn."""
    if not getattr(tokenizer, "has_chat_template", True):
        raise ValueError("tokenizer has no chat template; SFT data needs one to render the turns")
    full_text, rebuilt = render_conversation(tokenizer, messages)
    ids = tokenizer.encode(full_text, add_special_tokens=False)
    labels = [IGNORE_INDEX] * len(ids)
    n_assistant = 0
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        n_assistant += 1
        last = turn == len(messages) - 1
        prefix_text = _render(tokenizer, messages[:turn], add_generation_prompt=True)
        upto_text = full_text if last else _render(tokenizer, messages[:turn + 1], add_generation_prompt=False)
        for part, name in ((prefix_text, "prompt prefix"), (upto_text, "rendering up to the turn")):
            if not full_text.startswith(part):
                raise ValueError(f"example {index}: the chat template's {name} for assistant turn "
                                 f"{turn} is not a text prefix of the full rendering (the template "
                                 "rewrites earlier turns); cannot mask the prompt reliably")
        prefix_ids = tokenizer.encode(prefix_text, add_special_tokens=False)
        upto_ids = ids if last else tokenizer.encode(upto_text, add_special_tokens=False)
        for part_ids, name in ((prefix_ids, "prompt prefix"), (upto_ids, "rendering up to the turn")):
            if ids[:len(part_ids)] != part_ids:
                at = next((i for i, (a, b) in enumerate(zip(ids, part_ids)) if a != b),
                          min(len(ids), len(part_ids)))
                raise ValueError(f"example {index}: the {name} of assistant turn {turn} does not "
                                 f"tokenise to a token-prefix of the full rendering (first "
                                 f"difference at token {at}); cannot mask the prompt reliably")
        if len(upto_ids) <= len(prefix_ids):
            raise ValueError(f"example {index}: assistant turn {turn} renders to no tokens")
        labels[len(prefix_ids):len(upto_ids)] = ids[len(prefix_ids):len(upto_ids)]
    if n_assistant == 0:
        raise ValueError(f"example {index}: no assistant turn to train on")
    truncated = False
    if max_length is not None and len(ids) > max_length:
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    return TokenizedExample(ids, labels, truncated, rebuilt)


def tokenize_examples(tokenizer, examples: list[dict],
                      max_length: int | None = 512) -> tuple[list[TokenizedExample], dict]:
    """Tokenise a data set; examples whose assistant tokens all fall past `max_length` are dropped."""
    if not examples:
        raise ValueError("the training data set is empty")
    out, dropped, truncated = [], 0, 0
    for i, example in enumerate(examples):
        tok = tokenize_example(tokenizer, example["messages"], max_length, index=i)
        # The first label predicts from position 0 after the shift inside the loss, so a single
        # supervised token at position 0 carries no loss: need one at position >= 1.
        if not any(l != IGNORE_INDEX for l in tok.labels[1:]):
            dropped += 1
            continue
        truncated += tok.truncated
        out.append(tok)
    if not out:
        raise ValueError(f"no example keeps an assistant token within max_length={max_length} "
                         f"({dropped} dropped); raise --max-length")
    stats = {"examples": len(out), "dropped_too_long": dropped, "truncated": truncated,
             "rebuilt_final_turn": sum(t.rebuilt for t in out),
             "tokens": sum(len(t.input_ids) for t in out),
             "loss_tokens": sum(sum(l != IGNORE_INDEX for l in t.labels) for t in out)}
    return out, stats


def pad_token_id_of(tokenizer) -> int | None:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(examples: list[TokenizedExample], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask (1 = token), labels (pads ignored)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    pad = 0 if pad_token_id is None else int(pad_token_id)
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)      # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so resume can rebuild it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def step_batch(examples: list, per_step: int, step: int, seed: int, pad_token_id) -> dict[str, torch.Tensor]:
    """The batch of a side term (retain KL, refusal unlikelihood) at optimiser `step`: `per_step`
    examples, cycling through reshuffled epochs of `examples`. A pure function of the step, so a
    resumed run sees the same batches."""
    per = min(per_step, len(examples))
    n_batches = len(examples) // per
    epoch, index = divmod(step, n_batches)
    batches = micro_batches(n_batches * per, per, epoch, seed)
    return collate([examples[i] for i in batches[index]], pad_token_id)


def micro_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Index lists of the micro-batches of one epoch (the last one may be short)."""
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    order = epoch_order(n, epoch, seed)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
