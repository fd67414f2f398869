"""`lora-core eval`: safety and reasoning measurements of a model (optionally with a LoRA adapter)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from lora_core import load_adapter
from lora_core.models import load_model
from lora_core.models.loading import resolve_source
from lora_core.models.registry import DEFAULT_MODEL
from lora_core.train.cli._device import add_device_arguments, placement
from lora_core.train.cli._paths import check_output_dir
from lora_core.train.eval.judges import GuardModelJudge
from lora_core.train.eval.report_markdown import results_markdown
from lora_core.train.eval.runner import evaluate
from lora_core.train.eval.suites import SUITES

HELP = ("evaluate safety (refusal, over-refusal) and reasoning (GSM8K, MATH-500, ARC, HumanEval/MBPP "
        "with --execute-code, drift) of a model")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="registry name, HF directory or .gguf (default %(default)s)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) to load on top")
    parser.add_argument("--suite", choices=("quick", "standard", "full"), default="quick",
                        help="quick: a smoke run (~2 min on a 2-core CPU for the 135M default); standard: "
                        "every set at a size that carries a comparison (~6 min); full: whole sets")
    parser.add_argument("--limit", type=int, default=None, help="cap every subset at N items")
    parser.add_argument("--seed", type=int, default=None, help="seed of the subsets (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="override every per-task generation budget")
    parser.add_argument("--samples", type=int, default=None,
                        help="sampled answers per exact-match or code item (pass@1 averaged over them, next to "
                        "greedy); 0 turns sampling off (default: the suite's)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.6)")
    parser.add_argument("--top-p", type=float, default=None, help="sampling nucleus (default 0.95)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--no-drift", action="store_true",
                        help="with --adapter: skip the KL drift from the base model (saves a second model)")
    parser.add_argument("--guard", default=None,
                        help="judge refusals with this local Llama-Guard-style checkpoint instead of keywords "
                        "(e.g. a Llama-Guard-3-1B GGUF or HF directory)")
    parser.add_argument("--guard-mode", choices=("likelihood", "generate"), default="likelihood",
                        help="likelihood: the guard's verdict is the likelier of 'safe'/'unsafe'; "
                        "generate: decode and parse its first line")
    parser.add_argument("--execute-code", action="store_true",
                        help="run HumanEval and MBPP pass@1 (standard and full suites): executes model-written "
                        "code in a separate process with time/memory limits, empty environment and a temp dir "
                        "- not a security sandbox")
    parser.add_argument("--label", default=None, help="name of this run in comparisons")
    parser.add_argument("--out", required=True, help="output directory for results.json/.md and generations.jsonl")

    add_device_arguments(parser)


def run(args) -> int:
    out = check_output_dir(args.out)
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise FileNotFoundError(f"--adapter {args.adapter} is not a directory")
    suite = _suite_with_sampling(SUITES[args.suite], args)

    device, dtype = placement(args)  # a device this machine lacks is refused before the load
    # A guard that cannot be found is reported before minutes of model loading, not after.
    guard_source = resolve_source(args.guard) if args.guard is not None else None
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    base_model = None
    if args.adapter is not None:
        if not args.no_drift:
            base_model, _ = load_model(args.model, dtype=dtype, device=device)
            base_model.eval()
        load_adapter(model, args.adapter, base_model=str(args.model))  # warns when it names another model
    judge = None
    if args.guard is not None:
        judge = GuardModelJudge.from_source(str(guard_source), mode=args.guard_mode)
    meta = {"model": args.model, "adapter": args.adapter, "guard": args.guard, "suite": args.suite,
            "label": args.label or (Path(args.adapter).name if args.adapter else str(args.model))}
    results = evaluate(model, tokenizer, suite=suite, base_model=base_model, out_dir=out,
                       progress=True, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       limit=args.limit, judge=judge, seed=args.seed, meta=meta,
                       allow_code_execution=args.execute_code)
    print(results_markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'generations.jsonl'}")
    return 0


def _suite_with_sampling(cfg, args):
    """The suite with --samples/--temperature/--top-p applied (checked before any model loads)."""
    changes = {k: v for k, v in (("k", args.samples), ("temperature", args.temperature),
                                 ("top_p", args.top_p)) if v is not None}
    if not changes:
        return cfg
    try:
        sampling = dataclasses.replace(cfg.sampling, **changes)
    except ValueError as error:
        raise ValueError(f"--samples/--temperature/--top-p: {error}") from None
    return dataclasses.replace(cfg, sampling=sampling)
