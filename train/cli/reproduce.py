"""`lora-core reproduce`: the paper's comparison as one resumable grid of arms x seeds, and its report."""
from __future__ import annotations

import torch

from lora_core.models import load_model
from lora_core.train.cli._device import add_device_argument, resolve_device
from lora_core.train.cli._paths import check_output_dir
from lora_core.train.repro.preset import load_preset, load_preset_file
from lora_core.train.repro.runner import reproduce

HELP = "run the paper's comparison (base, LoRA, full fine-tuning, regulariser, merge, ...) and report its claims"


def add_arguments(parser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--preset", default=None,
                       help="a shipped preset: paper-small (the 135M CPU grid, default), paper-coder (the 0.5B "
                            "coder at matched safety, ~80 min on 2 cores) or paper (the paper's GPU settings)")
    which.add_argument("--config", default=None, help="your own preset YAML (see train/repro/presets/paper-small.yaml)")
    parser.add_argument("--out", default="runs/repro",
                        help="grid directory (default %(default)s); rerunning with the same --out finishes what is "
                        "missing and skips finished runs")
    parser.add_argument("--estimate-only", action="store_true",
                        help="print the grid and the time estimate, run nothing")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard events: each run's training curves and, in <out>/tensorboard, "
                        "one HParams entry per run (settings against metrics); needs pip install "
                        "'lora-core[tensorboard]'")

    # No --dtype: each arm trains in its preset's dtype from fp32 weights (a bf16 LoRA arm casts its
    # frozen base itself); loading the shared base in bf16 would make fp32 arms train bf16 adapters.
    add_device_argument(parser)


def run(args) -> int:
    device = resolve_device(args.device)
    check_output_dir(args.out)
    preset = load_preset_file(args.config) if args.config else load_preset(args.preset or "paper-small")

    def load_on_device(name):
        return load_model(name, dtype=torch.float32, device=device)

    # On the CPU the runner's own loader (fp32, CPU) is the same thing; keep it.
    load = None if device.type == "cpu" else load_on_device
    result = reproduce(preset, args.out, estimate_only=args.estimate_only, load=load,
                       tensorboard=args.tensorboard)
    if args.estimate_only:
        return 0
    for row in result["claims"]:
        print(f"({row['claim']}) {row['text']} [{row['measure']}]: {row['verdict']}")
    print(f"wrote {args.out}/report.md, report.json, safety_vs_reasoning.png, overlap_per_layer.png")
    return 0
