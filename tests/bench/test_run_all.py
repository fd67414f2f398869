"""bench/run_all.py's rendering: generic tables from each benchmark's JSON, rewritten between
markers with everything else in RESULTS.md kept. No benchmark is run here (--render-only)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(tmp_path: Path) -> tuple[Path, Path]:
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench_generate.json").write_text(json.dumps({"meta": {"cpu": "Test CPU (avx2)"}, "rows": [
        {"dtype": "float32", "batch": 16, "ours_tok_s": 400.0, "transformers_tok_s": 180.0, "ratio": 2.2222},
        {"dtype": "bfloat16", "batch": 1, "ours_tok_s": 30.5, "transformers_tok_s": 25.0, "ratio": 1.22,
         "compile_s": 12.5}]}))
    (results / "bench_train.json").write_text(json.dumps({"machine": {"cores": 2}, "rows": [
        {"dtype": "bfloat16", "ours": {"tokens_per_s": 500.0}, "hf": {"tokens_per_s": 250.0},
         "tokens_per_s_ratio": 2.0, "peak_rss_ratio": 0.45}]}))
    (results / "bench_lora_linear.json").write_text(json.dumps({"meta": {}, "rows": [
        {"M": 1024, "dtype": "bf16", "ms": {"dense": 20.0, "ours": 21.0}, "ratio": {"dense": 1.0, "ours": 1.05}}]}))
    for name in ("bench_generate", "bench_train"):  # the coder model's tables: same layout
        (results / f"{name}_coder.json").write_text((results / f"{name}.json").read_text())
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nhand-written intro\n\n<!-- run_all:begin generate -->\nold table\n"
                  "<!-- run_all:end generate -->\n\nhand-written tail\n")
    return results, md


def test_render_only_rewrites_between_markers_and_keeps_the_rest(run_all, tmp_path):
    results, md = _write(tmp_path)
    assert run_all.main(["--render-only", "--results", str(results), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "old table" not in text
    assert "hand-written intro" in text and "hand-written tail" in text
    assert text.index("hand-written intro") < text.index("run_all:begin generate") < text.index("hand-written tail")
    # Generic columns, nested dicts flattened, ratios in bold, a field only one row has still shown.
    assert "| dtype | batch | ours_tok_s | transformers_tok_s | ratio | compile_s |" in text
    assert "**2.22**" in text and "| 12.5 |" in text
    assert "ours.tokens_per_s" in text and "**0.45**" in text and "**2**" in text
    assert "ratio.ours" in text and "**1.05**" in text
    # Missing marker pairs (machine, train, lora_linear) were appended, each once.
    for name in ("machine", "train", "lora_linear", "generate", "generate_coder", "train_coder"):
        assert text.count(f"<!-- run_all:begin {name} -->") == 1
    assert "ISA flags" in text and "load average" in text and "torch" in text
    # A second run replaces, never duplicates.
    run_all.main(["--render-only", "--results", str(results), "--markdown", str(md)])
    assert md.read_text().count("**2.22**") == 2  # the default's and the coder's generate tables


def test_bad_inputs_are_refused_in_one_line(run_all, tmp_path):
    results, md = _write(tmp_path)
    (results / "bench_train.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"bench_train.json is not valid JSON"):
        run_all.main(["--render-only", "--only", "train", "--results", str(results), "--markdown", str(md)])
    (results / "bench_train.json").write_text(json.dumps({"table": []}))
    with pytest.raises(SystemExit, match="has no 'rows' list"):
        run_all.main(["--render-only", "--only", "train", "--results", str(results), "--markdown", str(md)])
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        run_all.main(["--render-only", "--threads", "0", "--results", str(results), "--markdown", str(md)])
    with pytest.raises(SystemExit, match="not found"):
        run_all.main(["--render-only", "--results", str(results), "--markdown", str(tmp_path / "nope.md")])
    assert "old table" in md.read_text(), "a refused run must leave RESULTS.md as it was"


def test_repository_results_file_has_every_marker(run_all):
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    for name in ("machine", *run_all.BENCHES):
        assert text.count(f"<!-- run_all:begin {name} -->") == 1 and text.count(f"<!-- run_all:end {name} -->") == 1
