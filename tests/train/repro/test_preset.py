"""Presets: the shipped ones load and say what the paper says; a typo or a bad value in a preset
file is refused with one line naming the file and the key."""
import copy
from pathlib import Path

import pytest
import yaml

from lora_core.train.repro.grid import expand, layer_third, train_config
from lora_core.train.repro.preset import PresetError, load_preset, load_preset_file, preset_from_dict


def test_paper_small_keeps_the_papers_recipe_and_ratio():
    p = load_preset("paper-small")
    assert p.epochs == {"lora": 10.0, "full": 5.0}
    assert p.train["lr"] == 5e-5 and p.train["weight_decay"] == 1e-4 and p.train["scheduler"] == "cosine"
    roles = p.claims["roles"]
    for role in ("lora", "full"):
        assert len(p.seeds_of(p.arm(roles[role]))) >= 3, role
        assert "lr" not in p.arm(roles[role]).train, "LoRA and full must share the preset's lr"
    runs = expand(p)
    assert sum(r.arm.kind == "base" for r in runs) == 1, "the base model is evaluated once"
    kinds = [r.arm.kind for r in runs]
    assert kinds.index("merge") > max(i for i, k in enumerate(kinds) if k == "lora"), "merges read finished adapters"
    lora = train_config(p, next(r for r in runs if r.arm.name == roles["lora"]), Path("x"), 30)
    full = train_config(p, next(r for r in runs if r.arm.name == roles["full"]), Path("x"), 30)
    assert (lora.optim.lr, lora.optim.batch_size, lora.data.limit) == (full.optim.lr, full.optim.batch_size,
                                                                        full.data.limit)
    assert lora.optim.epochs == 2 * full.optim.epochs
    middle = train_config(p, next(r for r in runs if r.arm.name == roles["rank1_middle"]), Path("x"), 30)
    assert (middle.lora.rank, middle.lora.targets, middle.lora.layers) == (1, "up_proj", "10-19")


def test_paper_coder_searches_each_method_and_reads_the_claims_at_matched_safety():
    p = load_preset("paper-coder")
    assert p.epochs == {"lora": 10.0, "full": 5.0} and p.train["batch_size"] == 2
    assert p.train["dtype"] == "bfloat16", "one precision for every arm, the base model's evaluation included"
    assert p.eval["execute_code"] and p.cost["code_item_s"] > 0
    matched = p.claims["matched_safety"]
    assert set(matched["search"]) == {"full", "lora-r8", "lora-r1"}
    for method, arms in matched["search"].items():
        lrs = [p.arm(a).train["lr"] for a in arms]
        assert len(lrs) >= 3 and lrs == sorted(lrs), f"{method}: at least 3 rates, in increasing order"
    roles = p.claims["roles"]
    assert (roles["lora"], roles["full"], roles["rank1_middle"]) == ("matched:lora-r8", "matched:full",
                                                                     "matched:lora-r1")
    runs = expand(p)
    for name in roles["regularised"]:
        assert p.arm(name).train["lr"] == "matched:lora-r8", "(d) trains at the rate LoRA's search selected"
    assert all(p.arm(name).source == "matched:lora-r8" for name in roles["merged"])
    for role, third in (("rank1_early", "0-7"), ("rank1_late", "16-23")):
        arm = p.arm(roles[role])
        assert arm.train["lr"] == "matched:lora-r1", "(e) trains at the rate the rank-1 search selected"
        cfg = train_config(p, next(r for r in runs if r.arm.name == arm.name), Path("x"), 24,
                           matched_lrs={"lora-r1": 5e-5})
        assert (cfg.lora.rank, cfg.lora.targets, cfg.lora.layers, cfg.optim.lr) == (1, "up_proj", third, 5e-5)
    searched = {a for arms in matched["search"].values() for a in arms}
    order = [r.arm.name for r in runs]
    assert max(order.index(a) for a in searched) < min(order.index(a) for a in roles["regularised"] + roles["merged"])
    middle = train_config(p, next(r for r in runs if r.arm.name == matched["search"]["lora-r1"][0]), Path("x"), 24)
    assert (middle.lora.rank, middle.lora.targets, middle.lora.layers) == (1, "up_proj", "8-15")


def test_paper_preset_loads_and_has_no_cost_model():
    p = load_preset("paper")
    assert p.epochs == {"lora": 10.0, "full": 5.0} and p.train["batch_size"] == 2 and not p.cost


@pytest.mark.parametrize("layers,expected", [(48, {"early": "0-15", "middle": "16-31", "late": "32-47"}),
                                             (30, {"early": "0-9", "middle": "10-19", "late": "20-29"}),
                                             (4, {"early": "0-1", "middle": "2-2", "late": "3-3"})])
def test_thirds_map_the_papers_16_31_of_48(layers, expected):
    assert {name: layer_third(name, layers) for name in expected} == expected


def _raw():
    with open(load_preset("paper-small").source_file) as f:
        return yaml.safe_load(f)


def _refused(tmp_path, raw, *expected):
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PresetError) as info:
        load_preset_file(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for part in expected:
        assert part in message, message
    return message


def test_unknown_keys_are_named_with_their_path(tmp_path):
    raw = _raw()
    raw["epocs"] = 3
    _refused(tmp_path, raw, "epocs", "unknown key")
    raw = _raw()
    raw["arms"][2]["train"]["rnak"] = 4
    _refused(tmp_path, raw, "arms[2].train.rnak", "unknown key")
    raw = _raw()
    raw["eval"]["overrides"]["safty"] = {"strongreject": 3}
    _refused(tmp_path, raw, "eval.overrides.safty")
    raw = _raw()
    raw["claims"]["roles"]["lorra"] = "lora-r8"
    _refused(tmp_path, raw, "claims.roles.lorra")


@pytest.mark.parametrize("edit,expected", [
    (lambda r: r["arms"][1].update(kind="fulll"), ["arms[1].kind", "fulll"]),
    (lambda r: r["arms"][2]["train"].update(rank=0), ["arms[2].train", "rank"]),
    (lambda r: r["train"].update(lr=-1.0), ["train", "--lr"]),
    (lambda r: r.update(seeds=["a"]), ["seeds[0]", "integer"]),
    (lambda r: r["epochs"].update(full=0), ["epochs.full", "> 0"]),
    (lambda r: r["eval"]["overrides"]["safety"].update(strongreject=-2), ["eval.overrides.safety.strongreject"]),
    (lambda r: r["arms"][-1].update(source="nope"), ["source", "nope"]),
    (lambda r: r["arms"][-1].update(k=0), ["k", ">= 1"]),
    (lambda r: r["claims"]["roles"].update(full="nope"), ["claims.roles.full", "nope"]),
    (lambda r: r["arms"][1]["train"].update(rank=4) if "train" in r["arms"][1]
     else r["arms"][1].update(train={"rank": 4}),
     ["arms[1].train", "full fine-tuning"]),
    (lambda r: r["arms"].append(copy.deepcopy(r["arms"][2])), ["used twice"]),
    (lambda r: r["cost"].update(lora_step_s="fast"), ["cost.lora_step_s"]),
])
def test_bad_values_are_refused_by_name(tmp_path, edit, expected):
    raw = _raw()
    edit(raw)
    _refused(tmp_path, raw, *expected)


def test_not_yaml_and_missing_file_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: [unclosed\n")
    with pytest.raises(PresetError, match="not valid YAML"):
        load_preset_file(bad)
    with pytest.raises(PresetError, match="not found"):
        load_preset_file(tmp_path / "none.yaml")
    with pytest.raises(PresetError, match="shipped presets: .*paper-small"):
        load_preset("paper-large")
    with pytest.raises(PresetError, match="expected a mapping"):
        preset_from_dict([1, 2], "list.yaml")


def test_paper_small_gives_both_methods_the_same_higher_lr_and_keeps_the_paper_pair():
    small = load_preset("paper-small")
    roles = small.claims["roles"]
    assert small.train["lr"] == 5e-5 and "lr" not in small.arm(roles["lora"]).train
    assert "lr" not in small.arm(roles["full"]).train
    assert small.arm(roles["lora_high_lr"]).train["lr"] == small.arm(roles["full_high_lr"]).train["lr"] == 1e-3
    for name in roles["regularised_high_lr"]:
        assert small.arm(name).train["lr"] == 1e-3 and small.arm(name).train["ortho_beta"] > 0
    for name in [roles["base"], roles["lora"], roles["full"], roles["lora_high_lr"], roles["full_high_lr"]]:
        assert len(small.seeds_of(small.arm(name))) >= 3 or name == roles["base"]


def test_regularised_high_lr_role_needs_its_plain_lora_arm(tmp_path):
    raw = _raw()
    del raw["claims"]["roles"]["lora_high_lr"]
    _refused(tmp_path, raw, "claims.roles.regularised_high_lr", "lora_high_lr")


def test_extends_names_a_shipped_preset(tmp_path):
    _refused(tmp_path, {"extends": "paper-huge", "name": "x"}, "extends", "paper-huge")
    _refused(tmp_path, {"extends": "paper-small", "arms": [{"name": "base", "kind": "base"}]}, "used twice")
