"""Bookkeeping of one evaluation: metrics with their per-item values, generations, timings.

Every task module (train.eval.safety_tasks, train.eval.reasoning_tasks) writes through an
`EvalRun`, so each metric is recorded once with the same shape:

    metrics[name] = {"value", "n", "stderr", ...}      (rates also "k" and a Wilson "ci95")
    items[name]   = {"ids": [...], "values": [...]}    (0/1 per item for rates, floats for means)

The per-item values are what `lora-core compare` pairs across two runs evaluated on the same items.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from lora_core.models import generate
from lora_core.train.data.registry import load_records
from lora_core.train.eval.answers import thinks_anywhere, unfinished_thought
from lora_core.train.eval.metrics import proportion, wilson_interval_at

__all__ = ["EvalRun", "chat_prompt", "record_truncation", "sampled_pass_at_1"]


def chat_prompt(tokenizer, user_text: str) -> str:
    """One user turn rendered with the model's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                         add_generation_prompt=True)


def record_truncation(run, prefix: str, ids, prompts, responses) -> None:
    """`<prefix>.truncated_in_think`: answers cut off inside <think>. Only for models that think
    (a thought opened in a prompt or an answer); for others it would be a column of zeros."""
    if thinks_anywhere(prompts, responses):
        run.rate(f"{prefix}.truncated_in_think", ids, [unfinished_thought(p, r) for p, r in zip(prompts, responses)])


def sampled_pass_at_1(run, name: str, budget_task: str, records, prompts, score) -> list[float]:
    """`reasoning.<name>.pass_at_1_sampled`: k samples per item at the suite's temperature/top-p,
    pass@1 = the share of an item's samples that `score` accepts, averaged over items (the paper's
    figure); returns the per-item shares.

    `score(i, response) -> (ok, fields)` judges one sample of item i; `fields` go into its row of
    generations.jsonl. Every task that samples goes through here, so exact match and code execution
    draw in the same way. The k samples of all items are one generate call (prompts repeated), so
    a fixed seed and batch size give the same draws on a rerun.
    """
    sampling = run.cfg.sampling
    k, n = sampling.k, len(records)
    repeated = [p for p in prompts for _ in range(k)]
    responses = run.generate(repeated, budget_task, f"pass@1 over {k} samples/{name}",
                             temperature=sampling.temperature, top_p=sampling.top_p)
    per_item, rows = [], []
    for i, r in enumerate(records):
        mine = responses[i * k:(i + 1) * k]
        scored = [score(i, resp) for resp in mine]
        per_item.append(sum(bool(ok) for ok, _ in scored) / k)
        rows += [{"task": f"reasoning.{name}", "id": r["id"], "sample": j, "response": resp, **fields,
                  "decoding": "sampled"} for j, (resp, (_, fields)) in enumerate(zip(mine, scored))]
    ids = [r["id"] for r in records]
    run.mean_of_item_rates(f"reasoning.{name}.pass_at_1_sampled", ids, per_item, samples=k)
    if thinks_anywhere(repeated, responses):
        cut = [sum(unfinished_thought(prompts[i], x) for x in responses[i * k:(i + 1) * k]) / k for i in range(n)]
        run.mean_of_item_rates(f"reasoning.{name}.truncated_in_think_sampled", ids, cut, samples=k)
    run.generations.extend(rows)
    return per_item


@dataclass
class EvalRun:
    model: object
    tokenizer: object
    cfg: object  # train.eval.suites.SuiteConfig
    judge: object  # train.eval.judges.RefusalJudge
    progress: bool | None = True
    base_model: object = None
    metrics: dict = field(default_factory=dict)
    items: dict = field(default_factory=dict)
    generations: list = field(default_factory=list)
    wall: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    # ----------------------------------------------------------------- recording
    def rate(self, name: str, ids, flags) -> dict:
        """A proportion over items (flags are 0/1 per id), with its Wilson interval."""
        flags = [int(bool(f)) for f in flags]
        self._items(name, ids, flags)
        self.metrics[name] = proportion(sum(flags), len(flags))
        return self.metrics[name]

    def mean_of_item_rates(self, name: str, ids, values, samples: int) -> dict:
        """Mean over items of a per-item rate (e.g. pass@1 averaged over k samples).

        The interval is Wilson's at n = items with the pooled estimate: the k samples of one item
        are not independent of each other, so n*k would overstate the evidence, while treating
        each item mean as one trial errs on the wide side (its variance is at most p(1-p)).
        """
        values = [float(v) for v in values]
        self._items(name, ids, values)
        n = len(values)
        p = sum(values) / n
        var = sum((v - p) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
        self.metrics[name] = {"value": p, "n": n, "samples": samples,
                              "stderr": (var / n) ** 0.5 if n > 1 else float("nan"),
                              "ci95": list(wilson_interval_at(p, n))}
        return self.metrics[name]

    def summary(self, name: str, summary: dict, ids=None, values=None) -> dict:
        """A ready summary (bits per byte, KL) with its per-item values when given."""
        if ids is not None:
            self._items(name, ids, [float(v) for v in values])
        self.metrics[name] = summary
        return summary

    def _items(self, name, ids, values) -> None:
        ids = [str(i) for i in ids]
        if len(ids) != len(values):
            raise ValueError(f"{name}: {len(ids)} item ids but {len(values)} values")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}: item ids are not unique")
        if not ids:
            raise ValueError(f"{name}: no items")
        self.items[name] = {"ids": ids, "values": list(values)}

    @contextmanager
    def timed(self, key: str):
        """Wall-clock and process-CPU seconds of one part. On a shared machine the CPU seconds
        are the better estimate of the cost on an idle one (wall time includes waiting for cores)."""
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[key] = time.perf_counter() - wall
        self.cpu[key] = time.process_time() - cpu

    def records(self, name: str, limit: int | None) -> list[dict]:
        """A registered set's fixed-seed subset; a limit beyond the set's size takes all of it,
        and says so in results["meta"]["notes"]."""
        records = load_records(name, limit=limit, seed=self.cfg.seed)
        if limit is not None and len(records) < limit:
            self.notes.append(f"{name}: {limit} items asked for, the set has {len(records)}: all are used")
        return records

    # ---------------------------------------------------------------- generation
    def say(self, message: str) -> None:
        if self.progress is not False:
            print(f"lora-core eval: {message}", file=sys.stderr)

    def generate(self, prompts, task: str, desc: str, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> list[str]:
        """Continuations of rendered prompts within the task's token budget."""
        budget = self.cfg.budget(task)
        self.say(f"{desc} ({len(prompts)} prompts, <= {budget} new tokens"
                 + (f", T={temperature}, top-p {top_p})" if temperature else ")"))
        return generate(self.model, self.tokenizer, list(prompts), max_new_tokens=budget,
                        temperature=temperature, top_p=top_p, batch_size=self.cfg.batch_size,
                        seed=self.cfg.seed if seed is None else seed, progress=self.progress)

    def chat_answers(self, user_texts, task: str, desc: str) -> list[str]:
        """Greedy answers to single user turns rendered with the model's chat template."""
        return self.generate([chat_prompt(self.tokenizer, t) for t in user_texts], task, desc)

    def progress_bar(self):
        return False if self.progress is False else None

