"""One short SFT run in a process of its own, for tests that need a fresh process: two runs that
must agree bit for bit, or a run that is killed (SIGKILL, no clean-up) inside a checkpoint write.

    python train_child.py '{"tokenizer": DIR, "config": {...train_config kwargs...},
                            "resume": false, "kill_in_save_of_step": null}'

The run is train_config(tmp) of tests/helpers/training.py with "config" on top, on
helpers.training.PROMPTS, a tiny_model and the tokenizer directory given, one torch thread.
With "kill_in_save_of_step": N, the checkpoint of step N is left half written (state.pt done,
meta.json not) and the process kills itself with SIGKILL, as `kill -9` or the OOM killer would.
With "signal_in_step": [N, "SIGTERM"], the process sends itself that signal in the middle of step
N (after its forward pass) and, when training stops for it, exits 130 as the CLI does.
"""
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from helpers.tiny_models import tiny_model  # noqa: E402
from helpers.training import PROMPTS, model_vocab  # noqa: E402
from lora_core.models import Tokenizer  # noqa: E402
from lora_core.train.data.refusal import build_refusal_set  # noqa: E402
from lora_core.train.sft.config import TrainConfig  # noqa: E402
from lora_core.train.sft import loop  # noqa: E402
from lora_core.train.sft.graceful_stop import StopRequested  # noqa: E402
from lora_core.train.sft.loop import train  # noqa: E402


def _kill_inside_save_of(step: int) -> None:
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("step") == step:
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save_then_die


def _signal_in_step(step: int, name: str) -> None:
    real_step = loop.Trainer.train_step

    def step_then_signal(self):
        if self.step + 1 == step:  # the step about to run
            real_backward = torch.Tensor.backward

            def backward_after_signal(tensor, *args, **kwargs):
                os.kill(os.getpid(), getattr(signal, name))  # lands between the forward and the backward
                torch.Tensor.backward = real_backward
                return real_backward(tensor, *args, **kwargs)
            torch.Tensor.backward = backward_after_signal
        return real_step(self)
    loop.Trainer.train_step = step_then_signal


def main(spec: dict) -> None:
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_directory(spec["tokenizer"])
    examples = build_refusal_set(prompts=PROMPTS, held_out=[], seed=0).examples
    if spec.get("kill_in_save_of_step") is not None:
        _kill_inside_save_of(int(spec["kill_in_save_of_step"]))
    if spec.get("signal_in_step") is not None:
        _signal_in_step(*spec["signal_in_step"])
    config = TrainConfig.from_flat(**{"rank": 4, "targets": "attn+mlp", "lr": 1e-2, "batch_size": 2, "max_steps": 6,
                            "save_every": 0, "seed": 0, "progress": False, "max_length": 128,
                            **spec["config"]})
    try:
        train(config, resume=bool(spec.get("resume")), model=tiny_model(model_vocab(tokenizer)),
              tokenizer=tokenizer, examples=examples)
    except StopRequested as stop:
        print(stop)
        sys.exit(130)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
