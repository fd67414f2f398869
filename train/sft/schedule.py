"""The learning-rate schedule and the run length, as pure functions of the step.

A pure function of the step means resume needs only the step count: no scheduler state is saved.
"""
from __future__ import annotations

import math

from lora_core.train.sft.config import TrainConfig


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warm-up, then the schedule to 0."""
    if step < config.optim.warmup_steps:
        return config.optim.lr * (step + 1) / config.optim.warmup_steps
    if config.optim.scheduler == "constant":
        return config.optim.lr
    span = max(1, total_steps - config.optim.warmup_steps)
    progress_frac = min(1.0, (step - config.optim.warmup_steps) / span)
    if config.optim.scheduler == "linear":
        return config.optim.lr * (1.0 - progress_frac)
    return config.optim.lr * 0.5 * (1.0 + math.cos(math.pi * progress_frac))


def total_steps_of(config: TrainConfig, n_examples: int) -> int:
    if config.optim.max_steps is not None:
        return config.optim.max_steps
    micro_per_epoch = math.ceil(n_examples / config.optim.batch_size)
    return max(1, math.ceil(config.optim.epochs * micro_per_epoch / config.optim.grad_accum))
