"""`lora-core eval`: safety and reasoning measurements of a model (optionally with a LoRA adapter)."""
from __future__ import annotations

HELP = "evaluate safety (refusal, over-refusal) and reasoning (GSM8K, MATH-500, ARC, drift) of a model"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="registry name, HF directory or .gguf (default %(default)s)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) to load on top")
    parser.add_argument("--suite", choices=("quick", "full"), default="quick",
                        help="quick: small fixed-seed subsets (minutes on CPU); full: whole sets")
    parser.add_argument("--limit", type=int, default=None, help="cap every subset at N items")
    parser.add_argument("--seed", type=int, default=None, help="seed of the subsets (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override generation lengths")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--no-drift", action="store_true",
                        help="with --adapter: skip the KL drift from the base model (saves a second model)")
    parser.add_argument("--guard", default=None,
                        help="judge refusals with this local Llama-Guard-style checkpoint instead of keywords")
    parser.add_argument("--execute-code", action="store_true",
                        help="run HumanEval (full suite): executes model-written code in a separate process "
                        "with time/memory limits, empty environment and a temp dir - not a security sandbox")
    parser.add_argument("--label", default=None, help="name of this run in comparisons")
    parser.add_argument("--out", required=True, help="output directory for results.json/.md and generations.jsonl")


def run(args) -> int:
    from pathlib import Path

    from models import load_model
    from train.eval.runner import evaluate
    from train.eval.reports import results_markdown

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise FileNotFoundError(f"--adapter {args.adapter} is not a directory")
    _check_writable(out)
    model, tokenizer = load_model(args.model)
    base_model = None
    if args.adapter is not None:
        from lora_core import load_adapter

        if not args.no_drift:
            base_model, _ = load_model(args.model)
            base_model.eval()
        load_adapter(model, args.adapter)
    judge = None
    if args.guard is not None:
        from train.eval.judges import GuardModelJudge

        judge = GuardModelJudge.from_source(args.guard)
    meta = {"model": args.model, "adapter": args.adapter, "label": args.label or (
        Path(args.adapter).name if args.adapter else str(args.model))}
    results = evaluate(model, tokenizer, suite=args.suite, base_model=base_model, out_dir=out,
                       progress=True, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       limit=args.limit, judge=judge, seed=args.seed, meta=meta,
                       allow_code_execution=args.execute_code)
    print(results_markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'generations.jsonl'}")
    return 0


def _check_writable(out) -> None:
    """Fail before an evaluation of minutes, not after it: the results must have somewhere to go."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lora-core-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {out} is not writable ({error.strerror or error}); choose another folder") from None
