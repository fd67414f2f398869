"""`lora-core demo`: the main job. Base vs LoRA-aligned default model, one table."""
from __future__ import annotations

HELP = "pull the default model, evaluate it, train a LoRA refusal adapter, evaluate again, print the table"

# DemoConfig fields that stay fixed by the demo's recipe (train/demo.py says why) or are set by code.
_NOT_FLAGS = ("progress", "retain_max_length", "retain_limit", "train_overrides")


def add_arguments(parser) -> None:
    from lora_core.train.cli._options import add_dataclass_arguments
    from lora_core.train.demo import DemoConfig
    from lora_core.train.sft.config import TrainConfig

    # The demo's knobs are TrainConfig's under the same names (run_demo passes them through), so a
    # field without help or choices of its own takes TrainConfig's: --dtype's choices are the trainer's.
    add_dataclass_arguments(parser, DemoConfig, exclude=_NOT_FLAGS, inherit=TrainConfig)
    from lora_core.train.cli._device import add_device_argument

    add_device_argument(parser)


def run(args) -> int:
    from lora_core.train.cli._options import dataclass_from_args
    from lora_core.train.demo import DemoConfig, run_demo

    from lora_core.train.cli._device import default_dtype, resolve_device
    from lora_core.train.cli._options import given_fields
    from lora_core.train.cli._paths import check_output_dir

    device = resolve_device(args.device)
    # An untyped --dtype follows the hardware (bf16 on a GPU or a CPU with bf16 units), as everywhere.
    dtype = args.dtype if "dtype" in given_fields(args) else default_dtype(device)
    cfg = dataclass_from_args(DemoConfig, args, exclude=_NOT_FLAGS, device=str(device), dtype=dtype)
    if cfg.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {cfg.steps}")
    check_output_dir(cfg.out)
    run_demo(cfg)
    return 0
