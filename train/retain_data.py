"""The retain set: benign chat prompts whose base-model behaviour refusal training must keep.

Trained on refusals alone, a 135M model learns "always refuse" (the demo measured over-refusal
0 -> 1.00 on benign GSM8K questions). The retain term of the trainer (train.trainer.retain_kl)
pulls the adapted model's next-token distributions on benign prompts back to the base model's.
Those prompts come from here: GSM8K questions rendered with the chat template, continued by their
gold solution (teacher-forced positions for the KL; the base model, not the text, is the target).

Every GSM8K item an evaluation suite reads is excluded, exactly as train.evaluate picks them:
the exact-match/over-refusal subset and the bits-per-byte subset (load_records(limit, seed)) and
the drift subset (load_records(limit, seed + 1)). The GSM8K registered here is the test split
(1319 items); the quick suite reads at most 40 + 8 + 16 of them, so about 1260 remain. The *full*
suite reads every GSM8K item, so no GSM8K retain set can be disjoint from it: `info` says so
(`disjoint_from_full_suite: False`), and full-suite GSM8K numbers of a model trained with a
GSM8K retain set should be read with that in mind. Pass a JSONL of your own (`--retain-data`) for
a retain set disjoint from everything.
"""
from __future__ import annotations

import random

from train.sft_batches import tokenize_examples

# Half of the retain prompts carry the instruction the evaluation appends to math questions, so
# both the bare question and the "reason step by step" form are anchored.
def _instruction() -> str:
    from train.evaluate import MATH_INSTRUCTION

    return MATH_INSTRUCTION


def eval_gsm8k_ids(suite: str = "quick", seed: int | None = None, limit: int | None = None) -> set[str]:
    """Ids of every GSM8K record that `train.evaluate.evaluate(suite, seed, limit)` reads."""
    from train.datasets import load_records
    from train.evaluate import SUITES, SuiteConfig

    if isinstance(suite, SuiteConfig):
        cfg = suite
    elif suite in SUITES:
        cfg = SUITES[suite]
    else:
        raise ValueError(f"--retain-exclude-suite {suite!r}: expected one of {', '.join(SUITES)}")
    cfg = cfg.with_limit(limit)
    base_seed = cfg.seed if seed is None else seed
    ids: set[str] = set()
    picks = [(cfg.math_generation.get("gsm8k", 0), base_seed), (cfg.bpb.get("gsm8k", 0), base_seed),
             (cfg.drift, base_seed + 1)]
    for n, s in picks:
        if n == 0:
            continue
        ids.update(r["id"] for r in load_records("gsm8k", limit=n, seed=s))
    return ids


def build_retain_set(tokenizer, source: str = "gsm8k", limit: int | None = 256, seed: int = 0,
                     exclude_suite: str = "quick", eval_seed: int | None = None,
                     eval_limit: int | None = None, max_length: int = 192):
    """(tokenized examples, info) of the retain set.

    `source` "gsm8k" uses the registered GSM8K minus the evaluation items of `exclude_suite` with
    `eval_seed`/`eval_limit` (as the run evaluates); any other value is a JSONL/CSV path read by
    train.datasets.load_records with `prompt` (and optional `response`) fields, used as it is.
    `limit` takes a fixed-seed random subset; `max_length` truncates (the first assistant tokens,
    where a refusal starts, are always kept).
    """
    from train.datasets import load_records

    if limit is not None and limit < 1:
        raise ValueError(f"--retain-limit must be >= 1, got {limit}")
    info: dict = {"source": source}
    if source == "gsm8k":
        records = load_records("gsm8k")
        excluded = eval_gsm8k_ids(exclude_suite, seed=eval_seed, limit=eval_limit)
        kept = [r for r in records if r["id"] not in excluded]
        info.update(pool=len(records), excluded_eval_items=len(records) - len(kept),
                    excluded_suite=exclude_suite, excluded_eval_seed=eval_seed,
                    excluded_eval_limit=eval_limit, disjoint_from_eval_suite=True,
                    disjoint_from_full_suite=False)
        if not kept:
            raise ValueError("--retain-data gsm8k: every GSM8K item is used by the evaluation suite")
        instruction = _instruction()
        pairs = [(r["id"], r["question"] + (f"\n{instruction}" if i % 2 else ""), r["solution"])
                 for i, r in enumerate(kept)]
    else:
        records = load_records(source)
        pairs = [(str(r.get("id", i)), r["prompt"], r.get("response") or "") for i, r in enumerate(records)]
        info.update(pool=len(records), disjoint_from_eval_suite="not checked (user file)")
    if limit is not None and limit < len(pairs):
        keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
        pairs = [pairs[i] for i in keep]
    examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for _, q, a in pairs if a]
    if not examples:
        raise ValueError(f"--retain-data {source}: no record has a response to teacher-force")
    tokenized, stats = tokenize_examples(tokenizer, examples, max_length)
    info.update(ids=[i for i, _, a in pairs if a], **stats)
    return tokenized, info
