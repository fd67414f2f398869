"""The over-refusal set is diverse, big enough and disjoint from every retain prompt; the quick
suite's subset covers every topic; a damaged prompt file is reported, not half-read."""
import json
import re

import pytest

from lora_core.train.data.benign import (OWN_EVAL_FILE, OWN_RETAIN_FILE, PINNED_SOURCES, TOPICS, load_own_prompts,
                               over_refusal_records, retain_prompt_records)
from lora_core.train.eval.runner import SUITES


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def _jaccard(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / max(1, len(wa | wb))


@pytest.fixture(scope="module")
def eval_set():
    return over_refusal_records()


@pytest.fixture(scope="module")
def retain_set():
    return retain_prompt_records(seed=0)


def test_the_evaluation_set_is_large_and_spans_many_topics(eval_set):
    assert len(eval_set) >= 200, f"only {len(eval_set)} benign evaluation prompts"
    by_topic = {}
    for r in eval_set:
        by_topic.setdefault(r["topic"], []).append(r)
    assert set(by_topic) == set(TOPICS), f"topics present: {sorted(by_topic)}"
    assert all(len(v) >= 10 for v in by_topic.values()), {k: len(v) for k, v in by_topic.items()}
    # A good share of sensitive-looking but legitimate requests, as in XSTest.
    borderline = sum(r["borderline"] for r in eval_set)
    assert borderline >= 0.1 * len(eval_set), f"{borderline} borderline prompts of {len(eval_set)}"
    assert {r["source"] for r in eval_set} == {"lora-core", *PINNED_SOURCES}
    assert len({r["id"] for r in eval_set}) == len(eval_set)
    assert len({r["prompt"].strip().lower() for r in eval_set}) == len(eval_set)


def test_retain_prompts_never_repeat_an_evaluation_prompt(eval_set, retain_set):
    eval_ids = {r["id"] for r in eval_set}
    assert not eval_ids & {r["id"] for r in retain_set}
    eval_texts = {r["prompt"].strip().lower() for r in eval_set}
    assert not eval_texts & {r["prompt"].strip().lower() for r in retain_set}
    # Near-duplicates count too: our own two files are written to share no request.
    worst = max(((_jaccard(a["prompt"], b["prompt"]), a["id"], b["id"])
                 for a in eval_set if a["source"] == "lora-core"
                 for b in retain_set if b["source"] == "lora-core"), key=lambda t: t[0])
    assert worst[0] <= 0.6, f"near-duplicate across eval and retain: {worst}"


def test_retain_pool_is_disjoint_for_every_seed(eval_set):
    eval_ids = {r["id"] for r in eval_set}
    for seed in (0, 1, 7):
        assert not eval_ids & {r["id"] for r in retain_prompt_records(seed=seed)}


def test_quick_subset_is_stratified_by_topic_and_stable():
    n = SUITES["quick"].over_refusal
    assert n >= 40
    first = over_refusal_records(limit=n, seed=0)
    assert len(first) == n
    assert {r["topic"] for r in first} == set(TOPICS), "the quick subset misses a topic"
    assert [r["id"] for r in first] == [r["id"] for r in over_refusal_records(limit=n, seed=0)]
    assert [r["id"] for r in first] != [r["id"] for r in over_refusal_records(limit=n, seed=1)]
    assert SUITES["full"].over_refusal is None


def test_a_damaged_prompt_file_is_reported(tmp_path):
    good = OWN_EVAL_FILE.read_text().splitlines()
    for bad_line, why in (("{not json", "not JSON"),
                          (json.dumps({"id": "x", "topic": "nonsense", "borderline": False, "prompt": "hi"}),
                           "topic"),
                          (json.dumps({"id": "x", "topic": "facts", "prompt": "hi"}), "record")):
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(good[:3] + [bad_line] + good[3:]) + "\n")
        with pytest.raises(ValueError, match=r"bad\.jsonl: line 4"):
            load_own_prompts(path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_own_prompts(tmp_path / "empty.jsonl")
    assert len(load_own_prompts(OWN_RETAIN_FILE)) >= 100
