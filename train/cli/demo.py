"""`lora-core demo`: the main job. Base vs LoRA-aligned default model, one table."""
from __future__ import annotations

from lora_core.train.cli._device import add_device_argument, default_dtype, resolve_device
from lora_core.train.cli._options import add_dataclass_arguments, dataclass_from_args, given_fields
from lora_core.train.cli._paths import check_output_dir
from lora_core.train.demo import DemoConfig, run_demo
from lora_core.train.sft.config import TrainConfig

HELP = "pull the default model, evaluate it, train a LoRA refusal adapter, evaluate again, print the table"


def add_arguments(parser) -> None:
    # The demo's knobs are TrainConfig's under the same keys (train.demo.demo_spec passes them on),
    # so a knob without help or choices of its own takes TrainConfig's: --dtype's choices are the trainer's.
    add_dataclass_arguments(parser, DemoConfig, inherit=TrainConfig)
    add_device_argument(parser)


def run(args) -> int:
    device = resolve_device(args.device)
    # An untyped --dtype follows the hardware (bf16 on a GPU or a CPU with bf16 units), as everywhere.
    dtype = args.dtype if "dtype" in given_fields(args) else default_dtype(device)
    cfg = dataclass_from_args(DemoConfig, args, device=str(device), dtype=dtype)
    if cfg.max_steps < 1:
        raise ValueError(f"--steps must be >= 1, got {cfg.max_steps}")
    check_output_dir(cfg.out)
    run_demo(cfg)
    return 0
