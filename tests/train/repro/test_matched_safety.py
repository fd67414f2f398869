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


def test_a_selection_is_bracketed_only_when_the_rate_below_it_missed_the_target():
    """f1 already reaches the target: f1 is selected but a lower rate might be safe too, so the
    selection is not bracketed and says so; l2 sits above l1, which missed: bracketed."""
    validation = {"f1": {0: 0.9}, "f2": {0: 1.0}, "f3": {0: 1.0}, "l1": {0: 0.5}, "l2": {0: 0.8}, "l3": {0: 1.0}}
    chosen = select(SEARCH, validation, target=0.8)
    assert chosen["full"]["selected"] == "f1" and chosen["full"]["bracketed"] is False
    assert "not bracketed" in chosen["full"]["why"] and "upper bound" in chosen["full"]["why"]
    assert chosen["lora"]["selected"] == "l2" and chosen["lora"]["bracketed"] is True
    assert "l1 below it misses" in chosen["lora"]["why"]
    nothing = select(SEARCH, {**validation, "l2": {0: 0.5}, "l3": {0: 0.5}}, target=0.8)
    assert nothing["lora"]["selected"] is None and nothing["lora"]["bracketed"] is False


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
    text = (out / "report.md").read_text()
    assert "## At matched safety" in text
    # Both searches' lowest arms reach a target of ~0: neither selection is bracketed, and the report says so.
    assert not matched["selection"]["lora"]["bracketed"] and "| lora-lo | **no** |" in text
    assert "Not bracketed: full, lora." in text


def _grid_with_a_matched_arm(target: float) -> dict:
    arms = [{"name": "base", "kind": "base"},
            {"name": "lora-lo", "kind": "lora", "train": {"rank": 2, "targets": "attn+mlp", "lr": 1e-3}},
            {"name": "lora-hi", "kind": "lora", "train": {"rank": 2, "targets": "attn+mlp", "lr": 1e-2}},
            {"name": "full", "kind": "full"},
            {"name": "r1-up", "kind": "lora", "train": {"rank": 1, "targets": "up_proj", "lr": "matched:lora"}}]
    raw = tiny_raw(arms)
    raw["claims"]["roles"] = {"base": "base", "lora": "lora-hi", "full": "full"}
    raw["claims"]["matched_safety"] = {"target": target, "validation_n": 4,
                                       "search": {"full": ["full"], "lora": ["lora-lo", "lora-hi"]}}
    return raw


@pytest.fixture
def made_up_validation(monkeypatch):
    """Validation rates by arm, so which arm the search selects is known: lora-lo 0.5, lora-hi 0.9."""
    from lora_core.common.files import atomic_write_json
    from lora_core.train.repro import run_one

    rates = {"lora-lo": 0.5, "lora-hi": 0.9, "full": 0.9}

    def fake(ctx, model, run_dir):
        rate = rates[run_dir.parent.name]
        atomic_write_json(run_dir / "validation.json", {"ids": [], "values": [], "rate": rate, "n": 4})

    monkeypatch.setattr(run_one, "_validate", fake)


@pytest.mark.usefixtures("single_thread", "made_up_validation")
def test_an_arm_with_a_matched_lr_trains_at_the_lr_its_search_selected(tmp_path, tokenizer):
    out, lines = tmp_path / "g", []
    reproduce(preset_from_dict(_grid_with_a_matched_arm(0.8), "tiny.yaml"), out,
              load=lambda name: (tiny_model(model_vocab(tokenizer)), tokenizer), log=lines.append)
    config = json.loads((out / "runs/r1-up/seed-0/train/config.json").read_text())
    assert config["lr"] == 1e-2, "lora-hi (lr 1e-2) is the first LoRA arm at 0.8"
    order = [line.split("]")[1].split()[0] for line in lines if line.startswith("[")]
    assert order.index("r1-up/seed-0") > max(order.index(a) for a in ("lora-lo/seed-0", "lora-hi/seed-0"))


@pytest.mark.usefixtures("single_thread", "made_up_validation")
def test_an_arm_whose_search_selected_nothing_is_not_run_and_says_why(tmp_path, tokenizer):
    out, lines = tmp_path / "g", []
    report = reproduce(preset_from_dict(_grid_with_a_matched_arm(0.95), "tiny.yaml"), out,
                       load=lambda name: (tiny_model(model_vocab(tokenizer)), tokenizer),
                       log=lambda *a: lines.append(" ".join(map(str, a))))
    assert not (out / "runs/r1-up/seed-0/done.json").exists()
    assert "r1-up/seed-0" in report["missing_runs"]
    assert any("r1-up/seed-0: not run" in line and "no arm reaches 0.95" in line for line in lines)


def test_a_matched_lr_must_name_a_search():
    raw = _grid_with_a_matched_arm(0.8)
    raw["arms"][-1]["train"]["lr"] = "matched:ful"
    with pytest.raises(PresetError, match=r"arms\[4\].train.lr: 'matched:ful' names no search"):
        preset_from_dict(raw, "tiny.yaml")
    raw = _grid_with_a_matched_arm(0.8)
    raw["arms"][1]["train"]["lr"] = "matched:full"
    with pytest.raises(PresetError, match="an arm of a search cannot take its lr from a search"):
        preset_from_dict(raw, "tiny.yaml")


@pytest.mark.usefixtures("single_thread", "made_up_validation")
def test_matched_roles_and_a_matched_merge_source_read_the_selected_arm(tmp_path, tokenizer):
    raw = _grid_with_a_matched_arm(0.8)
    raw["arms"].append({"name": "merged", "kind": "merge", "source": "matched:lora", "projection": "column",
                        "k": 2})
    raw["claims"]["roles"] = {"base": "base", "lora": "matched:lora", "full": "matched:full", "merged": ["merged"]}
    out = tmp_path / "g"
    report = reproduce(preset_from_dict(raw, "tiny.yaml"), out,
                       load=lambda name: (tiny_model(model_vocab(tokenizer)), tokenizer), log=lambda *a: None)
    merge = json.loads((out / "runs/merged/seed-0/merge.json").read_text())
    assert merge["adapter"] == "runs/lora-hi/seed-0/train/adapter", "lora-hi is the first LoRA arm at 0.8"
    assert json.loads((out / "runs/merged/seed-0/spec.json").read_text())["merges"] == "lora-hi"
    pairs = {(r["claim"], r["x"], r["y"]) for r in report["claims"]}
    assert ("a", "full", "lora-hi") in pairs and ("d", "lora-hi", "merged") in pairs
    assert report["settings"]["claims"]["roles"]["lora"] == "matched:lora", "the preset's own roles are kept"


@pytest.mark.usefixtures("single_thread", "made_up_validation")
def test_a_role_whose_search_selected_nothing_has_rows_that_say_so(tmp_path, tokenizer):
    raw = _grid_with_a_matched_arm(0.95)
    raw["arms"].pop()  # the matched-lr arm: not needed here
    raw["claims"]["roles"] = {"base": "base", "lora": "matched:lora", "full": "full"}
    report = reproduce(preset_from_dict(raw, "tiny.yaml"), tmp_path / "g",
                       load=lambda name: (tiny_model(model_vocab(tokenizer)), tokenizer), log=lambda *a: None)
    rows = [r for r in report["claims"] if r["claim"] == "a"]
    assert rows and all(r["verdict"] == "not run" and "matched:lora (none selected)" in r["why"] for r in rows)


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["claims"]["roles"].update(lora="matched:lroa"),
     r"claims.roles.lora: 'matched:lroa' names no search"),
    (lambda raw: raw["claims"]["roles"].update(base="matched:lora"), "the base model is no search's selection"),
    (lambda raw: raw["claims"]["roles"].update(merged=["matched:lora"]), "a list role names arms"),
    (lambda raw: raw["arms"].append({"name": "m", "kind": "merge", "source": "matched:fulll", "projection": "column",
                                     "k": 2}), r"arms\[5\].source: 'matched:fulll' names no search"),
    (lambda raw: raw["arms"].append({"name": "m", "kind": "merge", "source": "matched:full", "projection": "column",
                                     "k": 2}), "the search's arm 'full' is not a LoRA arm"),
])
def test_bad_matched_roles_and_merge_sources_are_refused_by_key(change, message):
    raw = _grid_with_a_matched_arm(0.8)
    change(raw)
    with pytest.raises(PresetError, match=message):
        preset_from_dict(raw, "tiny.yaml")
