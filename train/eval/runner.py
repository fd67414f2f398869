"""The evaluation suites: safety (refusal, over-refusal) and reasoning (exact match, BPB, ARC, drift).

`evaluate(model, tokenizer, suite="quick"|"full", ...)` is what `lora-core eval` and the training
workflow call. It returns a results dict

    {"meta": {...}, "metrics": {"<group>.<task>.<measure>": {"value", "n", "stderr", ...}},
     "timings": {"<part>": wall seconds}, "cpu_timings": {"<part>": process CPU seconds}}

and, with `out_dir`, writes results.json, results.md and generations.jsonl there.

What each measure is (conventions that change numbers are stated here once):
- safety.<set>.refusal_rate: share of harmful prompts (StrongREJECT, HarmBench) whose greedy answer,
  generated through the model's chat template, the judge calls a refusal. With the keyword judge,
  an off-topic answer counts as a refusal (as in pyrit's human labels); `explicit_refusal_rate`
  counts only declining/apology phrases.
- safety.over_refusal.rate: share of the diverse benign set (train.data.benign: everyday requests
  in 12 topics, a good share of them sensitive-looking but legitimate) whose greedy answer opens
  with an explicit refusal phrase; safety.over_refusal.<topic>.rate per topic, so "refuses code
  questions" is visible. The quick suite takes a topic-stratified subset, the full suite all of it.
- reasoning.<gsm8k|math500>.refusal_rate: the same judge on the math generations below (a model
  that keeps answering math can still refuse everything else: that is what the set above is for).
- reasoning.<gsm8k|math500>.exact_match: chat prompt asking for a \\boxed{} answer, greedy decoding,
  `train.eval.answers.extract_answer` + `answers_match` against the gold answer.
- reasoning.<gsm8k|math500>.bpb: bits per byte of the gold solution given "Question: ...\\nAnswer:"
  (GSM8K; its solution is the cleaned chain ending "So the answer is N.") or
  "Problem:\\n...\\n\\nSolution:" (MATH-500), zero-shot, no chat template.
- reasoning.<arc-easy|arc-challenge>.acc / acc_norm: log-likelihood of each " choice" given
  "Question: ...\\nAnswer:" (OLMES's rc formulation), acc_norm per UTF-8 byte.
- drift.kl_base: mean per-token KL(base || model) on chat-formatted GSM8K questions continued by
  their gold solutions (teacher-forced); only when `base_model` is given.
- reasoning.humaneval.pass_at_1: greedy chat completion of each HumanEval function, run against
  its unit tests in a separate limited process (train.eval.code_runner); only with
  `allow_code_execution=True`, otherwise skipped and said so in results["meta"]["skipped"].
Subsets are fixed-seed random samples (`train.data.registry.load_records(limit=..., seed=...)`), so two
models evaluated with the same suite see the same items.
"""
from __future__ import annotations

import dataclasses
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train.eval.answers import answers_match, extract_answer
from train.data.benign import over_refusal_records
from train.data.registry import load_records
from train.eval.judges import KeywordRefusalJudge, RefusalJudge
from train.eval.metrics import bits_per_byte, choice_accuracy, kl_drift, proportion, score_continuations

__all__ = ["SuiteConfig", "SUITES", "MATH_INSTRUCTION", "evaluate", "chat_prompt"]

# Declining or apology phrases only: an answer to a benign request or a math question may share no
# word with it and still be helpful, so the off-topic rule (for harmful prompts) is left out.
_EXPLICIT = KeywordRefusalJudge(off_topic=False)

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class SuiteConfig:
    """Subset sizes (None = whole set, 0 = skip) and generation lengths of one suite."""

    safety: dict[str, int | None] = field(default_factory=lambda: {"strongreject": 24, "harmbench": 0})
    safety_max_new_tokens: int = 48
    over_refusal: int | None = 48  # diverse benign prompts (train.data.benign), stratified by topic
    math_generation: dict[str, int | None] = field(default_factory=lambda: {"gsm8k": 8, "math500": 0})
    math_max_new_tokens: int = 160
    bpb: dict[str, int | None] = field(default_factory=lambda: {"gsm8k": 40, "math500": 16})
    arc: dict[str, int | None] = field(default_factory=lambda: {"arc-easy": 48, "arc-challenge": 48})
    drift: int | None = 16
    humaneval: int | None = 0  # runs only with allow_code_execution=True (see train.eval.code_runner)
    humaneval_max_new_tokens: int = 384
    batch_size: int = 8
    seed: int = 0

    def with_limit(self, limit: int | None) -> "SuiteConfig":
        """Every non-skipped subset capped at `limit` items (None leaves the suite as it is)."""
        if limit is None:
            return self
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")

        def one(v):
            return v if v == 0 else limit if v is None else min(v, limit)

        def cap(d):
            return {k: one(v) for k, v in d.items()}

        return dataclasses.replace(
            self, safety=cap(self.safety), math_generation=cap(self.math_generation),
            bpb=cap(self.bpb), arc=cap(self.arc), over_refusal=one(self.over_refusal),
            humaneval=one(self.humaneval), drift=one(self.drift))


SUITES: dict[str, SuiteConfig] = {
    "quick": SuiteConfig(),
    "full": SuiteConfig(
        safety={"strongreject": None, "harmbench": None}, safety_max_new_tokens=256, over_refusal=None,
        math_generation={"gsm8k": None, "math500": None}, math_max_new_tokens=512,
        bpb={"gsm8k": None, "math500": None}, arc={"arc-easy": None, "arc-challenge": None},
        drift=200, humaneval=None),
}


class _Timings:
    """Wall-clock and process-CPU seconds per part. On a shared machine the CPU seconds are the
    better estimate of what the part costs on an idle one (wall time includes waiting for cores)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def record(self, key: str, start: tuple[float, float]) -> None:
        self.wall[key] = time.perf_counter() - start[0]
        self.cpu[key] = time.process_time() - start[1]


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def chat_prompt(tokenizer, user_text: str) -> str:
    """One user turn rendered with the model's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                         add_generation_prompt=True)


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "has_chat_template", False):
        raise ValueError("the tokenizer has no chat template: safety and exact-match tasks prompt "
                         "the model as a chat assistant (use a chat/instruct checkpoint, or a "
                         "suite with safety and math_generation set to 0)")


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, desc):
    from models import generate

    if progress is not False:
        print(f"lora-core eval: {desc} ({len(prompts)} prompts, <= {max_new_tokens} new tokens)",
              file=sys.stderr)
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                    batch_size=batch_size, progress=progress)


def _subsets(sizes: dict[str, int | None], seed: int):
    """(name, fixed-seed records, start time) of every set a suite does not skip (size 0)."""
    for name, limit in sizes.items():
        if limit != 0:
            start = _now()
            yield name, load_records(name, limit=limit, seed=seed), start


def _chat_answers(model, tokenizer, user_texts, cfg, progress, desc) -> list[str]:
    """Greedy answers to single user turns rendered with the model's chat template."""
    return _generate(model, tokenizer, [chat_prompt(tokenizer, t) for t in user_texts],
                     cfg.safety_max_new_tokens, cfg.batch_size, progress, desc)


def _run_safety(model, tokenizer, cfg, judge, progress, metrics, generations, timings):
    for name, records, start in _subsets(cfg.safety, cfg.seed):
        prompts = [r["prompt"] for r in records]
        responses = _chat_answers(model, tokenizer, prompts, cfg, progress, f"safety/{name}")
        refused = judge.judge(prompts, responses)
        refused_explicit = _EXPLICIT.judge(prompts, responses)
        metrics[f"safety.{name}.refusal_rate"] = proportion(sum(refused), len(refused))
        metrics[f"safety.{name}.explicit_refusal_rate"] = proportion(sum(refused_explicit), len(refused))
        for r, resp, ref in zip(records, responses, refused):
            generations.append({"task": f"safety.{name}", "id": r["id"], "prompt": r["prompt"],
                                "response": resp, "refusal": bool(ref)})
        timings.record(f"safety.{name}", start)


def _run_over_refusal(model, tokenizer, cfg, progress, metrics, generations, timings):
    if cfg.over_refusal == 0:
        return
    start = _now()
    records = over_refusal_records(limit=cfg.over_refusal, seed=cfg.seed)
    responses = _chat_answers(model, tokenizer, [r["prompt"] for r in records], cfg, progress,
                              "over-refusal (benign)")
    rows = [{"task": "safety.over_refusal", "id": r["id"], "topic": r["topic"], "source": r["source"],
             "prompt": r["prompt"], "response": resp,
             "refusal": _EXPLICIT.is_refusal(resp)}
            for r, resp in zip(records, responses)]
    generations.extend(rows)
    metrics["safety.over_refusal.rate"] = proportion(sum(r["refusal"] for r in rows), len(rows))
    for topic in sorted({r["topic"] for r in rows}):
        flags = [r["refusal"] for r in rows if r["topic"] == topic]
        metrics[f"safety.over_refusal.{topic}.rate"] = proportion(sum(flags), len(flags))
    timings.record("safety.over_refusal", start)


def _run_math_generation(model, tokenizer, cfg, progress, metrics, generations, timings):
    for name, records, start in _subsets(cfg.math_generation, cfg.seed):
        prompts = [chat_prompt(tokenizer, f"{r['question']}\n{MATH_INSTRUCTION}") for r in records]
        responses = _generate(model, tokenizer, prompts, cfg.math_max_new_tokens, cfg.batch_size,
                              progress, f"exact match/{name}")
        correct = refusals = 0
        for r, resp in zip(records, responses):
            predicted = extract_answer(resp)
            ok = answers_match(predicted, r["answer"])
            refused = _EXPLICIT.is_refusal(resp)
            correct += ok
            refusals += refused
            generations.append({"task": f"reasoning.{name}", "id": r["id"], "prompt": r["question"],
                                "response": resp, "extracted": predicted, "gold": r["answer"],
                                "correct": bool(ok), "refusal": bool(refused)})
        metrics[f"reasoning.{name}.exact_match"] = proportion(correct, len(records))
        metrics[f"reasoning.{name}.refusal_rate"] = proportion(refusals, len(records))
        timings.record(f"reasoning.{name}.generation", start)


def _bpb_pairs(name, records):
    if name == "gsm8k":
        return [f"Question: {r['question']}\nAnswer:" for r in records], [" " + r["solution"] for r in records]
    return [f"Problem:\n{r['question']}\n\nSolution:" for r in records], [" " + r["solution"] for r in records]


def _run_bpb(model, tokenizer, cfg, progress, metrics, timings):
    for name, records, start in _subsets(cfg.bpb, cfg.seed):
        contexts, continuations = _bpb_pairs(name, records)
        scores = score_continuations(model, tokenizer, contexts, continuations, cfg.batch_size,
                                     progress_bar=False if progress is False else None, desc=f"BPB/{name}")
        metrics[f"reasoning.{name}.bpb"] = bits_per_byte(scores)
        timings.record(f"reasoning.{name}.bpb", start)


def _run_arc(model, tokenizer, cfg, progress, metrics, timings):
    for name, records, start in _subsets(cfg.arc, cfg.seed):
        contexts = [r["query"] for r in records for _ in r["choices"]]
        continuations = [" " + c for r in records for c in r["choices"]]
        flat = score_continuations(model, tokenizer, contexts, continuations, cfg.batch_size * 2,
                                   progress_bar=False if progress is False else None, desc=f"log-likelihood/{name}")
        grouped, pos = [], 0
        for r in records:
            grouped.append(flat[pos:pos + len(r["choices"])])
            pos += len(r["choices"])
        acc = choice_accuracy(grouped, [r["gold"] for r in records])
        metrics[f"reasoning.{name}.acc"] = acc["acc"]
        metrics[f"reasoning.{name}.acc_norm"] = acc["acc_norm"]
        timings.record(f"reasoning.{name}", start)


def _run_humaneval(model, tokenizer, cfg, progress, metrics, generations, timings, allow, skipped):
    if cfg.humaneval == 0:
        return
    from train.eval.code_runner import extract_code, humaneval_program, run_program, sandbox_available

    if not allow:
        skipped.append("humaneval: generated code runs only with allow_code_execution / --execute-code")
        return
    if not sandbox_available():
        skipped.append("humaneval: no POSIX resource limits on this platform")
        return
    start = _now()
    records = load_records("humaneval", limit=cfg.humaneval, seed=cfg.seed)
    prompts = [chat_prompt(tokenizer, "Complete the following Python function. Reply with the whole "
                           f"function in a ```python code block.\n\n```python\n{r['prompt']}```")
               for r in records]
    responses = _generate(model, tokenizer, prompts, cfg.humaneval_max_new_tokens, cfg.batch_size,
                          progress, "humaneval")
    passed = 0
    for r, resp in zip(records, responses):
        outcome = run_program(humaneval_program(r, extract_code(resp)))
        passed += outcome["status"] == "passed"
        generations.append({"task": "reasoning.humaneval", "id": r["id"], "prompt": r["prompt"],
                            "response": resp, "status": outcome["status"]})
    metrics["reasoning.humaneval.pass_at_1"] = proportion(passed, len(records))
    timings.record("reasoning.humaneval", start)


def _run_drift(model, base_model, tokenizer, cfg, progress, metrics, timings):
    if cfg.drift == 0 or base_model is None:
        return
    start = _now()
    records = load_records("gsm8k", limit=cfg.drift, seed=cfg.seed + 1)
    contexts = [chat_prompt(tokenizer, r["question"]) for r in records]
    continuations = [r["solution"] for r in records]
    # The chat template already opens the sequence with its own special tokens.
    metrics["drift.kl_base"] = kl_drift(base_model, model, tokenizer, contexts, continuations,
                                        cfg.batch_size, add_special_tokens=False,
                                        progress_bar=False if progress is False else None)
    timings.record("drift", start)


def evaluate(model, tokenizer, suite: str | SuiteConfig = "quick", base_model=None,
             out_dir: str | Path | None = None, progress: bool | None = True,
             max_new_tokens: int | None = None, batch_size: int | None = None,
             limit: int | None = None, judge: RefusalJudge | None = None, seed: int | None = None,
             meta: dict | None = None, allow_code_execution: bool = False) -> dict:
    """Run a suite on `model` (see module docstring); returns the results dict.

    max_new_tokens overrides both generation lengths; batch_size, limit (cap on every subset) and
    seed override the suite's. `base_model` (same tokenizer) enables the KL drift measure.
    `meta` is merged into results["meta"] (e.g. the model source and adapter path).
    `allow_code_execution` lets HumanEval run model-written code (in a limited subprocess).
    """
    if isinstance(suite, str):
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
        cfg, suite_name = SUITES[suite], suite
    elif isinstance(suite, SuiteConfig):
        cfg, suite_name = suite, "custom"
    else:
        raise TypeError(f"suite must be a name or SuiteConfig, got {type(suite).__name__}")
    cfg = cfg.with_limit(limit)
    overrides = {}
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        overrides.update(safety_max_new_tokens=max_new_tokens, math_max_new_tokens=max_new_tokens)
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        overrides["batch_size"] = batch_size
    if seed is not None:
        overrides["seed"] = seed
    cfg = dataclasses.replace(cfg, **overrides)
    needs_chat = (any(v != 0 for v in cfg.safety.values()) or cfg.over_refusal != 0
                  or any(v != 0 for v in cfg.math_generation.values())
                  or (cfg.humaneval != 0 and allow_code_execution))
    if needs_chat:
        _require_chat_template(tokenizer)
    judge = judge if judge is not None else KeywordRefusalJudge()

    metrics: dict[str, dict] = {}
    generations: list[dict] = []
    timings = _Timings()
    skipped: list[str] = []
    if base_model is None and cfg.drift != 0:
        skipped.append("drift: no base model given")
    start = _now()
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            _run_safety(model, tokenizer, cfg, judge, progress, metrics, generations, timings)
            _run_over_refusal(model, tokenizer, cfg, progress, metrics, generations, timings)
            _run_math_generation(model, tokenizer, cfg, progress, metrics, generations, timings)
            _run_bpb(model, tokenizer, cfg, progress, metrics, timings)
            _run_arc(model, tokenizer, cfg, progress, metrics, timings)
            _run_humaneval(model, tokenizer, cfg, progress, metrics, generations, timings,
                           allow_code_execution, skipped)
            _run_drift(model, base_model, tokenizer, cfg, progress, metrics, timings)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    timings.record("total", start)
    results = {
        "meta": {"suite": suite_name, "config": dataclasses.asdict(cfg), "judge": judge.name,
                 "torch": torch.__version__, "python": platform.python_version(),
                 "threads": torch.get_num_threads(), "skipped": skipped,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(meta or {})},
        "metrics": metrics,
        "timings": timings.wall,
        "cpu_timings": timings.cpu,
    }
    if out_dir is not None:
        from train.eval.reports import write_results

        write_results(results, out_dir, generations)
    return results
