"""The report's two figures, written atomically as PNG (matplotlib, Agg backend).

- safety vs reasoning: one point per arm and seed, error bars = each run's own 95% interval
  (Wilson for rates, 1.96 standard errors for means) on both axes;
- overlap per layer: the update's energy share in W's top-k subspace, mean over module types and
  seeds, for the LoRA, full fine-tuning (and rank-1 middle) arms, against the random-update baseline.
"""
from __future__ import annotations

import io
from pathlib import Path

from lora_core.common.files import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Path) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _point(entry: dict | None):
    """(value, (below, above)) error-bar lengths of one metric entry; None without a value."""
    if not entry or entry.get("value") is None:
        return None
    v = entry["value"]
    if entry.get("ci95"):
        lo, hi = entry["ci95"]
        return v, (max(0.0, v - lo), max(0.0, hi - v))
    half = 1.96 * (entry.get("stderr") or 0.0)
    return v, (half, half)


def plot_safety_vs_reasoning(run_rows: list[dict], arms: dict, safety: str, reasoning: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(r["arm"] for r in run_rows))
    for i, name in enumerate(names):
        xs, ys, xe, ye = [], [], ([], []), ([], [])
        for r in run_rows:
            px, py = _point(r["metrics"].get(reasoning)), _point(r["metrics"].get(safety))
            if r["arm"] != name or px is None or py is None:
                continue
            xs.append(px[0]), ys.append(py[0])
            xe[0].append(px[1][0]), xe[1].append(px[1][1]), ye[0].append(py[1][0]), ye[1].append(py[1][1])
        if xs:
            ax.errorbar(xs, ys, xerr=[xe[0], xe[1]], yerr=[ye[0], ye[1]], fmt="o", capsize=3, ms=5,
                        color=colors[i % len(colors)], label=arms[name].title if name in arms else name, alpha=0.8)
    ax.set_xlabel(reasoning)
    ax.set_ylabel(safety)
    ax.set_title("safety vs reasoning (one point per arm and seed, 95% intervals)", fontsize=10)
    if names:
        ax.legend(fontsize=7, loc="best")
    _save(fig, plt, path)


def _by_layer(records_by_seed: dict, k: int, side: str):
    """{layer: mean energy} and {layer: mean baseline} over seeds and module types."""
    energy, base = {}, {}
    for by_k in records_by_seed.values():
        for r in by_k.get(str(k), []):
            if r.get("layer") is None:
                continue
            energy.setdefault(r["layer"], []).append(r["energy"][side])
            base.setdefault(r["layer"], []).append(r["baseline"][side])
    mean = {L: sum(v) / len(v) for L, v in energy.items()}
    return mean, {L: sum(v) / len(v) for L, v in base.items()}


def plot_overlap_per_layer(records: dict, arms: dict, roles: dict, k: int, side: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    shown = [roles.get(r) for r in ("lora", "full", "rank1_middle") if roles.get(r) in records]
    baseline = {}
    for name in shown:
        mean, base = _by_layer(records[name], k, side)
        layers = sorted(mean)
        ax.plot(layers, [mean[L] for L in layers], "o-", ms=3, label=arms[name].title)
        for L in layers:
            baseline.setdefault(L, base[L])
    if baseline:
        layers = sorted(baseline)
        ax.plot(layers, [baseline[L] for L in layers], "k--", lw=1, label="random update")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{side} energy share in W's top-{k} subspace")
    ax.set_title(f"overlap per layer (mean over module types and seeds), k={k}", fontsize=10)
    if shown:
        ax.legend(fontsize=8)
    _save(fig, plt, path)
