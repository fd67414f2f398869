"""Markdown of evaluation results: results.md (one run) and comparison.md's table and legend.

The "better" column is the metric registry's (train.eval.metric_registry); intervals are
`paired.interval95` (a rate's Wilson interval, else value ± 1.96 standard errors).
"""
from __future__ import annotations

import math
from typing import Sequence

from lora_core.train.eval.metric_registry import better_text
from lora_core.train.eval.paired import interval95

__all__ = ["markdown_table", "format_metric", "format_interval", "results_markdown", "compare_markdown",
           "compare_legend"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_metric(m: dict | None) -> str:
    """'0.250 ± 0.097' (value ± standard error) or '1.234' ; '-' when missing."""
    if not m or m.get("value") is None:
        return "-"
    value = m["value"]
    se = m.get("stderr")
    if se is not None and isinstance(se, (int, float)) and math.isfinite(se):
        return f"{value:.3f} ± {se:.3f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_interval(m: dict | None) -> str:
    """'[0.123, 0.456]': the Wilson interval of a rate, else mean ± 1.96 standard errors."""
    interval = interval95(m)
    return "-" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def _agreement_lines(judge: dict | None) -> list[str]:
    agreement = (judge or {}).get("human_agreement")
    if not agreement:
        return []
    rows = [[measure, format_metric(agreement[measure]), format_interval(agreement[measure]),
             agreement[measure].get("n", "-")] for measure in ("accuracy", "precision", "recall")]
    return ["", f"## Judge `{judge.get('name', '?')}` against human labels (pyrit refusal set)", "",
            markdown_table(["measure", "value ± s.e.", "95% interval", "n"], rows)]


def results_markdown(results: dict) -> str:
    meta = results.get("meta", {})
    title = meta.get("label") or meta.get("model") or "model"
    rows = []
    for name in sorted(results.get("metrics", {})):
        m = results["metrics"][name]
        rows.append([name, format_metric(m), format_interval(m), m.get("n", "-"), better_text(name)])
    sampling = meta.get("sampling") or {}
    decoding = (f"sampling k={sampling['k']}, T={sampling.get('temperature')}, top-p {sampling.get('top_p')}"
                if sampling.get("k") else "greedy")
    text = [f"# Evaluation: {title}", "",
            f"suite `{meta.get('suite', '?')}`, seed {meta.get('seed', '?')}, judge `{meta.get('judge', '?')}`, "
            f"{decoding}, total time {results.get('timings', {}).get('total', float('nan')):.1f} s", "",
            markdown_table(["metric", "value ± s.e.", "95% interval", "n", "better"], rows)]
    text += _agreement_lines(results.get("judge"))
    notes = list(meta.get("notes") or []) + [f"skipped: {s}" for s in meta.get("skipped") or []]
    if notes:
        text += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    timings, cpu = results.get("timings", {}), results.get("cpu_timings", {})
    if timings:
        text += ["", "## Timings (s)", "",
                 markdown_table(["part", "wall", "process CPU"],
                                [[k, f"{v:.1f}", f"{cpu[k]:.1f}" if k in cpu else "-"] for k, v in timings.items()])]
    return "\n".join(text)


def _signed(x: float) -> str:
    return f"{x:+.1e}" if 0 < abs(x) < 0.001 else f"{x:+.3f}"


def _difference_cell(c: dict | None) -> str:
    if c is None or c["difference"] is None:
        return "-"
    text = _signed(c["difference"])
    if c["ci95"] is not None:
        text += f" [{_signed(c['ci95'][0])}, {_signed(c['ci95'][1])}]"
    if c["mcnemar"] is not None:
        p = c["mcnemar"]["p_value"]
        text += " p<0.001" if p < 0.001 else f" p={p:.3f}"
    return text + (f" n={c['n_shared']}" if c["paired"] else " unpaired")


def compare_markdown(results_list: Sequence[dict], labels: Sequence[str],
                     comparisons: dict | None = None) -> str:
    """One table, one row per metric: each file's value, then each later file's difference from
    the first with its 95% interval (McNemar p for 0/1 outcomes, n shared items or 'unpaired')."""
    names = sorted({n for r in results_list for n in r["metrics"]})
    comparisons = comparisons or {}
    others = [lab for lab in labels[1:] if lab in comparisons]
    rows = [[n] + [format_metric(r["metrics"].get(n)) for r in results_list]
            + [_difference_cell(comparisons[lab].get(n)) for lab in others] + [better_text(n)] for n in names]
    header = ["metric"] + list(labels) + [f"{lab} − {labels[0]} (95% CI)" for lab in others] + ["better"]
    return markdown_table(header, rows)


def compare_legend(labels: Sequence[str], bootstrap: int, seed: int, notes: Sequence[str]) -> str:
    if len(labels) < 2:
        return ""
    lines = ["", f"Differences are each run minus `{labels[0]}` on the items both scored; the 95% "
             "interval is Newcombe's paired score interval for 0/1 outcomes (p: McNemar's exact "
             f"test) and a paired bootstrap otherwise ({bootstrap} resamples, seed {seed}, "
             "percentile); n: items shared. Bits per byte is compared as the mean of per-item "
             "values. Values are ± 1 s.e.",
             "'unpaired': a file without per-item results; the interval combines the two files' own "
             "intervals (Newcombe's square-and-add for rates, ±1.96·√(s.e.₁² + s.e.₂²) for means)."]
    return "\n".join(lines + [f"- {note}" for note in notes]) + "\n"
