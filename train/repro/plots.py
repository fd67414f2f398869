"""The report's two figures, written atomically as PNG (matplotlib, Agg backend).

- safety vs reasoning: one point per arm and seed, error bars = each run's own 95% interval
  (Wilson for rates, 1.96 standard errors for means: train.eval.paired.error_bar) on both axes;
  beside it, each run's paired difference from the base model on the same items, with the claims'
  paired interval;
- overlap per layer: the update's energy share in W's top-k subspace over the random-update
  baseline, mean over module types and seeds, for the LoRA and full fine-tuning arms (both learning
  rates) and the rank-1 middle arm.
"""
from __future__ import annotations

from pathlib import Path

from lora_core.common.plotting import pyplot, write_png
from lora_core.train.eval.paired import error_bar
from lora_core.train.repro.claims import pooled_difference


def _point(entry: dict | None):
    """(value, (below, above)) error-bar lengths of one metric entry (no interval: no bar); None
    without a value."""
    if not entry or entry.get("value") is None:
        return None
    return entry["value"], error_bar(entry) or (0.0, 0.0)


def _paired_point(base: dict, run: dict, resamples: int):
    """(difference run - base, (below, above)) over shared items, with claims' paired interval."""
    d = pooled_difference({0: base}, {0: run}, resamples=resamples)
    if d["difference"] is None or d["ci95"] is None:
        return None
    v, (lo, hi) = d["difference"], d["ci95"]
    return v, (max(0.0, v - lo), max(0.0, hi - v))


MARKERS = "osD^vPX<>p"


def _style(i: int, plt) -> dict:
    """Colour and marker of the i-th arm: 20 colours x 10 markers, so a grid of many arms stays legible."""
    colors = plt.get_cmap("tab20").colors
    return {"color": colors[i % len(colors)], "marker": MARKERS[(i // 2) % len(MARKERS)]}


def _scatter(ax, points: dict, arms: dict, plt) -> None:
    """points[arm] = [(x point, y point), ...]: one error-bar marker per run, one style per arm."""
    for i, (name, runs) in enumerate(points.items()):
        runs = [(px, py) for px, py in runs if px is not None and py is not None]
        if not runs:
            continue
        xs, ys = [px[0] for px, _ in runs], [py[0] for _, py in runs]
        xerr = [[px[1][0] for px, _ in runs], [px[1][1] for px, _ in runs]]
        yerr = [[py[1][0] for _, py in runs], [py[1][1] for _, py in runs]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, ls="none", capsize=3, ms=5, **_style(i, plt),
                    label=arms[name].title if name in arms else name, alpha=0.8)


def plot_safety_vs_reasoning(run_rows: list[dict], arms: dict, safety: str, reasoning: str, path: Path,
                             values: dict | None = None, base: str | None = None, resamples: int = 2000) -> None:
    """Left: each run's own values and intervals. Right (with per-item `values` and a `base` arm):
    each run's paired difference from the base model on the same items, with the claims' paired
    interval; item-to-item spread cancels there, so it shows what the left panel's wide bars hide."""
    plt = pyplot()
    paired = bool(values) and base in (values or {})
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(13 if paired else 7, 5), squeeze=False)
    names = list(dict.fromkeys(r["arm"] for r in run_rows))
    own = {name: [(_point(r["metrics"].get(reasoning)), _point(r["metrics"].get(safety)))
                  for r in run_rows if r["arm"] == name] for name in names}
    ax = axes[0][0]
    _scatter(ax, own, arms, plt)
    ax.set_xlabel(reasoning)
    ax.set_ylabel(safety)
    ax.set_title("each run (arm x seed): value, 95% interval", fontsize=10)
    if paired:
        base_values = next(iter(values[base].values()))
        diffs = {}
        for r in run_rows:
            run = values.get(r["arm"], {}).get(r["seed"], {})
            if r["arm"] == base or reasoning not in run or safety not in run:
                continue
            diffs.setdefault(r["arm"], []).append(
                (_paired_point(base_values[reasoning], run[reasoning], resamples),
                 _paired_point(base_values[safety], run[safety], resamples)))
        # the same colour per arm in both panels: keep the left panel's order, base included
        diffs = {name: diffs.get(name, []) for name in names}
        ax = axes[0][1]
        _scatter(ax, diffs, arms, plt)
        ax.axhline(0, color="k", lw=0.8)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel(f"{reasoning}: run - base (paired)")
        ax.set_ylabel(f"{safety}: run - base (paired)")
        ax.set_title("each run minus the base model, same items (paired 95%)", fontsize=10)
    if names:  # the left panel has every arm, the base model included
        handles, labels = axes[0][0].get_legend_handles_labels()
        axes[0][-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    write_png(fig, path, dpi=110, bbox_inches="tight")  # "tight": keeps a legend placed outside


def _by_layer(records_by_seed: dict, k: int, side: str) -> dict:
    """{layer: mean of energy / random baseline} over seeds and module types."""
    ratios = {}
    for by_k in records_by_seed.values():
        for r in by_k.get(str(k), []):
            if r.get("layer") is None or not r["baseline"][side] > 0:
                continue
            ratios.setdefault(r["layer"], []).append(r["energy"][side] / r["baseline"][side])
    return {L: sum(v) / len(v) for L, v in ratios.items()}


OVERLAP_ROLES = ("lora", "full", "lora_high_lr", "full_high_lr", "rank1_middle")


def plot_overlap_per_layer(records: dict, arms: dict, roles: dict, k: int, side: str, path: Path) -> None:
    """Energy share over the random baseline, per layer: a ratio, so module types with different
    baselines (k/m for an m-row weight) average fairly and arms that adapt different modules
    (rank 1 on up_proj vs r=8 on every linear) share one scale; 1 is a random update."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    shown = [roles.get(r) for r in OVERLAP_ROLES if roles.get(r) in records]
    for name in shown:
        ratio = _by_layer(records[name], k, side)
        layers = sorted(ratio)
        ax.plot(layers, [ratio[L] for L in layers], "o-", ms=3, label=arms[name].title)
    ax.axhline(1.0, color="k", ls="--", lw=1, label="random update")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{side} energy share in W's top-{k} subspace / random")
    ax.set_title(f"overlap per layer over the random baseline (mean over module types and seeds), k={k}",
                 fontsize=10)
    ax.legend(fontsize=8)
    write_png(fig, path, dpi=110, bbox_inches="tight")  # "tight": keeps a legend placed outside


def _arm_bar(entry: dict) -> tuple[float, float]:
    """(below, above) error-bar lengths of an arm-table entry ({"mean", "ci95"}); no interval: no bar."""
    return error_bar({"value": entry["mean"], "ci95": entry.get("ci95")}) or (0.0, 0.0)


def plot_matched_safety(curves: dict, arm_rows: list[dict], arms: dict, safety: str, reasoning: str,
                        target: float, path: Path) -> None:
    """The methods' safety-vs-reasoning curves over their learning-rate searches in one picture:
    one line per method through its arms (search order), the arm selected at matched safety
    ringed, the target as a vertical line. Points: each arm's evaluated means, seeds pooled, with
    their 95% intervals (the arm table's), so a method that buys safety with reasoning shows as a
    curve falling to the right."""
    plt = pyplot()
    by_arm = {row["arm"]: row["metrics"] for row in arm_rows}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (method, info) in enumerate(curves.items()):
        points = []
        for entry in info["curve"]:
            m = by_arm.get(entry["arm"], {})
            s, r = m.get(safety), m.get(reasoning)
            if s and r and s.get("mean") is not None and r.get("mean") is not None:
                points.append((entry["arm"], s, r))
        if not points:
            continue
        style = _style(2 * i, plt)
        xs, ys = [s["mean"] for _, s, _ in points], [r["mean"] for _, _, r in points]
        xbars = [_arm_bar(s) for _, s, _ in points]
        ybars = [_arm_bar(r) for _, _, r in points]
        ax.errorbar(xs, ys, xerr=[list(b) for b in zip(*xbars)], yerr=[list(b) for b in zip(*ybars)],
                    capsize=3, ms=5, lw=1.2, label=method, **style)
        for (arm, s, r) in points:
            ax.annotate(arms[arm].title if arm in arms else arm, (s["mean"], r["mean"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
            if arm == info["selected"]:
                ax.plot([s["mean"]], [r["mean"]], marker="o", ms=14, mfc="none", mec=style["color"], mew=2)
    ax.axvline(target, color="k", ls="--", lw=0.8, label=f"target {target:g} (validation)")
    ax.set_xlabel(f"{safety} (evaluation items)")
    ax.set_ylabel(reasoning)
    ax.set_title("learning-rate searches: safety vs reasoning (ringed: selected at matched safety)", fontsize=9)
    ax.legend(fontsize=7)
    write_png(fig, path, dpi=110, bbox_inches="tight")
