"""--tensorboard writes the same per-step numbers as metrics.jsonl into TensorBoard event files
(read back with TensorBoard's own reader); without the package it fails before training."""
import builtins
import json

import pytest

from helpers.tiny_models import tiny_model
from helpers.training import PROMPTS, model_vocab, train_config
from lora_core.train.data.refusal import build_refusal_set
from lora_core.train.sft.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")


def test_event_files_hold_the_logged_losses(tokenizer, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    examples = build_refusal_set(prompts=PROMPTS, held_out=[], seed=0).examples
    result = train(train_config(tmp_path, max_steps=3, tensorboard=True), model=tiny_model(model_vocab(tokenizer)),
                   tokenizer=tokenizer, examples=examples, log=lambda *a: None)
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    events = event_accumulator.EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "grad_norm"} <= set(events.Tags()["scalars"])
    got = [(e.step, e.value) for e in events.Scalars("loss")]
    want = [(m["step"], m["loss"]) for m in logged]
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32


def test_missing_tensorboard_fails_before_training(tokenizer, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    examples = build_refusal_set(prompts=PROMPTS, held_out=[], seed=0).examples
    with pytest.raises(ValueError, match=r"lora-core\[tensorboard\]"):
        train(train_config(tmp_path, max_steps=3, tensorboard=True), model=tiny_model(model_vocab(tokenizer)),
              tokenizer=tokenizer, examples=examples, log=lambda *a: None)
    assert not (tmp_path / "run" / "checkpoints").exists()
