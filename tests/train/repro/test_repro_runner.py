"""The grid runner end to end on a tiny random model: a small grid completes and writes the report;
a rerun trains nothing; a crash inside a later arm is finished by the rerun without redoing the
earlier arms; an interrupted training run resumes from its checkpoint to the same adapter."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers.repro_grid import tiny_raw
from helpers.tiny_models import tiny_model
from helpers.training import model_vocab
from lora_core.train.repro import run_one as run_one_module
from lora_core.train.repro.preset import preset_from_dict
from lora_core.train.repro.runner import reproduce
from lora_core.train.sft import loop as sft_loop

pytestmark = pytest.mark.usefixtures("single_thread")

def tiny_preset(arms=None, seeds=(0,)):
    return preset_from_dict(tiny_raw(arms, seeds), "tiny.yaml")


@pytest.fixture
def load(tokenizer):
    return lambda name: (tiny_model(model_vocab(tokenizer)), tokenizer)


@pytest.fixture
def count_training(monkeypatch):
    calls = []
    original = sft_loop.Trainer.train

    def counted(self, resume=False):
        calls.append((str(self.run_dir), resume))
        return original(self, resume=resume)

    monkeypatch.setattr(sft_loop.Trainer, "train", counted)
    return calls


def quiet(lines):
    return lambda *a: lines.append(" ".join(map(str, a)))


def md_text(out):
    return (out / "report.md").read_text()


def test_grid_completes_and_reports_then_a_rerun_trains_nothing(tmp_path, load, count_training):
    lines = []
    report = reproduce(tiny_preset(), tmp_path / "g", load=load, log=quiet(lines))
    out = tmp_path / "g"
    for name in ("report.md", "report.json", "safety_vs_reasoning.png", "overlap_per_layer.png", "preset.json"):
        assert (out / name).is_file(), name
    assert any(line.startswith("estimate: about") for line in lines)
    assert len(count_training) == 2  # lora and full; base trains nothing
    lora, full = out / "runs/lora/seed-0", out / "runs/full/seed-0"
    assert (lora / "train/adapter/adapter_model.safetensors").is_file()
    assert (full / "train/model").is_dir()
    assert not (full / "train/checkpoints").exists(), "a finished full run keeps model/, not its 3x larger checkpoints"
    assert (lora / "train/checkpoints").is_dir()
    for run in (out / "runs/base", lora, full):
        assert (run / "done.json").is_file() and (run / "eval/results.json").is_file()
    # every arm scored the same items
    items = [json.loads((r / "eval/results.json").read_text())["items"] for r in (out / "runs/base", lora, full)]
    for metric in ("safety.strongreject.refusal_rate", "reasoning.gsm8k.bpb", "reasoning.arc-easy.acc"):
        assert items[0][metric]["ids"] == items[1][metric]["ids"] == items[2][metric]["ids"]
    # overlap for LoRA and full, at both k, per layer and per module type, with the random baseline
    for run in (lora, full):
        for k in (2, 4):
            summary = json.loads((run / f"overlap/k-{k}.json").read_text())["summary"]
            assert summary["by_layer"] and summary["by_module_type"]
            assert summary["overall"]["baseline_column"] > 0
    claims = {(r["claim"], r["measure"]): r for r in report["claims"]}
    assert set(c for c, _ in claims) == {"a", "b", "c"}
    for row in report["claims"]:
        assert row["verdict"] in ("supported", "contradicted", "inconclusive at this n", "not informative")
        assert row["n"] >= 1
        if row["verdict"] == "not informative":  # rule 5 says why, and what rule 4 alone gave
            assert row["why"] and row["rule4_verdict"] in ("supported", "contradicted", "inconclusive at this n")
            assert row["why"] in md_text(out)
    assert claims[("c", "overlap energy, k=2")]["n"] == 14  # 7 module types x 2 layers, paired by name
    md = (out / "report.md").read_text()
    assert "## Claims" in md and "n = paired units" in md and "items per measure (n)" in md
    done_before = {p: p.read_text() for p in out.glob("runs/**/done.json")}

    lines.clear()
    reproduce(tiny_preset(), out, load=load, log=quiet(lines))
    assert len(count_training) == 2, "a rerun of a finished grid must not train"
    assert sum("done before, skipped" in line for line in lines) == 3
    assert {p: p.read_text() for p in out.glob("runs/**/done.json")} == done_before
    calls = json.loads((out / "invocations.json").read_text())
    assert [(c["outcome"], c["runs_pending"], c["runs_finished"]) for c in calls] == [("finished", 3, 3),
                                                                                     ("finished", 0, 0)]
    assert "over 2 invocation(s)" in (out / "report.md").read_text()


def test_a_crash_in_the_second_arm_is_finished_by_the_rerun(tmp_path, load, count_training, monkeypatch):
    out = tmp_path / "g"
    original = run_one_module._evaluate

    def crash_on_full(ctx, run, model, run_dir):
        if run.arm.name == "full":
            raise RuntimeError("killed")
        return original(ctx, run, model, run_dir)

    monkeypatch.setattr(run_one_module, "_evaluate", crash_on_full)
    with pytest.raises(RuntimeError, match="killed"):
        reproduce(tiny_preset(), out, load=load, log=quiet([]))
    assert (out / "runs/lora/seed-0/done.json").is_file()
    assert not (out / "runs/full/seed-0/done.json").is_file()
    assert (out / "runs/full/seed-0/train/summary.json").is_file()
    trained = len(count_training)
    monkeypatch.setattr(run_one_module, "_evaluate", original)
    lines = []
    reproduce(tiny_preset(), out, load=load, log=quiet(lines))
    assert len(count_training) == trained, "neither the finished LoRA arm nor full's finished training reruns"
    assert any("training already finished" in line for line in lines)
    assert (out / "runs/full/seed-0/done.json").is_file() and (out / "report.md").is_file()
    calls = json.loads((out / "invocations.json").read_text())
    assert [(c["outcome"], c["runs_finished"]) for c in calls] == [("failed", 2), ("finished", 1)]


def test_an_interrupted_training_run_resumes_to_the_same_adapter(tmp_path, load, count_training, monkeypatch):
    arms = [{"name": "base", "kind": "base"},
            {"name": "lora", "kind": "lora", "train": {"rank": 2, "targets": "attn+mlp", "dropout": 0.0}},
            {"name": "full", "kind": "full"}]
    reproduce(tiny_preset(arms), tmp_path / "straight", load=load, log=quiet([]))
    original = sft_loop.Trainer.train_step

    def dies_at_step_3(self):
        if self.step == 3 and self.config.method == "lora":
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(sft_loop.Trainer, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        reproduce(tiny_preset(arms), tmp_path / "killed", load=load, log=quiet([]))
    monkeypatch.setattr(sft_loop.Trainer, "train_step", original)
    reproduce(tiny_preset(arms), tmp_path / "killed", load=load, log=quiet([]))
    assert count_training[-2] == (str(tmp_path / "killed/runs/lora/seed-0/train"), True), "resumed from its checkpoint"
    a = load_file(str(tmp_path / "straight/runs/lora/seed-0/train/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed/runs/lora/seed-0/train/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_preset_is_refused_for_a_started_run(tmp_path, load):
    out = tmp_path / "g"
    reproduce(tiny_preset(), out, load=load, log=quiet([]))
    (out / "runs/lora/seed-0/done.json").unlink()
    changed = tiny_preset([{"name": "base", "kind": "base"},
                           {"name": "lora", "kind": "lora", "train": {"rank": 4, "targets": "attn+mlp"}},
                           {"name": "full", "kind": "full"}])
    with pytest.raises(ValueError,
                       match=r"runs/lora/seed-0/spec.json: run lora/seed-0 was started with other settings"):
        reproduce(changed, out, load=load, log=quiet([]))


def test_merge_arm_merges_the_source_adapter_and_is_analysed(tmp_path, load):
    arms = [{"name": "base", "kind": "base"},
            {"name": "lora", "kind": "lora", "train": {"rank": 2, "targets": "attn+mlp"}},
            {"name": "full", "kind": "full"},
            {"name": "merged", "kind": "merge", "source": "lora", "projection": "column", "k": 2}]
    preset = tiny_preset(arms)
    raw_roles = dict(preset.claims["roles"], merged=["merged"])
    preset = preset.__class__(**{**preset.__dict__, "claims": {**preset.claims, "roles": raw_roles}})
    report = reproduce(preset, tmp_path / "g", load=load, log=quiet([]))
    merge = json.loads((tmp_path / "g/runs/merged/seed-0/merge.json").read_text())
    assert merge["projection"] == "column" and merge["modules_merged"] == 14
    lora_e = json.loads((tmp_path / "g/runs/lora/seed-0/overlap/k-2.json").read_text())["summary"]["overall"]
    merged_e = json.loads((tmp_path / "g/runs/merged/seed-0/overlap/k-2.json").read_text())["summary"]["overall"]
    # removing the top-2 column directions leaves no energy there (up to rounding)
    assert merged_e["energy_column"] < 1e-6 < lora_e["energy_column"]
    d_rows = [r for r in report["claims"] if r["claim"] == "d"]
    assert d_rows and d_rows[0]["y"] == "merged" and d_rows[0]["x"] == "lora"


def test_tensorboard_holds_training_curves_and_one_hparams_entry_per_run(tmp_path, load):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    arms = [{"name": "base", "kind": "base"}, {"name": "lora", "kind": "lora", "train": {"rank": 2}},
            {"name": "full", "kind": "full"}]
    out = tmp_path / "g"
    reproduce(tiny_preset(arms), out, load=load, log=lambda *a: None, tensorboard=True)
    curves = event_accumulator.EventAccumulator(str(out / "runs/lora/seed-0/train/tensorboard"))
    curves.Reload()
    assert [e.step for e in curves.Scalars("loss")] == [1, 2, 3, 4]  # 4 examples, batch 2, 2 epochs
    results = json.loads((out / "runs/lora/seed-0/eval/results.json").read_text())["metrics"]
    for run in ("base/seed-0", "lora/seed-0", "full/seed-0"):
        entry = event_accumulator.EventAccumulator(str(out / "tensorboard" / run))
        entry.Reload()
        assert entry.PluginTagToContent("hparams"), run
        if run.startswith("lora"):
            (refusals,) = entry.Scalars("eval/safety.strongreject.refusal_rate")
            assert refusals.value == pytest.approx(results["safety.strongreject.refusal_rate"]["value"], rel=1e-6)
            assert "overlap/k2/energy_column" in entry.Tags()["scalars"]
    # the entries are rebuilt, not appended to, and a rerun without the flag is not refused
    reproduce(tiny_preset(arms), out, load=load, log=lambda *a: None, tensorboard=True)
    assert len(list((out / "tensorboard/lora/seed-0").iterdir())) == 1
    reproduce(tiny_preset(arms), out, load=load, log=lambda *a: None)


def test_a_damaged_invocation_record_is_named_before_any_run(tmp_path, load, count_training):
    out = tmp_path / "g"
    out.mkdir()
    (out / "invocations.json").write_text('[{"started": ')
    with pytest.raises(ValueError, match="invocations.json: not valid JSON"):
        reproduce(tiny_preset(), out, load=load, log=lambda *a: None)
    assert count_training == [] and not (out / "runs").exists()
