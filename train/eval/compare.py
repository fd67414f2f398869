"""`lora-core compare`: results files lined up against the first one.

Everything a comparison needs is checked and computed before the first byte is written, so a bad
file gives a one-line error and leaves no half-made comparison behind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lora_core.common.files import atomic_write_bytes, atomic_write_text
from lora_core.train.eval.compare_plot import plot_panels, scatter_png
from lora_core.train.eval.paired import (ci95_of, is_number, normal_unpaired_interval, paired_difference,
                                         square_and_add_interval)
from lora_core.train.eval.report_markdown import compare_legend, compare_markdown
from lora_core.train.eval.result_files import load_checked, write_results_json

__all__ = ["compare_results", "PLOT_X", "PLOT_Y"]

# The plot's default axes: the first metric every file has a value of.
PLOT_X = ("safety.strongreject.refusal_rate", "safety.harmbench.refusal_rate")
PLOT_Y = ("reasoning.arc-easy.acc", "reasoning.gsm8k.bpb", "reasoning.gsm8k.exact_match", "reasoning.math500.bpb",
          "reasoning.arc-challenge.acc")


def _labels(results_list: Sequence[dict], paths: Sequence[str | Path] | None) -> list[str]:
    labels = []
    for i, r in enumerate(results_list):
        meta = r.get("meta", {})
        label = meta.get("label") or (Path(paths[i]).parent.name if paths else "") or meta.get("model") or f"run{i}"
        labels.append(str(label))
    # Identical labels would make the table ambiguous; a suffix must not collide with a real label.
    taken = set()
    for i, label in enumerate(labels):
        unique, j = label, i
        while unique in taken or (unique != label and unique in labels):
            unique, j = f"{label}#{j}", j + 1
        labels[i] = unique
        taken.add(unique)
    return labels


def _unpaired(ref: dict, other: dict) -> dict:
    """Difference and interval from the two summaries alone (no per-item results to pair)."""
    a, b = ref.get("value"), other.get("value")
    out = {"paired": False, "n_shared": None, "mcnemar": None, "ci95": None,
           "difference": b - a if is_number(a) and is_number(b) else None, "method": "unpaired: no interval"}
    if out["difference"] is None:
        return out
    if ci95_of(ref) is not None and ci95_of(other) is not None:
        # With Wilson intervals this is Newcombe's hybrid score interval for independent rates.
        out["ci95"] = list(square_and_add_interval(a, ci95_of(ref), b, ci95_of(other)))
        out["method"] = "unpaired: square-and-add of the 95% intervals"
    elif is_number(ref.get("stderr")) and is_number(other.get("stderr")):
        out["ci95"] = list(normal_unpaired_interval(a, ref["stderr"], b, other["stderr"]))
        out["method"] = "unpaired: ±1.96·√(s.e.₁² + s.e.₂²)"
    return out


def _compare_pair(ref: dict, other: dict, name: str, bootstrap: int, seed: int) -> dict:
    items_ref, items_other = ref.get("items", {}).get(name), other.get("items", {}).get(name)
    m_ref, m_other = ref["metrics"][name], other["metrics"][name]
    base = {"reference": m_ref.get("value"), "value": m_other.get("value")}
    if items_ref is not None and items_other is not None:
        shared = set(items_ref["ids"]) & set(items_other["ids"])
        if shared:
            # A fresh generator per metric: a metric's interval does not depend on the others present.
            got = paired_difference(items_ref["ids"], items_ref["values"], items_other["ids"],
                                    items_other["values"], resamples=bootstrap, seed=seed)
            return {**base, "paired": True, **got}
        return {**base, **_unpaired(m_ref, m_other), "note": "no shared item ids"}
    return {**base, **_unpaired(m_ref, m_other)}


def _comparisons(results_list: Sequence[dict], labels: Sequence[str], bootstrap: int, seed: int):
    """({label: {metric: comparison}} for every file after the first, notes for the reader)."""
    ref, comparisons, notes = results_list[0], {}, []
    for label, other in zip(labels[1:], results_list[1:]):
        names = sorted(set(ref["metrics"]) & set(other["metrics"]))
        comparisons[label] = {name: _compare_pair(ref, other, name, bootstrap, seed) for name in names}
        unpaired = [n for n, c in comparisons[label].items() if not c["paired"]]
        if unpaired:
            why = ("no per-item results in one of the files"
                   if not (ref.get("items") and other.get("items")) else "no per-item results to pair")
            notes.append(f"{label} vs {labels[0]}: {len(unpaired)} of {len(names)} metrics unpaired "
                         f"({why}); their intervals ignore the pairing and are wider")
    return comparisons, notes


def _plot_metric(results_list, paths, given: str | None, preferred: Sequence[str]) -> str | None:
    if given is None:
        return next((name for name in preferred if all(
            name in r["metrics"] and is_number(r["metrics"][name].get("value")) for r in results_list)), None)
    for r, path in zip(results_list, paths):
        if given not in r["metrics"]:
            raise ValueError(f"metric {given!r} is missing from {path}")
        if not is_number(r["metrics"][given].get("value")):
            raise ValueError(f"metric {given!r} has no value in {path}")
    return given


def compare_results(paths: Sequence[str | Path], out_dir: str | Path, x_metric: str | None = None,
                    y_metric: str | None = None, bootstrap: int = 10_000, seed: int = 0) -> dict:
    """Compare results files against the first: comparison.md (one table), comparison.json (every
    number) and comparison.png (safety vs reasoning, 95% error bars; paired changes beside them).

    For every later file and every metric both files have: the difference (later − first) on the
    items both scored, a paired bootstrap 95% interval (`bootstrap` resamples, `seed`), McNemar's
    exact p for 0/1 outcomes and the number of shared items; files without per-item results get
    unpaired intervals, marked as such. Plot defaults: x = StrongREJECT refusal rate (else
    HarmBench), y = the first reasoning measure every file has (ARC-Easy acc, then GSM8K BPB, ...).
    Every file is checked and everything computed before anything is written.
    """
    if not paths:
        raise ValueError("compare needs at least one results file")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 100:
        raise ValueError(f"--bootstrap must be a whole number of at least 100 resamples, got {bootstrap!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    loaded = [load_checked(p) for p in paths]
    results_list, files = [r for r, _ in loaded], [f for _, f in loaded]
    labels = _labels(results_list, files)
    x = _plot_metric(results_list, files, x_metric, PLOT_X)
    y = _plot_metric(results_list, files, y_metric, PLOT_Y)
    comparisons, notes = _comparisons(results_list, labels, bootstrap, seed)
    markdown = ("# Comparison\n\n" + compare_markdown(results_list, labels, comparisons)
                + compare_legend(labels, bootstrap, seed, notes))
    report = {"reference": labels[0], "labels": labels, "files": [str(f) for f in files],
              "settings": {"bootstrap": bootstrap, "seed": seed, "confidence": 0.95},
              "metrics": {lab: r["metrics"] for lab, r in zip(labels, results_list)},
              "comparisons": comparisons, "notes": notes}
    png = scatter_png(plot_panels(results_list, labels, comparisons, x, y)) if x and y else None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.md", markdown)
    write_results_json(out / "comparison.json", report)
    made = {"table": str(out / "comparison.md"), "json": str(out / "comparison.json"), "plot": None}
    if png is not None:
        made["plot"] = str(atomic_write_bytes(out / "comparison.png", png))
    made.update(x=x, y=y, labels=labels)
    return made
