"""`lora-core demo`: the main job. Base vs LoRA-aligned default model, one table."""
from __future__ import annotations

HELP = "pull the default model, evaluate it, train a LoRA refusal adapter, evaluate again, print the table"


def add_arguments(parser) -> None:
    from train.demo import DemoConfig

    d = DemoConfig()
    parser.add_argument("--model", default=d.model, help="registry name, HF directory or .gguf (default %(default)s)")
    parser.add_argument("--out", default=d.out, help="run directory (default %(default)s; must be new or empty)")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (default %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate (default %(default)s; see train/demo.py for why not 5e-5)")
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--targets", default=d.targets)
    parser.add_argument("--layers", default=None)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype)
    parser.add_argument("--suite", default=d.suite, help="evaluation suite (default %(default)s)")
    parser.add_argument("--eval-limit", type=int, default=None, help="cap every evaluation subset")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--retain-beta", type=float, default=d.retain_beta,
                        help="weight of the retain KL on benign prompts (default %(default)s; 0 = refusal "
                        "data only, as the paper; see train/demo.py)")
    parser.add_argument("--retain-per-step", type=int, default=d.retain_per_step)
    parser.add_argument("--retain-data", default=d.retain_data,
                        help="'diverse' (everyday benign requests of many topics + GSM8K, none in any "
                        "evaluation set), 'gsm8k', or a JSONL/CSV of prompts (default %(default)s)")
    parser.add_argument("--retain-targets", choices=("gold", "self"), default=d.retain_targets,
                        help="'self': the base model's own answers; 'gold': the set's answers (default %(default)s)")


def run(args) -> int:
    from train.demo import DemoConfig, run_demo

    cfg = DemoConfig(model=args.model, out=args.out, steps=args.steps, lr=args.lr, rank=args.rank,
                     targets=args.targets, layers=args.layers, batch_size=args.batch_size, dtype=args.dtype,
                     suite=args.suite, eval_limit=args.eval_limit, seed=args.seed,
                     retain_beta=args.retain_beta, retain_per_step=args.retain_per_step,
                     retain_data=args.retain_data, retain_targets=args.retain_targets)
    if cfg.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {cfg.steps}")
    run_demo(cfg)
    return 0
