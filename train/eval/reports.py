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
              "rate": "lower = better", "exact_match": "higher", "bpb": "lower", "acc": "higher",
              "acc_norm": "higher", "kl_base": "lower = closer to base"}


def _direction(name: str) -> str:
    if name.startswith("reasoning.") and name.endswith("refusal_rate"):
        return "lower = better"  # refusing a math question is over-refusal, not safety
    return _DIRECTION.get(name.rsplit(".", 1)[-1], "")


def results_markdown(results: dict) -> str:
    meta = results.get("meta", {})
    title = meta.get("label") or meta.get("model") or "model"
    rows = []
    for name in sorted(results.get("metrics", {})):
        m = results["metrics"][name]
        rows.append([name, format_metric(m), m.get("n", "-"), _direction(name)])
    text = [f"# Evaluation: {title}", "",
            f"suite `{meta.get('suite', '?')}`, judge `{meta.get('judge', '?')}`, "
            f"total time {results.get('timings', {}).get('total', float('nan')):.1f} s", "",
            markdown_table(["metric", "value ± s.e.", "n", "better"], rows)]
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


def _labels(results_list: Sequence[dict], paths: Sequence[str | Path] | None) -> list[str]:
    labels = []
    for i, r in enumerate(results_list):
        meta = r.get("meta", {})
        label = meta.get("label") or (Path(paths[i]).parent.name if paths else "") or meta.get("model") or f"run{i}"
        labels.append(str(label))
    # Identical labels would make the table ambiguous.
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label in seen:
            labels[i] = f"{label}#{i}"
        seen[label] = i
    return labels


def compare_markdown(results_list: Sequence[dict], labels: Sequence[str]) -> str:
    names = sorted({n for r in results_list for n in r["metrics"]})
    rows = [[n] + [format_metric(r["metrics"].get(n)) for r in results_list] for n in names]
    return markdown_table(["metric"] + list(labels), rows)


def scatter_plot(points: Sequence[tuple], x_label: str, y_label: str, path: str | Path,
                 title: str = "", unit_x: bool = False, unit_y: bool = False) -> Path:
    """PNG scatter of labelled (label, x, y) or (label, x, y, x_err, y_err) points.

    Error bars are drawn where given (None = none); unit_x/unit_y fix that axis to [0, 1] so that
    proportions from different plots read the same."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for point in points:
        label, x, y = point[:3]
        x_err, y_err = (tuple(point[3:5]) + (None, None))[:2]
        ax.errorbar([x], [y], xerr=None if x_err is None else [x_err], yerr=None if y_err is None else [y_err],
                    fmt="o", markersize=6, capsize=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if unit_x:
        ax.set_xlim(-0.02, 1.02)
    if unit_y:
        ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _pick(results_list, preferred: Sequence[str]) -> str | None:
    for name in preferred:
        if all(name in r["metrics"] and r["metrics"][name].get("value") is not None for r in results_list):
            return name
    return None


def compare_results(paths: Sequence[str | Path], out_dir: str | Path, x_metric: str | None = None,
                    y_metric: str | None = None) -> dict:
    """Side-by-side table (comparison.md/.json) and a safety-vs-reasoning scatter (comparison.png).

    Defaults: x = StrongREJECT refusal rate (else HarmBench), y = the first reasoning measure
    every file has (ARC-Easy acc, then GSM8K BPB, ...).
    """
    if not paths:
        raise ValueError("compare needs at least one results file")
    results_list = [load_results(p) for p in paths]
    labels = _labels(results_list, [Path(p) if not Path(p).is_dir() else Path(p) / "results.json" for p in paths])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "comparison.md", "# Comparison\n\n" + compare_markdown(results_list, labels))
    write_json(out / "comparison.json", {"labels": labels, "files": [str(p) for p in paths],
                                         "metrics": {lab: r["metrics"] for lab, r in zip(labels, results_list)}})
    x = x_metric or _pick(results_list, ["safety.strongreject.refusal_rate", "safety.harmbench.refusal_rate"])
    y = y_metric or _pick(results_list, ["reasoning.arc-easy.acc", "reasoning.gsm8k.bpb",
                                         "reasoning.gsm8k.exact_match", "reasoning.math500.bpb",
                                         "reasoning.arc-challenge.acc"])
    for given in (x_metric, y_metric):
        if given is not None and not all(given in r["metrics"] for r in results_list):
            raise ValueError(f"metric {given!r} is missing from some results files")
    made = {"table": str(out / "comparison.md"), "json": str(out / "comparison.json"), "plot": None}
    if x and y:
        points = [(lab, r["metrics"][x]["value"], r["metrics"][y]["value"],
                   r["metrics"][x].get("stderr"), r["metrics"][y].get("stderr"))
                  for lab, r in zip(labels, results_list)]
        proportion_like = ("refusal_rate", "rate", "exact_match", "acc", "acc_norm", "pass_at_1")
        scatter_plot(points, x, y, out / "comparison.png", title="safety vs reasoning (± 1 s.e.)",
                     unit_x=x.rsplit(".", 1)[-1] in proportion_like,
                     unit_y=y.rsplit(".", 1)[-1] in proportion_like)
        made["plot"] = str(out / "comparison.png")
    made.update(x=x, y=y, labels=labels)
    return made
