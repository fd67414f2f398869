"""Results files (those of `train.eval.runner.evaluate`): written, read back and checked.

{"meta", "metrics": {name: {"value", "n", "stderr"?, "ci95"?...}}, "items"?: {name: {"ids",
"values"}}, "timings"}. Written through lora_core.common.files (atomic): JSON indented, keys in
their own order, non-ASCII kept, NaN as null (a standard error from one item is not defined).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lora_core.common.files import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_json
from lora_core.common.text import short_repr
from lora_core.train.eval.paired import is_number, item_values
from lora_core.train.eval.report_markdown import results_markdown

__all__ = ["RESULTS_JSON", "write_results_json", "write_results", "load_results", "check_results", "load_checked"]

# How every results-type JSON (results.json, comparison.json, generations.jsonl) is written.
RESULTS_JSON = {"sort_keys": False, "ensure_ascii": False, "nan_as_null": True}


def write_results_json(path: str | Path, obj) -> Path:
    return atomic_write_json(path, obj, **RESULTS_JSON)


def write_results(results: dict, out_dir: str | Path, generations: Sequence[dict] | None = None) -> Path:
    """results.json, results.md and (when given) generations.jsonl in `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    write_results_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results))
    if generations is not None:
        atomic_write_jsonl(out / "generations.jsonl", generations, ensure_ascii=False, nan_as_null=True)
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
            if m.get(key) is not None and not is_number(m[key]):
                raise ValueError(f"{where}[{key!r}] is {short_repr(m[key])}, not a number")
        for key in ("n", "k"):
            if key in m and (isinstance(m[key], bool) or not isinstance(m[key], int) or m[key] < 0):
                raise ValueError(f"{where}[{key!r}] is {short_repr(m[key])}, not a whole number")
        ci = m.get("ci95")
        if ci not in (None, [None, None]) and not (isinstance(ci, list) and len(ci) == 2
                                                   and all(map(is_number, ci)) and ci[0] <= ci[1]):
            raise ValueError(f"{where}['ci95'] is {short_repr(ci)}, not [low, high]")
    for name, entry in results.get("items", {}).items():
        where = f"{path}: items[{name!r}]"
        if not isinstance(entry, dict) or "ids" not in entry or "values" not in entry:
            raise ValueError(f"{where} needs 'ids' and 'values'")
        item_values(entry["ids"], entry["values"], where)


def load_checked(path: str | Path) -> tuple[dict, Path]:
    """(results, the results.json path) of a file or run folder, refused unless `check_results` passes."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    results = load_results(path)
    check_results(results, path)
    return results, path
