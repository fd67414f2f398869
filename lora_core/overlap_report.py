"""Writers for an `OverlapReport`: JSON (everything), Markdown (summary tables), PNG (by layer / type).

All writes are atomic (lora_core.common.files), so a reader never sees half a report; matplotlib
is imported lazily with the Agg backend (lora_core.common.plotting).
"""
from __future__ import annotations

from pathlib import Path

from lora_core.common.files import atomic_write_json, atomic_write_text
from lora_core.common.plotting import pyplot, write_png
from lora_core.common.text import fmt_number
from lora_core.overlap import OverlapReport
from lora_core.regularizer import SIDES


def write_json(report: OverlapReport, path) -> Path:
    return atomic_write_json(path, report.to_dict(), sort_keys=False)


def _fmt(x) -> str:
    return fmt_number(x, ".4g", nan="-")


def markdown(report: OverlapReport) -> str:
    s = report.summary()
    kind = "LoRA adapter (dW = s B A)" if report.source == "lora" else "full fine-tuning (dW = tuned - base)"
    lines = [
        "# Overlap of the update with the base weights' top-k subspace",
        "",
        f"Update: {kind}. k = {report.k} (capped per module by min(N, K)); SVD dtype {report.svd_dtype}.",
        "Energy = share of ||dW||_F^2 inside W's top-k left (column) / right (row) / both subspaces;",
        "baseline = the share a random update has (k/N, k/K, k^2/(NK)); ratio = energy / baseline "
        "(1 = no preference, < 1 = avoids W's principal directions).",
        "",
    ]

    def table(title, rows):
        out = [f"## {title}", "",
               "| group | modules | column energy | baseline | ratio | row energy | baseline | ratio | "
               "both energy | ratio | mean cos^2 | stable rank |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, a in rows:
            out.append(
                f"| {key} | {a['modules']} | {_fmt(a.get('energy_column'))} | {_fmt(a.get('baseline_column'))} | "
                f"{_fmt(a.get('ratio_column'))} | {_fmt(a.get('energy_row'))} | {_fmt(a.get('baseline_row'))} | "
                f"{_fmt(a.get('ratio_row'))} | {_fmt(a.get('energy_both'))} | {_fmt(a.get('ratio_both'))} | "
                f"{_fmt(a.get('left_mean_cos2'))} | {_fmt(a.get('stable_rank'))} |"
            )
        return out + [""]

    lines += table("Overall", [("all", s["overall"])])
    lines += table("By module type", list(s["by_module_type"].items()))
    lines += table("By layer", list(s["by_layer"].items()))
    if s["zero_updates"]:
        lines += [f"Modules with an all-zero update (not in the means): {', '.join(s['zero_updates'])}", ""]
    if report.skipped:
        lines += [f"Skipped: {', '.join(x['name'] + ' (' + x['reason'] + ')' for x in report.skipped)}", ""]
    methods = sorted({r["svd"]["method"] for r in report.records})
    worst = max((r["svd"]["rel_residual"] for r in report.records), default=0.0)
    lines += [f"SVD of W: {', '.join(methods)}; largest relative residual ||W v - s u|| / s = {worst:.2e}.", ""]
    return "\n".join(lines)


def write_markdown(report: OverlapReport, path) -> Path:
    return atomic_write_text(path, markdown(report))


def write_plot(report: OverlapReport, path, side: str = "column") -> Path:
    """Energy fraction by layer (one line per module type) and by module type, with baselines."""
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}: expected one of {', '.join(SIDES)}")
    plt = pyplot()
    live = [r for r in report.records if not r["zero_update"]]
    types = sorted({r["module_type"] for r in live})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(types):
        rows = sorted((r for r in live if r["module_type"] == t and r["layer"] is not None), key=lambda r: r["layer"])
        if not rows:
            continue
        c = colors[i % len(colors)]
        ax1.plot([r["layer"] for r in rows], [r["energy"][side] for r in rows], "o-", color=c, label=t, ms=3)
        ax1.plot([r["layer"] for r in rows], [r["baseline"][side] for r in rows], "--", color=c, lw=1)
    ax1.set_xlabel("layer")
    ax1.set_ylabel(f"{side} energy fraction in top-{report.k} subspace")
    ax1.set_title("by layer (dashed: random-update baseline)")
    if types:
        ax1.legend(fontsize=8)
    summ = report.summary()["by_module_type"]
    xs = range(len(types))
    ax2.bar(xs, [summ[t][f"energy_{side}"] for t in types], color=[colors[i % len(colors)] for i in xs],
            label="update")
    ax2.scatter(xs, [summ[t][f"baseline_{side}"] for t in types], color="k", marker="_", s=600, zorder=3,
                label="random baseline")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(types, rotation=30)
    ax2.set_title(f"mean by module type ({report.source}, k={report.k})")
    ax2.legend(fontsize=8)
    return write_png(fig, path, dpi=110)


def write_all(report: OverlapReport, out_dir, side: str = "column") -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "json": write_json(report, out_dir / "overlap.json"),
        "markdown": write_markdown(report, out_dir / "overlap.md"),
        "plot": write_plot(report, out_dir / "overlap.png", side=side),
    }
