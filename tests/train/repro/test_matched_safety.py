"""Selection at matched safety: the rule on made-up validation rates, the validation split's
disjointness from the evaluated items, the preset's checks, and a tiny grid end to end."""
import json

import pytest

from helpers.repro_grid import tiny_raw
from helpers.tiny_models import tiny_model
from helpers.training import model_vocab
from lora_core.train.data.registry import load_records
from lora_core.train.repro.matched_safety import safety_set, select, validation_records
from lora_core.train.repro.preset import PresetError, preset_from_dict
from lora_core.train.repro.runner import reproduce

SEARCH = {"full": ["f1", "f2", "f3"], "lora": ["l1", "l2", "l3"]}


def test_the_first_arm_of_the_search_that_reaches_the_target_is_selected():
    validation = {"f1": {0: 0.5, 1: 0.7}, "f2": {0: 0.8, 1: 0.9}, "f3": {0: 1.0},  # f2: mean 0.85
                  "l1": {0: 0.2}, "l2": {0: 0.6}, "l3": {0: 0.8}}
    chosen = select(SEARCH, validation, target=0.8)
    assert chosen["full"]["selected"] == "f2" and chosen["lora"]["selected"] == "l3"
    assert [c["validation_safety"] for c in chosen["full"]["curve"]] == [pytest.approx(0.6), pytest.approx(0.85), 1.0]
    assert chosen["full"]["curve"][0]["seeds"] == 2


def test_a_search_that_never_reaches_the_target_selects_nothing_and_says_how_far_it_got():
    validation = {"f1": {0: 0.9}, "f2": {0: 1.0}, "f3": {0: 1.0}, "l1": {0: 0.1}, "l2": {0: 0.4}, "l3": {0: 0.3}}
    chosen = select(SEARCH, validation, target=0.8)
    assert chosen["full"]["selected"] == "f1"
    assert chosen["lora"]["selected"] is None
    assert "no arm reaches 0.8" in chosen["lora"]["why"] and "0.400 (l2)" in chosen["lora"]["why"]


def test_a_missing_run_stops_the_search_there():
    """l1 is unfinished: l2 reaching the target cannot be called the first arm that does."""
    chosen = select(SEARCH, {"f1": {0: 0.9}, "l2": {0: 0.9}, "l3": {0: 0.9}}, target=0.8)
    assert chosen["lora"]["selected"] is None and "l1 has no finished run" in chosen["lora"]["why"]


def test_the_validation_split_never_holds_an_evaluated_item():
    evaluated = {r["id"] for r in load_records("strongreject", limit=48, seed=0)}
    split = validation_records("strongreject", 48, 0, 32, seed=1)
    assert len(split) == 32 and not evaluated & {r["id"] for r in split}
    assert split == validation_records("strongreject", 48, 0, 32, seed=1), "the split is not reproducible"
    assert {r["id"] for r in split} != {r["id"] for r in validation_records("strongreject", 48, 0, 32, seed=2)}
    with pytest.raises(ValueError, match="no item is left"):
        validation_records("strongreject", None, 0, 8, seed=1)
    with pytest.raises(ValueError, match="safety.<set>.<rate>"):
        safety_set("reasoning.gsm8k.bpb")


@pytest.mark.parametrize("matched, message", [
    ({"target": 1.5, "validation_n": 8, "search": {"full": ["full"]}}, "target: a refusal rate is at most 1"),
    ({"target": 0.8, "validation_n": 8, "search": {"lora": ["lora"]}}, "needs a 'full' method"),
    ({"target": 0.8, "validation_n": 8, "search": {"full": ["base"]}}, "'base' is not a LoRA or full"),
    ({"target": 0.8, "validation_n": 2, "search": {"full": ["full"]}}, "validation_n: must be >= 4"),
    ({"target": 0.8, "validation_n": 8, "search": {"full": ["full"]}, "taget": 1}, "taget: unknown key"),
])
def test_bad_matched_safety_blocks_are_refused_by_key(matched, message):
    raw = tiny_raw()
    raw["claims"]["matched_safety"] = matched
    with pytest.raises(PresetError, match=message):
        preset_from_dict(raw, "tiny.yaml")


@pytest.mark.usefixtures("single_thread")
def test_a_tiny_grid_selects_at_matched_safety_and_reports_it(tmp_path, tokenizer):
    arms = [{"name": "base", "kind": "base"},
            {"name": "lora-lo", "kind": "lora", "train": {"rank": 2, "targets": "attn+mlp", "lr": 1e-3}},
            {"name": "lora-hi", "kind": "lora", "train": {"rank": 2, "targets": "attn+mlp", "lr": 1e-2}},
            {"name": "full", "kind": "full"}]
    raw = tiny_raw(arms)
    raw["claims"]["roles"] = {"base": "base", "lora": "lora-hi", "full": "full"}
    # A target of 0: every arm reaches it, so the first arm of each search is selected, whatever the
    # tiny model says; which arm the rule picks from real rates is tested above.
    raw["claims"]["matched_safety"] = {"target": 1e-9, "validation_n": 4,
                                       "search": {"full": ["full"], "lora": ["lora-lo", "lora-hi"]}}
    out = tmp_path / "g"
    report = reproduce(preset_from_dict(raw, "tiny.yaml"), out, load=lambda name: (
        tiny_model(model_vocab(tokenizer)), tokenizer), log=lambda *a: None)
    for arm in ("lora-lo", "lora-hi", "full"):
        split = json.loads((out / f"runs/{arm}/seed-0/validation.json").read_text())
        assert split["n"] == 4 and len(split["values"]) == 4
    assert not (out / "runs/base/validation.json").exists(), "the base model is in no search"
    evaluated = set(json.loads((out / "runs/lora-lo/seed-0/eval/results.json").read_text())
                    ["items"]["safety.strongreject.refusal_rate"]["ids"])
    assert not evaluated & set(split["ids"]), "validation prompts were evaluated too"
    matched = report["matched_safety"]
    assert matched["selection"]["lora"]["selected"] == "lora-lo"
    assert matched["selection"]["full"]["selected"] == "full"
    rows = matched["claims"]
    assert rows and {(r["x"], r["y"]) for r in rows} == {("full", "lora-lo")}
    assert (out / "matched_safety.png").is_file()
    assert "## At matched safety" in (out / "report.md").read_text()
