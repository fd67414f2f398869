"""`lora-core compare`: several results.json side by side, and a safety-vs-reasoning scatter plot."""
from __future__ import annotations

HELP = "compare evaluation results (table + PNG scatter of safety against reasoning)"


def add_arguments(parser) -> None:
    parser.add_argument("results", nargs="+", help="results.json files (or directories holding one)")
    parser.add_argument("--x", default=None, help="safety metric for the x axis "
                        "(default safety.strongreject.refusal_rate)")
    parser.add_argument("--y", default=None, help="reasoning metric for the y axis "
                        "(default: reasoning.arc-easy.acc, else the first one all files have)")
    parser.add_argument("--out", required=True, help="directory for comparison.md/.json/.png")


def run(args) -> int:
    from pathlib import Path

    from train.eval.reports import compare_results

    made = compare_results(args.results, args.out, x_metric=args.x, y_metric=args.y)
    print(Path(made["table"]).read_text(encoding="utf-8"))
    if made["plot"]:
        print(f"plot: {made['plot']} (x = {made['x']}, y = {made['y']})")
    else:
        print("no plot: the files share no safety and reasoning metric")
    return 0
