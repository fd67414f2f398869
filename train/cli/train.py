"""`lora-core train`: refusal SFT with LoRA (the paper's method) or full fine-tuning (its baseline)."""
from __future__ import annotations

HELP = "fine-tune a model to refuse harmful requests (LoRA or full), writing a run directory"


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "") else int(text)


def add_arguments(parser) -> None:
    from train.sft.config import TARGET_PRESETS, TrainConfig

    d = TrainConfig()
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help="registry name, HF directory or .gguf (default %(default)s)")
    g.add_argument("--method", choices=("lora", "full"), default=d.method)
    g.add_argument("--data", default=None, help="your JSONL: {prompt, response} or {messages} per line "
                   "(default: AdvBench prompts + refusal templates)")
    g.add_argument("--dataset", default=d.dataset, help="registry data set of harmful prompts (default %(default)s)")
    g.add_argument("--limit", type=int, default=None, help="use at most this many examples")
    g.add_argument("--reasoning-line", dest="reasoning_line", action="store_true", default=None,
                   help="put '<think> one sentence </think>' before each refusal (default: when the "
                   "chat template uses <think>)")
    g.add_argument("--no-reasoning-line", dest="reasoning_line", action="store_false")
    g.add_argument("--max-length", type=int, default=d.max_length)
    g = parser.add_argument_group("LoRA")
    g.add_argument("--rank", "-r", type=int, default=d.rank)
    g.add_argument("--alpha", type=float, default=d.alpha)
    g.add_argument("--dropout", type=float, default=d.dropout)
    g.add_argument("--targets", default=d.targets,
                   help=f"preset ({', '.join(TARGET_PRESETS)}) or comma-separated module names")
    g.add_argument("--layers", default=None, help="layer range, e.g. 16-31 or 3,5,7 (default: all)")
    g.add_argument("--rslora", dest="use_rslora", action="store_true")
    g.add_argument("--init", default=d.init, choices=("default", "gaussian", "pissa", "milora"))
    g = parser.add_argument_group("optimisation (paper defaults)")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--scheduler", choices=("cosine", "linear", "constant"), default=d.scheduler)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--epochs", type=float, default=d.epochs)
    g.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--clip", type=float, default=d.clip, help="max gradient norm, 0 = off")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                   help="bfloat16: LoRA keeps the frozen base in bf16 and the adapters in fp32; "
                   "full fine-tuning uses autocast with fp32 master weights")
    g.add_argument("--grad-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=d.seed)
    g = parser.add_argument_group("orthogonality regulariser (loss += beta * R)")
    g.add_argument("--ortho-beta", type=float, default=d.ortho_beta)
    g.add_argument("--ortho-k", type=int, default=d.ortho_k)
    g.add_argument("--ortho-side", choices=("column", "row", "both"), default=d.ortho_side)
    g.add_argument("--ortho-weighting", choices=("spectral", "uniform"), default=d.ortho_weighting)
    g.add_argument("--ortho-normalize", action="store_true")
    g = parser.add_argument_group(
        "retain term (not in the paper; off by default): loss += beta * mean KL(base || adapted) on "
        "benign prompts, base = the same model with its adapters off")
    g.add_argument("--retain-beta", type=float, default=d.retain_beta,
                   help="weight of the retain KL (default %(default)s = off, the paper's recipe)")
    g.add_argument("--retain-data", default=d.retain_data,
                   help="'gsm8k' (GSM8K minus every item the --retain-exclude-suite evaluation reads), "
                   "'diverse' (everyday benign requests of many topics + GSM8K; use --retain-targets self) "
                   "or a JSONL with prompt/response fields (default %(default)s)")
    g.add_argument("--retain-targets", choices=("gold", "self"), default=d.retain_targets,
                   help="'gold': teacher-force the set's answers; 'self': the base model's own greedy "
                   "answers (needed for --retain-data diverse) (default %(default)s)")
    g.add_argument("--retain-target-tokens", type=int, default=d.retain_target_tokens,
                   help="length of the base model's own answers with --retain-targets self")
    g.add_argument("--retain-per-step", type=int, default=d.retain_per_step,
                   help="retain examples per optimiser step (default %(default)s)")
    g.add_argument("--retain-limit", type=_optional_int, default=d.retain_limit,
                   help="retain pool size, 'none' = all (default %(default)s)")
    g.add_argument("--retain-max-length", type=int, default=d.retain_max_length)
    g.add_argument("--retain-exclude-suite", default=d.retain_exclude_suite,
                   help="evaluation suite whose GSM8K items are kept out of the retain set")
    g.add_argument("--retain-exclude-limit", type=int, default=None,
                   help="the --limit that suite will be run with (it changes which items it reads)")
    g.add_argument("--retain-exclude-seed", type=int, default=None,
                   help="the --seed that suite will be run with (default: the suite's own)")
    g = parser.add_argument_group("run directory")
    g.add_argument("--out", default=d.out, help="run directory (default %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--save-every", type=int, default=d.save_every)
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="quick evaluation every N steps")


def config_from_args(args):
    from train.sft.config import TrainConfig

    return TrainConfig(
        model=args.model, method=args.method, data=args.data, dataset=args.dataset, limit=args.limit,
        reasoning_line=args.reasoning_line, max_length=args.max_length, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, targets=args.targets, layers=args.layers, use_rslora=args.use_rslora,
        init=args.init, lr=args.lr, weight_decay=args.weight_decay, scheduler=args.scheduler,
        warmup_steps=args.warmup_steps, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, clip=args.clip or None, dtype=args.dtype,
        grad_checkpointing=args.grad_checkpointing, seed=args.seed, ortho_beta=args.ortho_beta,
        ortho_k=args.ortho_k, ortho_side=args.ortho_side, ortho_weighting=args.ortho_weighting,
        ortho_normalize=args.ortho_normalize, retain_beta=args.retain_beta, retain_data=args.retain_data,
        retain_targets=args.retain_targets, retain_target_tokens=args.retain_target_tokens,
        retain_per_step=args.retain_per_step, retain_limit=args.retain_limit,
        retain_max_length=args.retain_max_length, retain_exclude_suite=args.retain_exclude_suite,
        retain_exclude_limit=args.retain_exclude_limit,
        retain_exclude_seed=args.retain_exclude_seed, out=args.out, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, eval_every=args.eval_every).validate()


def run(args) -> int:
    from train.cli import UserError
    from train.sft.loop import TrainingDiverged, train

    config = config_from_args(args)
    evaluate_fn = None
    if config.eval_every:
        from train.eval.runner import evaluate

        def evaluate_fn(model, tokenizer, out_dir):
            # LoRA: drift against the same weights with the adapters off (no second model in memory).
            base = None
            if config.method == "lora":
                from train.demo import AdaptersOff

                base = AdaptersOff(model)
            return evaluate(model, tokenizer, suite=config.eval_suite, base_model=base, out_dir=out_dir,
                            progress=False)
    try:
        result = train(config, resume=args.resume, evaluate_fn=evaluate_fn)
    except TrainingDiverged as error:
        raise UserError(str(error)) from None
    print(f"trained {result.steps} steps in {result.train_seconds:.1f} s, final loss "
          f"{result.losses[-1] if result.losses else float('nan'):.4f}; wrote {result.output_path}")
    return 0
