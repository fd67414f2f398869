"""comparison.png: safety vs reasoning with 95% error bars, and beside it each run's paired change
from the reference (the differences comparison.md reports)."""
from __future__ import annotations

from typing import Sequence

from lora_core.common.plotting import png_bytes, pyplot
from lora_core.train.eval.metric_registry import is_proportion
from lora_core.train.eval.paired import error_bar

__all__ = ["scatter_png", "plot_panels"]


def _bar(err):
    if err is None:
        return None
    below, above = (err, err) if isinstance(err, (int, float)) else err
    return [[below], [above]]  # (2, 1): matplotlib's asymmetric form


def scatter_png(panels: Sequence[dict]) -> bytes:
    """PNG bytes of side-by-side scatter panels.

    Each panel: {"points": [(label, x, y, x_err, y_err)], "x_label", "y_label", "title",
    "unit_x", "unit_y", "zero_lines", "colors"}; an error is None, a number (symmetric) or
    (below, above); "colors" (one per point) keeps a run the same colour in every panel.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), dpi=120, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        colors = panel.get("colors") or [f"C{i % 10}" for i in range(len(panel["points"]))]
        for point, color in zip(panel["points"], colors):
            label, x, y = point[:3]
            x_err, y_err = (tuple(point[3:5]) + (None, None))[:2]
            ax.errorbar([x], [y], xerr=_bar(x_err), yerr=_bar(y_err), fmt="o", markersize=6, capsize=3,
                        color=color)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if panel.get("unit_x"):
            ax.set_xlim(-0.02, 1.02)
        if panel.get("unit_y"):
            ax.set_ylim(-0.02, 1.02)
        if panel.get("zero_lines"):
            ax.axhline(0.0, color="grey", lw=0.8)
            ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_xlabel(panel["x_label"])
        ax.set_ylabel(panel["y_label"])
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.grid(alpha=0.3)
    return png_bytes(fig)


def plot_panels(results_list, labels, comparisons, x: str, y: str) -> list[dict]:
    """Values with their 95% intervals; beside them, when both axes pair, each run's paired change
    from the reference with its 95% interval (the differences the table reports). A proportion's
    axis is [0, 1], so that proportions from different plots read the same."""
    points = [(lab, r["metrics"][x]["value"], r["metrics"][y]["value"],
               error_bar(r["metrics"][x]), error_bar(r["metrics"][y])) for lab, r in zip(labels, results_list)]
    panels = [{"points": points, "x_label": x, "y_label": y, "unit_x": is_proportion(x), "unit_y": is_proportion(y),
               "title": "safety vs reasoning (95% intervals)"}]
    changes, colors = [], []
    for i, lab in enumerate(labels[1:], start=1):
        cx, cy = comparisons[lab].get(x), comparisons[lab].get(y)
        if not (cx and cy and cx["paired"] and cy["paired"] and cx["ci95"] and cy["ci95"]):
            continue
        dx, dy = cx["difference"], cy["difference"]
        changes.append((lab, dx, dy, (dx - cx["ci95"][0], cx["ci95"][1] - dx),
                        (dy - cy["ci95"][0], cy["ci95"][1] - dy)))
        colors.append(f"C{i % 10}")
    if changes:
        panels.append({"points": changes, "colors": colors, "x_label": f"Δ {x}", "y_label": f"Δ {y}",
                       "zero_lines": True,
                       "title": f"paired change from {labels[0]} (95% bootstrap intervals)"})
    return panels
