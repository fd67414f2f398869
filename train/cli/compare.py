"""`lora-core compare`: results files against the first one, with paired 95% intervals for every
difference, and a safety-vs-reasoning scatter plot with 95% error bars."""
from __future__ import annotations

from pathlib import Path

from lora_core.train.eval.compare import compare_results

HELP = ("compare evaluation results against the first file (paired differences with 95% intervals; "
        "table + PNG scatter of safety against reasoning)")


def add_arguments(parser) -> None:
    parser.add_argument("results", nargs="+", help="results.json files (or directories holding one); "
                        "the first is the reference every other file is compared with")
    parser.add_argument("--x", default=None, help="safety metric for the x axis "
                        "(default safety.strongreject.refusal_rate)")
    parser.add_argument("--y", default=None, help="reasoning metric for the y axis "
                        "(default: reasoning.arc-easy.acc, else the first one all files have)")
    parser.add_argument("--bootstrap", type=int, default=10_000,
                        help="paired bootstrap resamples per difference (default 10000, at least 100)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the bootstrap; the same seed gives the same intervals (default 0)")
    parser.add_argument("--out", required=True, help="directory for comparison.md/.json/.png")


def run(args) -> int:
    made = compare_results(args.results, args.out, x_metric=args.x, y_metric=args.y,
                           bootstrap=args.bootstrap, seed=args.seed)
    print(Path(made["table"]).read_text(encoding="utf-8"))
    if made["plot"]:
        print(f"plot: {made['plot']} (x = {made['x']}, y = {made['y']})")
    else:
        print("no plot: the files share no safety and reasoning metric")
    return 0
