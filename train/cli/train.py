"""`lora-core train`: refusal SFT with LoRA (the paper's method) or full fine-tuning (its baseline)."""
from __future__ import annotations

import os

from lora_core import AdaptersOff
from lora_core.train.cli import UserError
from lora_core.train.cli._device import add_device_argument, default_dtype, resolve_device
from lora_core.train.cli._launch import launch_torchrun
from lora_core.train.cli._options import add_dataclass_arguments, dataclass_from_args, given_fields
from lora_core.train.cli._paths import check_output_dir
from lora_core.train.eval.runner import evaluate
from lora_core.train.sft.config import TrainConfig
from lora_core.train.sft.loop import TrainingDiverged, train

HELP = "fine-tune a model to refuse harmful requests (LoRA or full), writing a run directory"


def add_arguments(parser) -> None:
    # Every flag but --resume is a TrainConfig field: name, default, help, choices and --help group
    # are written there. --resume is about this invocation, not the run's config, so it is ours.
    placed = add_dataclass_arguments(parser, TrainConfig)
    placed["out"].add_argument("--resume", action="store_true",
                               help="continue the run in --out from its last checkpoint, with its stored "
                               "config: flags that differ from it are refused, except a larger --max-steps "
                               "and --save-every/--keep-checkpoints/--eval-every, which are applied")
    # Where the run computes is about this invocation, not the run: a run may resume elsewhere.
    add_device_argument(placed["dtype"])
    placed["dtype"].add_argument("--nproc", type=int, default=1,
                                 help="processes to train with (FSDP2, one per GPU; gloo on the CPU): starts "
                                 "torchrun --standalone --nproc-per-node N for you; for several nodes run "
                                 "torchrun yourself (README)")


def config_from_args(args, device=None):
    overrides = {"clip": args.clip or None}  # --clip 0 means "off"; the config records that as None
    if device is not None and "dtype" not in given_fields(args):
        # An untyped --dtype follows the hardware (bf16 where it is native), as in every command.
        overrides["dtype"] = default_dtype(device)
    return dataclass_from_args(TrainConfig, args, **overrides)  # validated as it is built


def _evaluator(config):
    """The periodic evaluation of a run (--eval-every), built from the config it runs with: on
    --resume the stored one, so a resumed run evaluates as it did before."""
    if not config.logging.eval_every:
        return None

    def evaluate_fn(model, tokenizer, out_dir):
        # LoRA: drift against the same weights with the adapters off (no second model in memory).
        base = None
        if config.method == "lora":
            base = AdaptersOff(model)
        return evaluate(model, tokenizer, suite=config.logging.eval_suite, base_model=base, out_dir=out_dir,
                        progress=False)
    return evaluate_fn


def run(args) -> int:
    device = resolve_device(args.device)
    config = config_from_args(args, device)
    check_output_dir(config.checkpoints.out)
    if _should_launch(args):
        return launch_torchrun(args, config, device)
    try:
        # With --resume only the flags typed now are compared with the run's stored config.
        result = train(config, resume=args.resume, make_evaluate_fn=_evaluator, given=given_fields(args),
                       device=device)
    except TrainingDiverged as error:
        raise UserError(str(error)) from None
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 alone reports
    print(f"trained {result.steps} steps in {result.train_seconds:.1f} s, final loss "
          f"{result.losses[-1] if result.losses else float('nan'):.4f}; wrote {result.output_path}")
    return 0


def _should_launch(args) -> bool:
    """--nproc N > 1 outside torchrun: start torchrun. Inside it, --nproc must agree or be absent."""
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return args.nproc > 1
    if args.nproc not in (1, int(world)):
        raise ValueError(f"--nproc {args.nproc} inside torchrun's {world} processes: leave --nproc out "
                         "when you start torchrun yourself")
    return False
