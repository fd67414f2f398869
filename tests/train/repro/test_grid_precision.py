"""One precision for the whole grid (the preset's train.dtype), code execution inside reproduce,
and what both add to the time estimate."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers.repro_grid import tiny_raw
from helpers.tiny_models import tiny_model
from helpers.training import model_vocab
from lora_core.overlap import analyse_update
from lora_core.train.eval.suites import SUITES
from lora_core.train.repro import run_one
from lora_core.train.repro.estimate import eval_items
from lora_core.train.repro.preset import PresetError, preset_from_dict
from lora_core.train.repro.runner import reproduce


@pytest.mark.usefixtures("single_thread")
def test_a_bf16_grid_evaluates_every_arm_in_bf16_and_reads_dense_updates_in_fp32(tmp_path, tokenizer, monkeypatch):
    raw = tiny_raw()
    raw["train"]["dtype"] = "bfloat16"
    seen = {}
    real_evaluate = run_one.evaluate

    def spy(model, *args, **kwargs):
        frozen = {p.dtype for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B"))}
        drift = kwargs.get("base_model")
        seen[kwargs["meta"]["arm"]] = (frozen, None if drift is None else {p.dtype for p in drift.parameters()})
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(run_one, "evaluate", spy)
    out = tmp_path / "g"
    reproduce(preset_from_dict(raw, "tiny.yaml"), out, load=lambda name: (
        tiny_model(model_vocab(tokenizer)), tokenizer), log=lambda *a: None)
    assert seen["base"] == ({torch.bfloat16}, None)
    assert seen["full"] == ({torch.bfloat16}, {torch.bfloat16}), "the drift reference is the bf16 base"
    assert seen["lora"][0] == {torch.bfloat16}
    for arm in ("base", "lora/seed-0", "full/seed-0"):
        assert json.loads((out / "runs" / arm / "eval/results.json").read_text())["meta"]["dtype"] == "bfloat16"
    # The full arm's overlap is read from its float32 weights, before the cast to bf16 (whose
    # rounding of W' would enter dW = W' - W): recompute it from the saved fp32 model.
    tuned = {}
    for f in sorted((out / "runs/full/seed-0/train/model").glob("*.safetensors")):
        tuned.update(load_file(str(f)))
    base = tiny_model(model_vocab(tokenizer)).state_dict()
    names = [n for n in tuned if n in base and tuned[n].dim() == 2 and "embed" not in n]
    expected = analyse_update(base, tuned, 2, names, progress=False).summary()["overall"]
    written = json.loads((out / "runs/full/seed-0/overlap/k-2.json").read_text())["summary"]["overall"]
    assert written == pytest.approx(expected, rel=1e-6)


def test_an_arm_may_not_set_its_own_precision():
    raw = tiny_raw()
    raw["arms"][1]["train"]["dtype"] = "bfloat16"
    with pytest.raises(PresetError, match=r"arms\[1\].train.dtype: the preset's train.dtype sets every arm"):
        preset_from_dict(raw, "tiny.yaml")


def test_code_execution_needs_its_cost_and_counts_in_the_estimate():
    raw = tiny_raw()
    raw["eval"]["execute_code"] = True
    with pytest.raises(PresetError, match="cost.code_item_s: is required when eval.execute_code is true"):
        preset_from_dict(raw, "tiny.yaml")
    raw["cost"]["code_item_s"] = 3.0
    assert preset_from_dict(raw, "tiny.yaml").eval["execute_code"] is True
    raw["eval"]["execute_code"] = "yes"
    with pytest.raises(PresetError, match="eval.execute_code: expected true or false"):
        preset_from_dict(raw, "tiny.yaml")
    standard = SUITES["standard"]  # 4 HumanEval + 4 MBPP, each greedy and 4 samples
    assert eval_items(standard, execute_code=True)["code"] == 8 * (1 + standard.sampling.k)
    assert eval_items(standard)["code"] == 0, "without execution the suite skips the code items"
