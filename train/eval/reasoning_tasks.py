"""Reasoning tasks of an evaluation: exact match (greedy and sampled), bits per byte of gold
solutions, ARC by log-likelihood, and KL drift from the base model. HumanEval and MBPP pass@1 by
execution are in train.eval.code_tasks.

Metrics (see train.eval.runner for the whole list):
- reasoning.<gsm8k|math500>.exact_match: greedy chat answer to the question plus
  MATH_INSTRUCTION; thinking is stripped first and an answer cut off inside <think> counts as
  wrong (`train.eval.answers.final_answer_text`). .refusal_rate: explicit refusals among them.
- reasoning.<set>.pass_at_1_sampled: with sampling k > 0, k answers per item at the suite's
  temperature/top-p, pass@1 = the share correct per item, averaged over items (the paper's
  figure). .truncated_in_think(_sampled): share cut off inside <think> (reasoning models only).
- reasoning.<gsm8k|math500|mbpp|humaneval>.bpb: bits per byte of the gold solution, zero-shot,
  no chat template; contexts are "Question: ...\\nAnswer:" (GSM8K), "Problem:\\n...\\n\\nSolution:"
  (MATH-500), the MBPP statement with one of its tests then a code fence, and the HumanEval
  signature and docstring (its canonical body is the continuation).
- reasoning.<arc-easy|arc-challenge>.acc / acc_norm: log-likelihood of each " choice" given
  "Question: ...\\nAnswer:" (OLMES's rc formulation), acc_norm per UTF-8 byte.
- reasoning.<humaneval|mbpp>.pass_at_1(_sampled): see train.eval.code_tasks.
- drift.kl_base: mean per-token KL(base || model) on chat-formatted GSM8K questions continued by
  their gold solutions (teacher-forced); only when a base model is given.
"""
from __future__ import annotations

from lora_core.train.data.registry import load_records
from lora_core.train.eval.answers import answers_match, extract_answer, final_answer_text
from lora_core.train.eval.context import chat_prompt, record_truncation, sampled_pass_at_1
from lora_core.train.eval.metrics import bits_per_byte, choice_hits, item_bits_per_byte, kl_drift, score_continuations
from lora_core.train.eval.safety_tasks import EXPLICIT

__all__ = ["MATH_INSTRUCTION", "run_math_generation", "run_bpb", "run_arc", "run_drift"]

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _subsets(run, sizes: dict):
    """(name, fixed-seed records) of every set a suite does not skip (size 0)."""
    for name, limit in sizes.items():
        if limit != 0:
            yield name, run.records(name, limit)


def _scored(prompt: str, response: str, gold: str) -> tuple[str | None, bool]:
    answer = final_answer_text(prompt, response)
    predicted = None if answer is None else extract_answer(answer)
    return predicted, bool(predicted is not None and answers_match(predicted, gold))


def run_math_generation(run) -> None:
    sampling = run.cfg.sampling
    for name, records in _subsets(run, run.cfg.math_generation):
        with run.timed(f"reasoning.{name}.generation"):
            ids = [r["id"] for r in records]
            prompts = [chat_prompt(run.tokenizer, f"{r['question']}\n{MATH_INSTRUCTION}") for r in records]
            responses = run.generate(prompts, name, f"exact match/{name}")
            scored = [_scored(p, resp, r["answer"]) for p, resp, r in zip(prompts, responses, records)]
            refused = [EXPLICIT.is_refusal(resp) for resp in responses]
            run.rate(f"reasoning.{name}.exact_match", ids, [ok for _, ok in scored])
            run.rate(f"reasoning.{name}.refusal_rate", ids, refused)
            record_truncation(run, f"reasoning.{name}", ids, prompts, responses)
            for r, resp, (pred, ok), ref in zip(records, responses, scored, refused):
                run.generations.append({"task": f"reasoning.{name}", "id": r["id"], "prompt": r["question"],
                                        "response": resp, "extracted": pred, "gold": r["answer"],
                                        "correct": ok, "refusal": bool(ref), "decoding": "greedy"})
        if sampling.k:
            with run.timed(f"reasoning.{name}.sampled"):
                _sampled(run, name, records, prompts)


def _sampled(run, name, records, prompts) -> None:
    def score(i, response):
        pred, ok = _scored(prompts[i], response, records[i]["answer"])
        return ok, {"extracted": pred, "gold": records[i]["answer"], "correct": ok}

    sampled_pass_at_1(run, name, name, records, prompts, score)


def _bpb_pairs(name: str, records: list[dict]) -> tuple[list[str], list[str]]:
    if name == "gsm8k":
        return [f"Question: {r['question']}\nAnswer:" for r in records], [" " + r["solution"] for r in records]
    if name == "math500":
        return [f"Problem:\n{r['question']}\n\nSolution:" for r in records], [" " + r["solution"] for r in records]
    if name == "mbpp":
        # The statement and one test name the function to write, as MBPP's own prompt does.
        return ([f"{r['prompt']}\n{r['tests'][0]}\n```python\n" for r in records],
                [r["code"] for r in records])
    if name == "humaneval":
        return [r["prompt"] for r in records], [r["canonical_solution"] for r in records]
    raise ValueError(f"no bits-per-byte formulation for {name!r}; known: gsm8k, math500, mbpp, humaneval")


def run_bpb(run) -> None:
    for name, records in _subsets(run, run.cfg.bpb):
        with run.timed(f"reasoning.{name}.bpb"):
            contexts, continuations = _bpb_pairs(name, records)
            scores = score_continuations(run.model, run.tokenizer, contexts, continuations, run.cfg.batch_size,
                                         progress_bar=run.progress_bar(), desc=f"BPB/{name}")
            run.summary(f"reasoning.{name}.bpb", bits_per_byte(scores), [r["id"] for r in records],
                        item_bits_per_byte(scores))


def run_arc(run) -> None:
    for name, records in _subsets(run, run.cfg.arc):
        with run.timed(f"reasoning.{name}"):
            contexts = [r["query"] for r in records for _ in r["choices"]]
            continuations = [" " + c for r in records for c in r["choices"]]
            flat = score_continuations(run.model, run.tokenizer, contexts, continuations, run.cfg.batch_size * 2,
                                       progress_bar=run.progress_bar(), desc=f"log-likelihood/{name}")
            grouped, pos = [], 0
            for r in records:
                grouped.append(flat[pos:pos + len(r["choices"])])
                pos += len(r["choices"])
            ids = [r["id"] for r in records]
            for measure, hits in choice_hits(grouped, [r["gold"] for r in records]).items():
                run.rate(f"reasoning.{name}.{measure}", ids, hits)


def run_drift(run) -> None:
    if run.cfg.drift == 0 or run.base_model is None:
        return
    with run.timed("drift"):
        # Seed + 1: not the GSM8K items of the other tasks.
        records = load_records("gsm8k", limit=run.cfg.drift, seed=run.cfg.seed + 1)
        contexts = [chat_prompt(run.tokenizer, r["question"]) for r in records]
        # The chat template already opens the sequence with its own special tokens.
        summary, per_item = kl_drift(run.base_model, run.model, run.tokenizer, contexts,
                                     [r["solution"] for r in records], run.cfg.batch_size,
                                     add_special_tokens=False, progress_bar=run.progress_bar(),
                                     per_item=True)
        run.summary("drift.kl_base", summary, [r["id"] for r in records], per_item)
