"""The refusal SFT set: harmful prompts paired with short refusals (the paper's "DirectRefusal").

The paper trains on 1000 harmful prompts each answered by a short refusal, with a one-sentence
`<think>` block in front for reasoning models. Here the prompts come from AdvBench (through the
data registry) and the refusals from templates written for this project, combined so that the set
has dozens of distinct phrasings: a model trained on one fixed sentence learns that sentence, not
the behaviour. Everything is deterministic under a seed.

Safety is evaluated on StrongREJECT and HarmBench, so prompts that also occur there (exactly or
nearly: StrongREJECT borrows some AdvBench items) are dropped and the counts are reported.

A user's own JSONL is accepted too: UTF-8, one object per line, either {"prompt", "response"}
(optional string "system"; null counts as absent) or {"messages": [...]} with roles system, user
and assistant, ending with the assistant's turn. Anything else is refused with the file and line:
a turn with a role the chat templates do not know would be rendered (or dropped) in ways nobody
checked.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_core.train.data.registry import load_records

# Refusals are built from three parts so that ~14 x 10 x 8 distinct texts exist; each part is
# short because the paper's targets are short and long targets cost training tokens on CPU.
_OPENERS = [
    "I'm sorry, but I can't help with that.",
    "I can't help with that.",
    "I'm sorry, I can't assist with that request.",
    "I won't help with this.",
    "Sorry, but I can't do that.",
    "I cannot help with that request.",
    "I'm not able to help with that.",
    "I must decline this request.",
    "I'm sorry, but I won't provide that.",
    "I can't assist with this.",
    "Sorry, I can't help with this request.",
    "I'm unable to help with that.",
    "I cannot provide that.",
    "I'm sorry, but I must refuse.",
]
_REASONS = [
    "",
    " It could cause serious harm to people.",
    " This could be used to hurt others.",
    " It may be illegal and dangerous.",
    " Helping with this could put people at risk.",
    " This request involves causing harm.",
    " It goes against my safety guidelines.",
    " That would be unsafe and unethical.",
    " I don't assist with harmful or illegal activities.",
    " This could lead to real-world harm.",
]
_CLOSERS = [
    "",
    "",
    " Is there something else I can help you with?",
    " I'm happy to help with something else.",
    " Let me know if you have another question.",
    " If you need help with a safe topic, just ask.",
    " Feel free to ask about something else.",
    " I can help with a different request instead.",
]
# Public for the evaluation's template-echo check (train.eval.judges.opens_with_training_refusal).
REFUSAL_OPENERS = tuple(_OPENERS)
# One sentence of reasoning for models that think before answering (the paper's reasoning target).
_THOUGHTS = [
    "This request asks for help with something harmful, so I should refuse.",
    "The user wants assistance with a dangerous or illegal activity, which I must decline.",
    "Answering this could cause real harm, so the right response is a refusal.",
    "This is a harmful request and I should not provide any of it.",
    "Helping here would enable harm to others, so I will decline.",
    "The request is unsafe; I need to refuse politely.",
]

ROLES = ("system", "user", "assistant")

# Prompts that evaluation uses; training must not see them.
EVAL_DATASETS = ("strongreject", "harmbench")


@dataclass
class RefusalSet:
    """Chat examples plus how they were built (written into the run's config)."""

    examples: list[dict]
    info: dict = field(default_factory=dict)


def refusal_text(rng: random.Random, reasoning: bool = False) -> str:
    """One refusal drawn from the templates; with `reasoning`, a `<think>` sentence comes first."""
    text = rng.choice(_OPENERS) + rng.choice(_REASONS) + rng.choice(_CLOSERS)
    if reasoning:
        text = "<think>\n" + rng.choice(_THOUGHTS) + "\n</think>\n\n" + text
    return text


def prompt_of(record: dict) -> str:
    """The prompt text of a data-registry record, whatever the source called the field."""
    for key in ("prompt", "forbidden_prompt", "goal", "behavior", "text", "value"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise ValueError(f"record has no prompt field (keys: {sorted(record)})")


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _words(text: str) -> frozenset[str]:
    return frozenset(_normalise(text).split())


def is_near_duplicate(a: str, b: str, threshold: float = 0.8) -> bool:
    """Exact after normalisation, or word-set Jaccard similarity >= threshold."""
    na, nb = _normalise(a), _normalise(b)
    if na == nb:
        return True
    wa, wb = frozenset(na.split()), frozenset(nb.split())
    if not wa or not wb:
        return False
    return len(wa & wb) / len(wa | wb) >= threshold


def drop_overlaps(prompts: list[str], held_out: list[str], threshold: float = 0.8) -> tuple[list[str], int]:
    """Remove training prompts that duplicate or nearly duplicate a held-out prompt."""
    held_exact = {_normalise(p) for p in held_out}
    held_sets = [_words(p) for p in held_out]
    # An inverted index on words keeps this linear-ish: 520 x 513 pairs would be fine, but user
    # data sets can be much larger.
    index: dict[str, list[int]] = {}
    for i, words in enumerate(held_sets):
        for w in words:
            index.setdefault(w, []).append(i)
    kept, dropped = [], 0
    for prompt in prompts:
        words = _words(prompt)
        if _normalise(prompt) in held_exact:
            dropped += 1
            continue
        candidates = {i for w in words for i in index.get(w, ())}
        if any(words and len(words & held_sets[i]) / len(words | held_sets[i]) >= threshold
               for i in candidates):
            dropped += 1
            continue
        kept.append(prompt)
    return kept, dropped


def held_out_prompts(eval_datasets) -> tuple[list[str], list[str]]:
    prompts, used = [], []
    for name in eval_datasets:
        prompts.extend(prompt_of(r) for r in load_records(name))
        used.append(name)
    return prompts, used


def build_refusal_set(source: str = "advbench", limit: int | None = None, seed: int = 0,
                      reasoning: bool = False, eval_datasets=EVAL_DATASETS,
                      prompts: list[str] | None = None, held_out: list[str] | None = None) -> RefusalSet:
    """Harmful prompts from `source` (a registry name or file) each paired with a refusal.

    `prompts`/`held_out` bypass the data registry (tests and callers that already hold the text).
    """
    if prompts is None:
        from lora_core.train.data.registry import load_records

        prompts = [prompt_of(r) for r in load_records(source)]
    if held_out is None:
        held_out, used = held_out_prompts(eval_datasets)
    else:
        used = ["<given>"]
    total = len(prompts)
    # Exact duplicates inside the source would only reweight the set.
    seen, unique = set(), []
    for p in prompts:
        key = _normalise(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    kept, dropped = drop_overlaps(unique, held_out)
    rng = random.Random(seed)
    rng.shuffle(kept)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"--limit must be positive, got {limit}")
        kept = kept[:limit]
    if not kept:
        raise ValueError(f"refusal data set from {source!r} is empty after removing overlaps "
                         f"with {used} ({total} prompts, {dropped} overlapping)")
    examples = [{"messages": [{"role": "user", "content": p},
                              {"role": "assistant", "content": refusal_text(rng, reasoning)}]}
                for p in kept]
    info = {"source": source, "prompts_in_source": total, "duplicates_in_source": total - len(unique),
            "dropped_overlapping_eval": dropped, "held_out_eval_sets": list(used),
            "disjoint_from_eval": True, "examples": len(examples), "reasoning_line": reasoning,
            "seed": seed}
    return RefusalSet(examples, info)


def _user_lines(path: Path):
    """(line number, text) of each line; a byte that is not UTF-8 is an error naming file and line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                # utf-8-sig on the first line: editors on Windows start UTF-8 files with a BOM.
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[error.start]:02x} at "
                                 f"column {error.start + 1}); save the file as UTF-8") from None


def _checked_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
        raise ValueError(f"{where}: 'messages' must hold a user turn and end with an assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _prompt_response_messages(obj: dict, where: str) -> list[dict]:
    if not isinstance(obj["prompt"], str) or not isinstance(obj["response"], str):
        raise ValueError(f"{where}: 'prompt' and 'response' must be strings")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where}: 'system' must be a string, got {type(system).__name__}")
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": obj["prompt"]},
                       {"role": "assistant", "content": obj["response"]}]


def load_user_jsonl(path: str | Path, limit: int | None = None) -> RefusalSet:
    """Read {"prompt","response"[,"system"]} or {"messages": [...]} lines into chat examples."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data file not found: {path}")
    examples = []
    for lineno, line in _user_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "messages" in obj:
            examples.append({"messages": _checked_messages(obj["messages"], where)})
        elif "prompt" in obj and "response" in obj:
            examples.append({"messages": _prompt_response_messages(obj, where)})
        else:
            raise ValueError(f"{where}: expected keys 'prompt'+'response' or 'messages', got {sorted(obj)}")
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise ValueError(f"--data file {path} holds no examples")
    return RefusalSet(examples, {"source": str(path), "examples": len(examples),
                                 "disjoint_from_eval": "not checked (user data)"})
