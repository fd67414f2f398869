"""`lora-core compare`: paired differences against the first file (bootstrap interval, McNemar p,
n shared) in comparison.json/.md and as error bars in the plot; unpaired intervals, said out loud,
for files without per-item results; malformed files refused by name before anything is written."""
import json
import math

import numpy as np
import pytest

from lora_core.train.cli import main
from lora_core.train.eval.metrics import mean_with_stderr, proportion
from lora_core.train.eval.paired import Z95, newcombe_unpaired_interval, normal_unpaired_interval, paired_difference
from lora_core.train.eval.compare import compare_results

RATE = "safety.strongreject.refusal_rate"
ACC = "reasoning.arc-easy.acc"
BPB = "reasoning.gsm8k.bpb"


def _run(label, refusals, correct, bits, seed=0, with_items=True):
    """A results dict as the runner writes it, from per-item outcomes (ids q0.., a0.., g0..)."""
    items = {RATE: ([f"q{i}" for i in range(len(refusals))], [float(v) for v in refusals]),
             ACC: ([f"a{i}" for i in range(len(correct))], [float(v) for v in correct]),
             BPB: ([f"g{i}" for i in range(len(bits))], [float(v) for v in bits])}
    results = {"meta": {"label": label, "seed": seed, "sampling": {"temperature": 0.0}},
               "metrics": {RATE: proportion(int(sum(refusals)), len(refusals)),
                           ACC: proportion(int(sum(correct)), len(correct)),
                           BPB: mean_with_stderr(list(bits))}}
    if with_items:
        results["items"] = {name: {"ids": ids, "values": values} for name, (ids, values) in items.items()}
    return results


def _write(path, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    u = rng.random(n)
    base_refusals = (u < 0.3).astype(int)
    tuned_refusals = (np.where(rng.random(n) < 0.8, u, rng.random(n)) < 0.7).astype(int)
    base_correct = (rng.random(40) < 0.6).astype(int)
    tuned_correct = np.where(rng.random(40) < 0.9, base_correct, 1 - base_correct)
    base_bits = rng.normal(1.2, 0.2, 30)
    tuned_bits = base_bits + rng.normal(0.05, 0.02, 30)
    base = _write(tmp_path / "base" / "results.json", _run("base", base_refusals, base_correct, base_bits))
    tuned = _write(tmp_path / "tuned" / "results.json", _run("tuned", tuned_refusals, tuned_correct, tuned_bits))
    return base, tuned, (base_refusals, tuned_refusals, base_bits, tuned_bits)


def test_paired_differences_against_the_first_file(runs, tmp_path):
    base, tuned, (base_ref, tuned_ref, base_bits, tuned_bits) = runs
    made = compare_results([base, tuned], tmp_path / "cmp", bootstrap=2000, seed=3)
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert report["reference"] == "base" and report["settings"] == {"bootstrap": 2000, "seed": 3, "confidence": 0.95}
    rate = report["comparisons"]["tuned"][RATE]
    ids = [f"q{i}" for i in range(len(base_ref))]
    expected = paired_difference(ids, base_ref.tolist(), ids, tuned_ref.tolist(), resamples=2000, seed=3)
    assert rate["paired"] and rate["method"] == "Newcombe's paired score interval" and rate["n_shared"] == 60
    assert rate["difference"] == pytest.approx(tuned_ref.mean() - base_ref.mean())
    assert rate["ci95"] == pytest.approx(expected["ci95"])
    assert rate["mcnemar"]["p_value"] == pytest.approx(expected["mcnemar"]["p_value"])
    assert rate["mcnemar"]["b"] == int(np.sum((base_ref == 1) & (tuned_ref == 0)))
    bpb = report["comparisons"]["tuned"][BPB]
    assert bpb["mcnemar"] is None and bpb["difference"] == pytest.approx(np.mean(tuned_bits - base_bits))
    lo, hi = bpb["ci95"]
    assert 0 < lo < hi, "a consistent +0.05 per item must give an interval above 0"
    assert "base" not in report["comparisons"], "the reference is not compared with itself"
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| metric | base | tuned | tuned − base (95% CI) | better |" in table
    row = next(line for line in table.splitlines() if line.startswith(f"| {RATE} |"))
    assert f"[{rate['ci95'][0]:+.3f}, {rate['ci95'][1]:+.3f}]" in row and "n=60" in row and "p" in row
    assert "paired bootstrap otherwise (2000 resamples, seed 3" in table
    assert made["plot"] and (tmp_path / "cmp" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bootstrap_and_seed_flags(runs, tmp_path, capsys):
    base, tuned, _ = runs
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / name),
                     "--bootstrap", "500", "--seed", str(seed)]) == 0
    read = lambda name: json.loads((tmp_path / name / "comparison.json").read_text())  # noqa: E731
    assert read("a") == read("b")
    assert read("a")["comparisons"]["tuned"][BPB]["ci95"] != read("c")["comparisons"]["tuned"][BPB]["ci95"]
    assert read("a")["settings"]["bootstrap"] == 500
    capsys.readouterr()
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "d"), "--bootstrap", "10"]) == 2
    assert "--bootstrap" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_files_without_items_fall_back_to_unpaired_intervals_and_say_so(runs, tmp_path):
    base, _, (base_ref, tuned_ref, base_bits, tuned_bits) = runs
    old = _write(tmp_path / "old" / "results.json",
                 _run("old", tuned_ref, np.ones(40), tuned_bits, with_items=False))
    compare_results([base, old], tmp_path / "cmp", bootstrap=200)
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    rate = report["comparisons"]["old"][RATE]
    assert not rate["paired"] and rate["n_shared"] is None and rate["mcnemar"] is None
    k_a, k_b = int(base_ref.sum()), int(tuned_ref.sum())
    assert rate["ci95"] == pytest.approx(newcombe_unpaired_interval(k_a, 60, k_b, 60), abs=1e-12)
    a, b = mean_with_stderr(list(base_bits)), mean_with_stderr(list(tuned_bits))
    assert report["comparisons"]["old"][BPB]["ci95"] == pytest.approx(
        normal_unpaired_interval(a["value"], a["stderr"], b["value"], b["stderr"]), abs=1e-12)
    assert any("old" in note and "unpaired" in note for note in report["notes"])
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "unpaired" in next(line for line in table.splitlines() if line.startswith(f"| {RATE} |"))


def test_three_runs_one_table_many_metrics(tmp_path):
    """45 metrics stay one table, one row per metric, each other run a difference column."""
    names = [f"safety.set{i:02d}.refusal_rate" for i in range(45)]
    paths = []
    rng = np.random.default_rng(5)
    for label in ("ref", "arm1", "arm2"):
        outcomes = {name: (rng.random(20) < 0.5).astype(float) for name in names}
        results = {"meta": {"label": label},
                   "metrics": {n: proportion(int(v.sum()), 20) for n, v in outcomes.items()},
                   "items": {n: {"ids": [f"i{j}" for j in range(20)], "values": v.tolist()}
                             for n, v in outcomes.items()}}
        paths.append(_write(tmp_path / label / "results.json", results))
    compare_results(paths, tmp_path / "cmp", bootstrap=200)
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert table.count("| metric |") == 1
    assert "| metric | ref | arm1 | arm2 | arm1 − ref (95% CI) | arm2 − ref (95% CI) | better |" in table
    assert sum(line.startswith("| safety.set") for line in table.splitlines()) == 45
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert set(report["comparisons"]) == {"arm1", "arm2"} and len(report["comparisons"]["arm2"]) == 45


def test_error_bars_are_95_percent_intervals():
    from lora_core.train.eval.paired import error_bar

    rate = proportion(0, 48)
    assert error_bar(rate) == pytest.approx((0.0, rate["ci95"][1])), "Wilson: not empty at 0/48"
    mean = mean_with_stderr([1.0, 2.0, 4.0])
    assert error_bar(mean) == pytest.approx((Z95 * mean["stderr"],) * 2)
    assert error_bar({"value": 1.0, "n": 1, "stderr": None}) is None
    # A NaN interval is written as [null, null]: no interval, not a crash.
    assert error_bar({"value": 0.5, "n": 4, "stderr": 0.25, "ci95": [None, None]}) == pytest.approx((Z95 * 0.25,) * 2)


def test_duplicate_labels_stay_unique(tmp_path):
    runs = [_write(tmp_path / name / "results.json", _run(label, [1, 0], [1], [1.0, 2.0]))
            for name, label in (("r0", "x"), ("r1", "x"), ("r2", "x#1"))]
    made = compare_results(runs, tmp_path / "cmp", bootstrap=100)
    assert len(set(made["labels"])) == 3, made["labels"]


# Issue 14: each of these gave an AttributeError or a wrong table, some after writing outputs.
MALFORMED = [
    ("not json", "{\"meta\": {", "not valid JSON"),
    ("no metrics", json.dumps({"meta": {}}), "no 'metrics' object"),
    ("list", "[1, 2]", "no 'metrics' object"),
    ("metric not a dict", json.dumps({"metrics": {RATE: 0.7, ACC: {"value": 0.5, "n": 4}}}),
     f"metrics['{RATE}'] is a float, not an object"),
    ("non-numeric value", json.dumps({"metrics": {RATE: {"value": "high", "n": 4}, ACC: {"value": 0.5}}}),
     f"metrics['{RATE}']['value'] is 'high', not a number"),
    ("boolean value", json.dumps({"metrics": {RATE: {"value": True}, ACC: {"value": 0.5}}}),
     f"metrics['{RATE}']['value'] is True, not a number"),
    ("bad stderr", json.dumps({"metrics": {RATE: {"value": 0.5, "stderr": "x"}}}),
     f"metrics['{RATE}']['stderr'] is 'x', not a number"),
    ("bad n", json.dumps({"metrics": {RATE: {"value": 0.5, "n": 2.5}}}),
     f"metrics['{RATE}']['n'] is 2.5, not a whole number"),
    ("bad ci95", json.dumps({"metrics": {RATE: {"value": 0.5, "ci95": [0.9, 0.1]}}}),
     f"metrics['{RATE}']['ci95'] is [0.9, 0.1], not [low, high]"),
    ("items not a dict", json.dumps({"metrics": {RATE: {"value": 0.5}}, "items": []}),
     "'items' is a list, not an object"),
    ("items short", json.dumps({"metrics": {RATE: {"value": 0.5}},
                                "items": {RATE: {"ids": ["a", "b"], "values": [1]}}}),
     f"items['{RATE}']: 2 item ids but 1 values"),
    ("items without ids", json.dumps({"metrics": {RATE: {"value": 0.5}}, "items": {RATE: {"values": [1]}}}),
     f"items['{RATE}'] needs 'ids' and 'values'"),
    ("meta not a dict", json.dumps({"meta": "x", "metrics": {RATE: {"value": 0.5}}}), "'meta' is a str, not an object"),
]


@pytest.mark.parametrize("case, text, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_results_are_refused_by_name_and_nothing_is_written(runs, tmp_path, capsys, case, text, message):
    base, _, _ = runs
    bad = tmp_path / "bad" / "results.json"
    bad.parent.mkdir()
    bad.write_text(text)
    out = tmp_path / "cmp"
    assert main(["compare", str(base), str(bad), "--out", str(out), "--bootstrap", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(bad) in err and message in err, err
    assert not out.exists(), "nothing may be written for a bad input"


@pytest.mark.parametrize("flag", ["--x", "--y"])
def test_a_plot_metric_missing_from_a_file_is_refused_before_writing(runs, tmp_path, capsys, flag):
    base, tuned, _ = runs
    out = tmp_path / "cmp"
    assert main(["compare", str(base), str(tuned), "--out", str(out), flag, "reasoning.humaneval.pass"]) == 2
    err = capsys.readouterr().err
    assert "metric 'reasoning.humaneval.pass' is missing from" in err and str(base) in err
    assert not out.exists()


def test_a_plot_metric_without_a_value_is_refused_before_writing(runs, tmp_path, capsys):
    base, tuned, _ = runs
    results = json.loads(tuned.read_text())
    results["metrics"][ACC]["value"] = None  # NaN is written as null
    _write(tuned, results)
    out = tmp_path / "cmp"
    assert main(["compare", str(base), str(tuned), "--out", str(out), "--y", ACC]) == 2
    err = capsys.readouterr().err
    assert f"metric '{ACC}' has no value in {tuned}" in err and not out.exists()


def test_out_naming_a_file_is_refused(runs, tmp_path, capsys):
    base, tuned, _ = runs
    (tmp_path / "file").write_text("x")
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


def test_written_files_are_0644(runs, tmp_path):
    import os

    base, tuned, _ = runs
    old = os.umask(0o022)
    try:
        compare_results([base, tuned], tmp_path / "cmp", bootstrap=100)
    finally:
        os.umask(old)
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        assert (tmp_path / "cmp" / name).stat().st_mode & 0o777 == 0o644, name


def test_nan_free_json(runs, tmp_path):
    """A one-item mean has no standard error (null) and no interval: still valid JSON, no crash."""
    base, _, _ = runs
    one = _write(tmp_path / "one" / "results.json",
                 {"meta": {"label": "one"}, "metrics": {BPB: {"value": 1.0, "n": 1, "stderr": None}}})
    compare_results([base, one], tmp_path / "cmp", bootstrap=100)
    text = (tmp_path / "cmp" / "comparison.json").read_text()
    assert "NaN" not in text and json.loads(text)["comparisons"]["one"][BPB]["ci95"] is None
    assert math.isclose(json.loads(text)["comparisons"]["one"][BPB]["difference"],
                        1.0 - json.loads(base.read_text())["metrics"][BPB]["value"])
