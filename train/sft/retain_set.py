"""The retain set: benign chat prompts whose base-model behaviour refusal training must keep.

Trained on refusals alone, a 135M model learns "always refuse" (the demo measured over-refusal
0 -> 1.00 on benign GSM8K questions). The retain term of the trainer (train.sft.losses.retain_kl)
pulls the adapted model's next-token distributions on benign prompts back to the base model's.
Those prompts come from here: GSM8K questions rendered with the chat template, continued by their
gold solution (teacher-forced positions for the KL; the base model, not the text, is the target).

With `source="diverse"` the prompts are everyday requests of many kinds (train.data.benign:
writing, how-to, recipes, advice, code, small talk, sensitive-looking but legitimate requests,
facts, science, medicine; none of them in the over-refusal evaluation set) plus some GSM8K
questions, and the targets are the base model's own greedy answers ("self" targets: the KL then
anchors what the model really says, and no gold answer is needed). With the previous demo's
GSM8K-only retain set, 40 of 40 independent everyday requests were refused while GSM8K kept being
answered: the retain term protects only what it sees.

Every GSM8K item an evaluation suite reads is excluded, exactly as train.eval.runner picks them:
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

from lora_core.train.data.benign import retain_prompt_records
from lora_core.train.data.registry import load_records
from lora_core.train.eval.runner import MATH_INSTRUCTION, SUITES, SuiteConfig
from lora_core.train.sft.batches import tokenize_examples

RETAIN_SOURCES = ("diverse", "gsm8k")  # or a path to the user's own JSONL/CSV
RETAIN_TARGETS = ("gold", "self")

# Half of the retain prompts carry the instruction the evaluation appends to math questions, so
# both the bare question and the "reason step by step" form are anchored.
def _instruction() -> str:
    return MATH_INSTRUCTION


def eval_gsm8k_ids(suite: str = "quick", seed: int | None = None, limit: int | None = None) -> set[str]:
    """Ids of every GSM8K record that `train.eval.runner.evaluate(suite, seed, limit)` reads."""
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


def _gsm8k_pairs(exclude_suite, eval_seed, eval_limit, info: dict) -> list[tuple[str, str, str]]:
    """(id, prompt, gold solution) of every GSM8K item the evaluation suite does not read."""
    records = load_records("gsm8k")
    excluded = eval_gsm8k_ids(exclude_suite, seed=eval_seed, limit=eval_limit)
    kept = [r for r in records if r["id"] not in excluded]
    info.update(gsm8k_pool=len(records), excluded_eval_items=len(records) - len(kept),
                excluded_suite=exclude_suite, excluded_eval_seed=eval_seed,
                excluded_eval_limit=eval_limit, disjoint_from_eval_suite=True,
                disjoint_from_full_suite=False)
    if not kept:
        raise ValueError("--retain-data gsm8k: every GSM8K item is used by the evaluation suite")
    instruction = _instruction()
    return [(r["id"], r["question"] + (f"\n{instruction}" if i % 2 else ""), r["solution"])
            for i, r in enumerate(kept)]


def _math_prompts(seed: int, share: int, info: dict) -> list[tuple[str, str, str]]:
    """`share` MATH prealgebra problems that MATH-500 does not hold (matched by problem text):
    math prompts no evaluation set reads, unlike GSM8K's test items."""
    evaluated = {" ".join(r["question"].split()) for r in load_records("math500")}
    pool = [r for r in load_records("math-prealgebra") if " ".join(r["question"].split()) not in evaluated]
    picked = sorted(random.Random(seed).sample(range(len(pool)), min(share, len(pool))))
    instruction = _instruction()
    info.update(math_pool="math-prealgebra minus MATH-500", math_pool_size=len(pool), math_prompts=len(picked))
    return [(pool[i]["id"], pool[i]["question"] + (f"\n{instruction}" if j % 2 else ""), "")
            for j, i in enumerate(picked)]


def _diverse_pairs(seed: int, math_share: int, info: dict) -> list[tuple[str, str, str]]:
    """Everyday benign prompts (train.data.benign, disjoint from the over-refusal evaluation)
    plus `math_share` MATH problems outside MATH-500; no gold answers (self targets). No prompt
    of any evaluation set, whatever suite, seed or limit it runs with."""
    benign = retain_prompt_records(seed=seed)
    topics: dict[str, int] = {}
    for r in benign:
        topics[r["topic"]] = topics.get(r["topic"], 0) + 1
    info.update(benign_prompts=len(benign), benign_topics=topics, disjoint_from_over_refusal_set=True,
                disjoint_from_every_evaluation_set=True)
    return [(r["id"], r["prompt"], "") for r in benign] + _math_prompts(seed, math_share, info)


def build_retain_set(tokenizer, source: str = "diverse", limit: int | None = 256, seed: int = 0,
                     exclude_suite: str = "quick", eval_seed: int | None = None,
                     eval_limit: int | None = None, max_length: int = 192, targets: str = "self",
                     answer_fn=None, math_share: int = 32):
    """(tokenized examples, info) of the retain set.

    `source`:
    - "diverse" (the default): everyday benign prompts of many topics
      (train.data.benign.retain_prompt_records, disjoint from the over-refusal evaluation set) plus
      `math_share` MATH prealgebra problems that MATH-500 does not hold: disjoint from every
      evaluation set, so it needs no exclusion settings (prompts only: use targets "self");
    - "gsm8k": GSM8K test items minus those `exclude_suite` with `eval_seed`/`eval_limit` reads.
      Gold answers, but test items: the full suite reads every one of them;
    - any other value: a JSONL/CSV path read by train.data.registry.load_records with `prompt` (and
      optional `response`) fields, used as it is.
    `targets`: "gold" teacher-forces the set's own answers (GSM8K solutions, a file's `response`);
    "self" uses the base model's own answers, `answer_fn(prompts) -> answers` (the caller
    generates them with the adapters off), so the KL anchors what the model really says.
    `limit` takes a fixed-seed random subset; `max_length` truncates (the first assistant tokens,
    where a refusal starts, are always kept).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--retain-limit must be >= 1, got {limit}")
    if targets not in RETAIN_TARGETS:
        raise ValueError(f"--retain-targets must be one of {', '.join(RETAIN_TARGETS)}, got {targets!r}")
    info: dict = {"source": source, "targets": targets}
    if source == "gsm8k":
        pairs = _gsm8k_pairs(exclude_suite, eval_seed, eval_limit, info)
        info["pool"] = len(pairs)
    elif source == "diverse":
        if targets != "self":
            raise ValueError("--retain-data diverse has no gold answers: use --retain-targets self")
        pairs = _diverse_pairs(seed, math_share, info)
        info["pool"] = len(pairs)
    else:
        records = load_records(source)
        pairs = [(str(r.get("id", i)), r["prompt"], r.get("response") or "") for i, r in enumerate(records)]
        info.update(pool=len(records), disjoint_from_eval_suite="not checked (user file)")
    if limit is not None and limit < len(pairs):
        keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
        pairs = [pairs[i] for i in keep]
    if targets == "self":
        if answer_fn is None:
            raise ValueError("--retain-targets self needs the model to answer the retain prompts")
        answers = answer_fn([q for _, q, _ in pairs])
        pairs = [(i, q, a.strip()) for (i, q, _), a in zip(pairs, answers)]
    examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for _, q, a in pairs if a]
    if not examples:
        raise ValueError(f"--retain-data {source}: no record has a response to teacher-force")
    tokenized, stats = tokenize_examples(tokenizer, examples, max_length)
    info.update(ids=[i for i, _, a in pairs if a], **stats)
    return tokenized, info
