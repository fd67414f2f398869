"""The one door into training: `prepare_run(config, ...)`, then `.run()`.

`lora-core train`, the demo and every `lora-core reproduce` arm reach the Trainer
(train.sft.trainer) through `prepare_run`, so the rules are applied once, in one order: which
config a run goes on with (on resume, the stored one, with the flags typed now checked against it:
train.sft.resume_config), paths anchored, the torchrun group joined and its limits checked, the
model loaded in the dtype it trains in unless one is given, the examples built unless given.
The config is never written into; where the data came from comes back in the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_core.models import load_model
from lora_core.train.sft import distributed as dist_mod
from lora_core.train.sft.config import TrainConfig
from lora_core.train.sft.resume_config import resumed_config
from lora_core.train.sft.trainer import Trainer, TrainingDiverged, TrainResult

__all__ = ["PreparedRun", "Trainer", "TrainingDiverged", "TrainResult", "load_model_for", "prepare_run", "train"]


@dataclass
class PreparedRun:
    """A run ready to start or continue: the config it goes on with and its Trainer."""

    config: TrainConfig
    trainer: Trainer
    resume: bool

    @property
    def provenance(self) -> dict:
        """Where the training data came from (also config.json's data_info)."""
        return self.trainer.provenance

    def run(self) -> TrainResult:
        return self.trainer.train(resume=self.resume)


def load_model_for(config: TrainConfig, device="cpu"):
    """The model and tokenizer of `config.model`, loaded straight into the dtype it trains in:
    LoRA in bf16 keeps its frozen base in bf16 (no fp32 copy on the way); full fine-tuning keeps
    fp32 master weights (bf16 runs under autocast)."""
    dtype = torch.bfloat16 if config.method == "lora" and config.optim.dtype == "bfloat16" else torch.float32
    return load_model(config.model, dtype=dtype, device=device)


def prepare_run(config: TrainConfig, *, resume: bool = False, given: set[str] | None = None, model=None,
                tokenizer=None, examples: list[dict] | None = None, data_info: dict | None = None,
                evaluate_fn=None, make_evaluate_fn=None, device=None, log=print) -> PreparedRun:
    """Everything a run needs before its first step, from one validated config.

    Args:
        resume: continue the run in `config.checkpoints.out` from its newest checkpoint.
        given: with `resume`, the flat keys set for this invocation, compared with the run's
            stored config; None compares every key of `config` (a library caller's whole config).
        model, tokenizer: an already loaded model (the demo's, a reproduce arm's copy of the base);
            None loads `config.model`.
        examples, data_info: prebuilt training examples and their provenance (reproduce builds
            them once for every arm); None builds them from the config.
        evaluate_fn / make_evaluate_fn: the periodic evaluation, or a builder of it from the config
            the run goes on with (on resume the stored one, not this invocation's flags).
        device: where the model is loaded and trained (default: the given model's, else cpu);
            under torchrun each process joins its group here (train.sft.distributed).
    """
    if device is None:
        device = next(model.parameters()).device if model is not None else "cpu"
    dist = dist_mod.from_environment(device)
    if not dist.is_main:
        log = _quiet
    # The run is the one --out names, wherever it was first written: a copied or moved run resumes
    # where it is, never into the path stored in its config.json.
    config = resumed_config(config, given, log=log) if resume else config.anchored()
    dist.check_config(config)
    if make_evaluate_fn is not None:
        evaluate_fn = make_evaluate_fn(config)
    if model is None:
        model, tokenizer = load_model_for(config, dist.device)
    trainer = Trainer(config, model, tokenizer, examples=examples, data_info=data_info, evaluate_fn=evaluate_fn,
                      log=log, dist=dist)
    return PreparedRun(config, trainer, resume)


def train(config: TrainConfig, resume: bool = False, **kwargs) -> TrainResult:
    """`prepare_run(config, resume=resume, **kwargs).run()`: a run end to end."""
    return prepare_run(config, resume=resume, **kwargs).run()


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0."""
