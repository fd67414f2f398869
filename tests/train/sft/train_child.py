"""One short SFT run in a process of its own, for tests that need a fresh process: two runs that
must agree bit for bit, or a run that is killed (SIGKILL, no clean-up) inside a checkpoint write.

    python train_child.py '{"tokenizer": DIR, "config": {...train_config kwargs...},
                            "resume": false, "kill_in_save_of_step": null}'

The run is train_config(tmp) of tests/helpers/training.py with "config" on top, on
helpers.training.PROMPTS, a tiny_model and the tokenizer directory given, one torch thread.
With "kill_in_save_of_step": N, the checkpoint of step N is left half written (state.pt done,
meta.json not) and the process kills itself with SIGKILL, as `kill -9` or the OOM killer would.
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
from models import Tokenizer  # noqa: E402
from train.data.refusal import build_refusal_set  # noqa: E402
from train.sft.config import TrainConfig  # noqa: E402
from train.sft.loop import train  # noqa: E402


def _kill_inside_save_of(step: int) -> None:
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("step") == step:
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save_then_die


def main(spec: dict) -> None:
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_directory(spec["tokenizer"])
    examples = build_refusal_set(prompts=PROMPTS, held_out=[], seed=0).examples
    if spec.get("kill_in_save_of_step") is not None:
        _kill_inside_save_of(int(spec["kill_in_save_of_step"]))
    config = TrainConfig(**{"rank": 4, "targets": "attn+mlp", "lr": 1e-2, "batch_size": 2, "max_steps": 6,
                            "save_every": 0, "seed": 0, "progress": False, "max_length": 128,
                            **spec["config"]})
    train(config, resume=bool(spec.get("resume")), model=tiny_model(model_vocab(tokenizer)),
          tokenizer=tokenizer, examples=examples)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
