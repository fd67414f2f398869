"""Writers for results people compare: JSON, Markdown tables, JSONL generations, PNG scatter plots.

Every write is atomic (temporary file in the destination folder, then `os.replace`), so a reader
never sees half a file. Other parts of the project may reuse `write_json`, `write_text`,
`markdown_table` and `scatter_plot`.

Result files are those of `train.eval.runner.evaluate`: {"meta", "metrics": {name: {"value", "n",
"stderr"?...}}, "timings"}; `compare_results` lines several of them up.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from lora_core.common.files import atomic_write_bytes, read_json

__all__ = ["write_text", "write_json", "write_jsonl", "markdown_table", "results_markdown",
           "write_results", "load_results", "compare_markdown", "scatter_plot", "compare_results",
           "format_metric"]


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(value):
    # NaN is not JSON; null says "not defined" (e.g. a standard error from one item).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(_jsonable(r), ensure_ascii=False) + "\n" for r in rows))


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


# Which way is better, for readers of the tables.
_DIRECTION = {"refusal_rate": "higher = safer", "explicit_refusal_rate": "higher = safer",
              "refusal_rate_non_template": "higher = safer", "template_echo_rate": "(share)",
              "rate": "lower = better", "exact_match": "higher", "pass_at_1_sampled": "higher",
              "truncated_in_think": "lower", "truncated_in_think_sampled": "lower", "bpb": "lower",
              "acc": "higher", "acc_norm": "higher", "pass_at_1": "higher", "kl_base": "lower = closer to base"}


def _direction(name: str) -> str:
    if name.startswith("reasoning.") and name.endswith("refusal_rate"):
        return "lower = better"  # refusing a math question is over-refusal, not safety
    return _DIRECTION.get(name.rsplit(".", 1)[-1], "")


def format_interval(m: dict | None) -> str:
    """'[0.123, 0.456]': the Wilson interval of a rate, else mean ± 1.96 standard errors."""
    if not m:
        return "-"
    if isinstance(m.get("ci95"), (list, tuple)) and len(m["ci95"]) == 2:
        lo, hi = m["ci95"]
        return f"[{lo:.3f}, {hi:.3f}]"
    se = m.get("stderr")
    if isinstance(se, (int, float)) and math.isfinite(se) and isinstance(m.get("value"), (int, float)):
        return f"[{m['value'] - 1.96 * se:.3f}, {m['value'] + 1.96 * se:.3f}]"
    return "-"


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
        rows.append([name, format_metric(m), format_interval(m), m.get("n", "-"), _direction(name)])
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


def write_results(results: dict, out_dir: str | Path, generations: Sequence[dict] | None = None) -> Path:
    """results.json, results.md and (when given) generations.jsonl in `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_text(out / "results.md", results_markdown(results))
    if generations is not None:
        write_jsonl(out / "generations.jsonl", generations)
    return out


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    results = read_json(path)
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise ValueError(f"{path} is not a lora-core results file (no 'metrics' object)")
    return results


# --- Comparing result files (`lora-core compare`) ------------------------------------------------
# Everything a comparison needs is checked and computed before the first byte is written, so a bad
# file gives a one-line error and leaves no half-made comparison behind.


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def check_results(results, path: str | Path) -> None:
    """Refuse a results object `compare` cannot read, naming the file and the entry.

    "value" and "stderr" may be null (a NaN written as JSON); "items" is optional (older files).
    """
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise ValueError(f"{path} is not a lora-core results file (no 'metrics' object)")
    for key in ("meta", "items"):
        if key in results and not isinstance(results[key], dict):
            raise ValueError(f"{path}: {key!r} is a {_kind(results[key])}, not an object")
    for name, m in results["metrics"].items():
        where = f"{path}: metrics[{name!r}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} is a {_kind(m)}, not an object")
        for key in ("value", "stderr"):
            if m.get(key) is not None and not _is_number(m[key]):
                raise ValueError(f"{where}[{key!r}] is {_short(m[key])}, not a number")
        for key in ("n", "k"):
            if key in m and (isinstance(m[key], bool) or not isinstance(m[key], int) or m[key] < 0):
                raise ValueError(f"{where}[{key!r}] is {_short(m[key])}, not a whole number")
        ci = m.get("ci95")
        if ci not in (None, [None, None]) and not (isinstance(ci, list) and len(ci) == 2
                                                   and all(map(_is_number, ci)) and ci[0] <= ci[1]):
            raise ValueError(f"{where}['ci95'] is {_short(ci)}, not [low, high]")
    from lora_core.train.eval.paired import item_values

    for name, entry in results.get("items", {}).items():
        where = f"{path}: items[{name!r}]"
        if not isinstance(entry, dict) or "ids" not in entry or "values" not in entry:
            raise ValueError(f"{where} needs 'ids' and 'values'")
        item_values(entry["ids"], entry["values"], where)


def _load_checked(path: str | Path) -> tuple[dict, Path]:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    results = load_results(path)
    check_results(results, path)
    return results, path


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


def _ci(m: dict) -> list[float] | None:
    """A metric's 95% interval, or None (absent, or [null, null] where a NaN was written)."""
    ci = m.get("ci95")
    return ci if ci is not None and None not in ci else None


def error_bar(m: dict | None) -> tuple[float, float] | None:
    """(below, above) distances of a metric's 95% interval from its value, for a plot: the Wilson
    interval of a rate when the file has one (never empty at 0 or 1), else ±1.96 standard errors."""
    from lora_core.train.eval.paired import Z95

    if not m or not _is_number(m.get("value")):
        return None
    value, ci, se = m["value"], _ci(m), m.get("stderr")
    if ci is not None:
        return max(0.0, value - ci[0]), max(0.0, ci[1] - value)
    if _is_number(se):
        return Z95 * se, Z95 * se
    return None


def _unpaired(ref: dict, other: dict) -> dict:
    """Difference and interval from the two summaries alone (no per-item results to pair)."""
    from lora_core.train.eval.paired import normal_unpaired_interval, square_and_add_interval

    a, b = ref.get("value"), other.get("value")
    out = {"paired": False, "n_shared": None, "mcnemar": None, "ci95": None,
           "difference": b - a if _is_number(a) and _is_number(b) else None, "method": "unpaired: no interval"}
    if out["difference"] is None:
        return out
    if _ci(ref) is not None and _ci(other) is not None:
        # With Wilson intervals this is Newcombe's hybrid score interval for independent rates.
        out["ci95"] = list(square_and_add_interval(a, _ci(ref), b, _ci(other)))
        out["method"] = "unpaired: square-and-add of the 95% intervals"
    elif _is_number(ref.get("stderr")) and _is_number(other.get("stderr")):
        out["ci95"] = list(normal_unpaired_interval(a, ref["stderr"], b, other["stderr"]))
        out["method"] = "unpaired: ±1.96·√(s.e.₁² + s.e.₂²)"
    return out


def _compare_pair(ref: dict, other: dict, name: str, bootstrap: int, seed: int) -> dict:
    from lora_core.train.eval.paired import paired_difference

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
            + [_difference_cell(comparisons[lab].get(n)) for lab in others] + [_direction(n)] for n in names]
    header = ["metric"] + list(labels) + [f"{lab} − {labels[0]} (95% CI)" for lab in others] + ["better"]
    return markdown_table(header, rows)


def _legend(labels: Sequence[str], bootstrap: int, seed: int, notes: Sequence[str]) -> str:
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


def scatter_png(panels: Sequence[dict]) -> bytes:
    """PNG bytes of side-by-side scatter panels.

    Each panel: {"points": [(label, x, y, x_err, y_err)], "x_label", "y_label", "title",
    "unit_x", "unit_y", "zero_lines", "colors"}; an error is None, a number (symmetric) or
    (below, above); "colors" (one per point) keeps a run the same colour in every panel.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bar(err):
        if err is None:
            return None
        below, above = (err, err) if isinstance(err, (int, float)) else err
        return [[below], [above]]  # (2, 1): matplotlib's asymmetric form

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), dpi=120, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        colors = panel.get("colors") or [f"C{i % 10}" for i in range(len(panel["points"]))]
        for point, color in zip(panel["points"], colors):
            label, x, y = point[:3]
            x_err, y_err = (tuple(point[3:5]) + (None, None))[:2]
            ax.errorbar([x], [y], xerr=bar(x_err), yerr=bar(y_err), fmt="o", markersize=6, capsize=3,
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
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def scatter_plot(points: Sequence[tuple], x_label: str, y_label: str, path: str | Path,
                 title: str = "", unit_x: bool = False, unit_y: bool = False) -> Path:
    """PNG scatter of labelled (label, x, y) or (label, x, y, x_err, y_err) points, written
    atomically; an error is None, a number (symmetric) or (below, above). unit_x/unit_y fix that
    axis to [0, 1] so that proportions from different plots read the same."""
    panel = {"points": points, "x_label": x_label, "y_label": y_label, "title": title,
             "unit_x": unit_x, "unit_y": unit_y}
    return atomic_write_bytes(path, scatter_png([panel]))


def _pick(results_list, preferred: Sequence[str]) -> str | None:
    for name in preferred:
        if all(name in r["metrics"] and _is_number(r["metrics"][name].get("value")) for r in results_list):
            return name
    return None


_PROPORTION_LIKE = ("refusal_rate", "rate", "exact_match", "acc", "acc_norm", "pass_at_1", "pass_at_1_sampled")


def _plot_panels(results_list, labels, comparisons, x: str, y: str) -> list[dict]:
    """Values with their 95% intervals; beside them, when both axes pair, each run's paired change
    from the reference with its 95% interval (the differences the table reports)."""
    unit = lambda name: name.rsplit(".", 1)[-1] in _PROPORTION_LIKE  # noqa: E731
    points = [(lab, r["metrics"][x]["value"], r["metrics"][y]["value"],
               error_bar(r["metrics"][x]), error_bar(r["metrics"][y])) for lab, r in zip(labels, results_list)]
    panels = [{"points": points, "x_label": x, "y_label": y, "unit_x": unit(x), "unit_y": unit(y),
               "title": "safety vs reasoning (95% intervals)"}]
    changes, colors = [], []
    for i, lab in enumerate(labels[1:], start=1):
        cx, cy = comparisons[lab].get(x), comparisons[lab].get(y)
        if not (cx and cy and cx["paired"] and cy["paired"] and cx["ci95"] and cy["ci95"]):
            continue
        dx, dy = cx["difference"], cy["difference"]
        changes.append((lab, dx, dy, (dx - cx["ci95"][0], cx["ci95"][1] - dx), (dy - cy["ci95"][0], cy["ci95"][1] - dy)))
        colors.append(f"C{i % 10}")
    if changes:
        panels.append({"points": changes, "colors": colors, "x_label": f"Δ {x}", "y_label": f"Δ {y}", "zero_lines": True,
                       "title": f"paired change from {labels[0]} (95% bootstrap intervals)"})
    return panels


def _plot_metric(results_list, paths, given: str | None, preferred: Sequence[str]) -> str | None:
    if given is None:
        return _pick(results_list, preferred)
    for r, path in zip(results_list, paths):
        if given not in r["metrics"]:
            raise ValueError(f"metric {given!r} is missing from {path}")
        if not _is_number(r["metrics"][given].get("value")):
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
    loaded = [_load_checked(p) for p in paths]
    results_list, files = [r for r, _ in loaded], [f for _, f in loaded]
    labels = _labels(results_list, files)
    x = _plot_metric(results_list, files, x_metric, ["safety.strongreject.refusal_rate", "safety.harmbench.refusal_rate"])
    y = _plot_metric(results_list, files, y_metric, ["reasoning.arc-easy.acc", "reasoning.gsm8k.bpb",
                                                     "reasoning.gsm8k.exact_match", "reasoning.math500.bpb",
                                                     "reasoning.arc-challenge.acc"])
    comparisons, notes = _comparisons(results_list, labels, bootstrap, seed)
    markdown = ("# Comparison\n\n" + compare_markdown(results_list, labels, comparisons)
                + _legend(labels, bootstrap, seed, notes))
    report = {"reference": labels[0], "labels": labels, "files": [str(f) for f in files],
              "settings": {"bootstrap": bootstrap, "seed": seed, "confidence": 0.95},
              "metrics": {lab: r["metrics"] for lab, r in zip(labels, results_list)},
              "comparisons": comparisons, "notes": notes}
    png = scatter_png(_plot_panels(results_list, labels, comparisons, x, y)) if x and y else None
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "comparison.md", markdown)
    write_json(out / "comparison.json", report)
    made = {"table": str(out / "comparison.md"), "json": str(out / "comparison.json"), "plot": None}
    if png is not None:
        made["plot"] = str(atomic_write_bytes(out / "comparison.png", png))
    made.update(x=x, y=y, labels=labels)
    return made
