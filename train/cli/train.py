"""`lora-core train`: refusal SFT with LoRA (the paper's method) or full fine-tuning (its baseline)."""
from __future__ import annotations

HELP = "fine-tune a model to refuse harmful requests (LoRA or full), writing a run directory"


def add_arguments(parser) -> None:
    from train.cli._options import add_dataclass_arguments
    from train.sft.config import TrainConfig

    # Every flag but --resume is a TrainConfig field: name, default, help, choices and --help group
    # are written there. --resume is about this invocation, not the run's config, so it is ours.
    placed = add_dataclass_arguments(parser, TrainConfig)
    placed["out"].add_argument("--resume", action="store_true",
                               help="continue the run in --out from its last checkpoint, with its stored "
                               "config: flags that differ from it are refused, except a larger --max-steps "
                               "and --save-every/--keep-checkpoints/--eval-every, which are applied")


def config_from_args(args):
    from train.cli._options import dataclass_from_args
    from train.sft.config import TrainConfig

    # --clip 0 means "off"; the config records that as None.
    return dataclass_from_args(TrainConfig, args, clip=args.clip or None).validate()


def _evaluator(config):
    """The periodic evaluation of a run (--eval-every), built from the config it runs with: on
    --resume the stored one, so a resumed run evaluates as it did before."""
    if not config.eval_every:
        return None
    from train.eval.runner import evaluate

    def evaluate_fn(model, tokenizer, out_dir):
        # LoRA: drift against the same weights with the adapters off (no second model in memory).
        base = None
        if config.method == "lora":
            from train.demo import AdaptersOff

            base = AdaptersOff(model)
        return evaluate(model, tokenizer, suite=config.eval_suite, base_model=base, out_dir=out_dir,
                        progress=False)
    return evaluate_fn


def run(args) -> int:
    from train.cli import UserError
    from train.cli._options import given_fields
    from train.sft.loop import TrainingDiverged, train

    config = config_from_args(args)
    try:
        # With --resume only the flags typed now are compared with the run's stored config.
        result = train(config, resume=args.resume, make_evaluate_fn=_evaluator, given=given_fields(args))
    except TrainingDiverged as error:
        raise UserError(str(error)) from None
    print(f"trained {result.steps} steps in {result.train_seconds:.1f} s, final loss "
          f"{result.losses[-1] if result.losses else float('nan'):.4f}; wrote {result.output_path}")
    return 0
