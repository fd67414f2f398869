"""The evaluation workflow: safety, robustness and reasoning of a model in one results file.

`evaluate(model, tokenizer, suite="quick"|"standard"|"full", ...)` is what `lora-core eval` and the
training workflow call. It returns a results dict

    {"meta": {... "seed", "sampling", "config", "notes"},
     "metrics": {"<group>.<task>.<measure>": {"value", "n", "stderr", ...}},
     "items": {"<metric>": {"ids": [...], "values": [...]}},       (what paired comparisons read)
     "judge": {"name", "human_agreement": {...}},
     "timings": {"<part>": wall seconds}, "cpu_timings": {"<part>": process CPU seconds}}

and, with `out_dir`, writes results.json, results.md and generations.jsonl there.

The measures are defined where they are computed: train.eval.safety_tasks (refusal, template
echo, over-refusal, past/future-tense rephrasings, jailbreak wrappers),
train.eval.reasoning_tasks (exact match greedy and sampled, bits per byte, ARC, KL drift) and
train.eval.code_tasks (HumanEval and MBPP pass@1 by execution, greedy and sampled). Suite sizes
are in train.eval.suites. Every rate carries a Wilson 95% interval, every mean a standard error.
Subsets are fixed-seed random samples, so two models evaluated with the same suite and seed see
the same items, and their per-item values can be paired.

`results["judge"]["human_agreement"]` is the run's judge scored against pyrit's 105 human refusal
labels, on every evaluation, so a refusal rate is never read without the judge's own error.
"""
from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path

import torch

from lora_core.train.eval.code_tasks import run_code
from lora_core.train.eval.context import EvalRun, chat_prompt
from lora_core.train.eval.judges import KeywordRefusalJudge, RefusalJudge, human_agreement
from lora_core.train.eval.reasoning_tasks import MATH_INSTRUCTION, run_arc, run_bpb, run_drift, run_math_generation
from lora_core.train.eval.result_files import write_results
from lora_core.train.eval.safety_tasks import run_jailbreak, run_over_refusal, run_robustness, run_safety
from lora_core.train.eval.suites import SUITES, Sampling, SuiteConfig, suite_config

__all__ = ["SuiteConfig", "Sampling", "SUITES", "MATH_INSTRUCTION", "evaluate", "chat_prompt"]


def _needs_chat(cfg: SuiteConfig, allow_code_execution: bool) -> bool:
    return (any(v != 0 for v in cfg.safety.values()) or cfg.over_refusal != 0
            or any(v != 0 for v in cfg.robustness.values()) or cfg.jailbreak != 0
            or any(v != 0 for v in cfg.math_generation.values())
            or ((cfg.humaneval != 0 or cfg.mbpp != 0) and allow_code_execution))


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "has_chat_template", False):
        raise ValueError("the tokenizer has no chat template: safety and exact-match tasks prompt "
                         "the model as a chat assistant (use a chat/instruct checkpoint, or a "
                         "suite with safety, robustness and math_generation set to 0)")


def _configured(suite, limit, max_new_tokens, batch_size, seed) -> tuple[SuiteConfig, str]:
    cfg, name = suite_config(suite)
    cfg = cfg.with_limit(limit)
    if max_new_tokens is not None:
        cfg = cfg.with_budget(max_new_tokens)
    if batch_size is not None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    return cfg, name


def evaluate(model, tokenizer, suite: str | SuiteConfig = "quick", base_model=None,
             out_dir: str | Path | None = None, progress: bool | None = True,
             max_new_tokens: int | None = None, batch_size: int | None = None,
             limit: int | None = None, judge: RefusalJudge | None = None, seed: int | None = None,
             meta: dict | None = None, allow_code_execution: bool = False) -> dict:
    """Run a suite on `model` (see module docstring); returns the results dict.

    max_new_tokens overrides every token budget; batch_size, limit (cap on every subset) and
    seed override the suite's. `base_model` (same tokenizer) enables the KL drift measure.
    `meta` is merged into results["meta"] (e.g. the model source and adapter path).
    `allow_code_execution` lets HumanEval and MBPP run model-written code (in a limited subprocess).
    """
    cfg, suite_name = _configured(suite, limit, max_new_tokens, batch_size, seed)
    needs_chat = _needs_chat(cfg, allow_code_execution)
    if needs_chat:
        _require_chat_template(tokenizer)
    run = EvalRun(model, tokenizer, cfg, judge if judge is not None else KeywordRefusalJudge(),
                  progress=progress, base_model=base_model)
    if base_model is None and cfg.drift != 0:
        run.skipped.append("drift: no base model given")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with run.timed("total"), torch.no_grad():
            run_safety(run)
            run_robustness(run)
            run_jailbreak(run)
            run_over_refusal(run)
            run_math_generation(run)
            run_bpb(run)
            run_arc(run)
            run_code(run, allow_code_execution)
            run_drift(run)
            with run.timed("judge.human_agreement"):
                agreement = human_agreement(run.judge) if needs_chat else None
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    results = {
        "meta": {"suite": suite_name, "config": dataclasses.asdict(cfg), "seed": cfg.seed,
                 "sampling": dataclasses.asdict(cfg.sampling), "judge": run.judge.name,
                 "torch": torch.__version__, "python": platform.python_version(),
                 "threads": torch.get_num_threads(), "skipped": run.skipped, "notes": run.notes,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(meta or {})},
        "metrics": run.metrics,
        "items": run.items,
        "judge": {"name": run.judge.name, "human_agreement": agreement},
        "timings": run.wall,
        "cpu_timings": run.cpu,
    }
    if out_dir is not None:
        write_results(results, out_dir, run.generations)
    return results
