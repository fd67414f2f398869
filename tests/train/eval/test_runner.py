"""The evaluation workflow end to end on a tiny random decoder (real data subsets, fake tokenizer):
files written, every metric carrying n (and a standard error for proportions), drift exactly zero
against an identical base, comparison table + plot, and refusals of bad input."""
import copy
import json

import pytest
import torch

from helpers.tiny_models import tiny_causal_lm
from helpers.tokenizers import WordTokenizer
from lora_core.train.data.benign import TOPICS
from lora_core.train.eval.runner import SUITES, SuiteConfig, evaluate
from lora_core.train.eval.suites import BUDGET_TASKS
from lora_core.train.eval.compare import compare_results
from lora_core.train.eval.result_files import load_results

pytestmark = pytest.mark.usefixtures("single_thread")


TINY = SuiteConfig(safety={"strongreject": 2, "harmbench": 0},
                   math_generation={"gsm8k": 2, "math500": 0},
                   bpb={"gsm8k": 2, "math500": 1}, arc={"arc-easy": 2, "arc-challenge": 0},
                   drift=2, batch_size=2, over_refusal=13, max_new_tokens={t: 3 for t in BUDGET_TASKS})


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    base = tiny_causal_lm(vocab=64)
    tokenizer = WordTokenizer(vocab=64)
    out_a = tmp_path_factory.mktemp("base")
    res_a = evaluate(base, tokenizer, suite=TINY, base_model=copy.deepcopy(base), out_dir=out_a,
                     progress=False, meta={"label": "base"})
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    out_b = tmp_path_factory.mktemp("tuned")
    res_b = evaluate(tuned, tokenizer, suite=TINY, base_model=base, out_dir=out_b, progress=False,
                     meta={"label": "tuned"})
    return (out_a, res_a), (out_b, res_b)


def test_results_files_and_metric_shapes(run_dirs):
    (out, results), _ = run_dirs
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["metrics"].keys() == results["metrics"].keys()
    expected = {"safety.strongreject.refusal_rate", "safety.strongreject.explicit_refusal_rate",
                "safety.strongreject.template_echo_rate", "safety.strongreject.refusal_rate_non_template",
                "safety.over_refusal.rate", "reasoning.gsm8k.exact_match", "reasoning.gsm8k.refusal_rate",
                "reasoning.gsm8k.bpb", "reasoning.math500.bpb", "reasoning.arc-easy.acc",
                "reasoning.arc-easy.acc_norm", "drift.kl_base"}
    # Over-refusal is reported per topic too; 13 stratified items cover all 12 topics.
    expected |= {f"safety.over_refusal.{topic}.rate" for topic in TOPICS}
    # ... and by who wrote the prompt: us, or the pinned question sets (external).
    expected |= {"safety.over_refusal.ours.rate", "safety.over_refusal.external.rate"}
    assert set(results["metrics"]) == expected
    topic_counts = [results["metrics"][f"safety.over_refusal.{t}.rate"]["n"] for t in TOPICS]
    assert sum(topic_counts) == results["metrics"]["safety.over_refusal.rate"]["n"] == 13
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    benign = [r for r in rows if r["task"] == "safety.over_refusal"]
    for origin, mine in (("ours", [r for r in benign if r["source"] == "lora-core"]),
                         ("external", [r for r in benign if r["source"] != "lora-core"])):
        metric = results["metrics"][f"safety.over_refusal.{origin}.rate"]
        assert metric["n"] == len(mine) >= 1 and metric["k"] == sum(r["refusal"] for r in mine), origin
    for name, m in results["metrics"].items():
        assert m["n"] >= 1, name
        if name.split(".")[-1] in ("refusal_rate", "explicit_refusal_rate", "rate", "exact_match", "acc",
                                   "acc_norm", "template_echo_rate", "refusal_rate_non_template"):
            p, n = m["value"], m["n"]
            assert 0.0 <= p <= 1.0 and m["stderr"] == pytest.approx((p * (1 - p) / n) ** 0.5), name
    assert results["metrics"]["safety.strongreject.refusal_rate"]["n"] == 2
    assert results["metrics"]["reasoning.gsm8k.bpb"]["value"] > 0
    assert results["metrics"]["drift.kl_base"]["value"] == 0.0, "identical base must give exactly zero drift"
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 + 13
    assert {r["task"] for r in rows} == {"safety.strongreject", "reasoning.gsm8k", "safety.over_refusal"}
    assert all(r["topic"] in TOPICS for r in rows if r["task"] == "safety.over_refusal")
    assert all(isinstance(r["response"], str) for r in rows)
    markdown = (out / "results.md").read_text()
    assert "| safety.strongreject.refusal_rate |" in markdown and "± " in markdown
    assert results["timings"]["total"] > 0 and results["meta"]["label"] == "base"


def test_drift_positive_and_same_items_for_a_changed_model(run_dirs):
    (_, a), (_, b) = run_dirs
    assert b["metrics"]["drift.kl_base"]["value"] > 0
    assert a["metrics"]["reasoning.gsm8k.bpb"]["bytes"] == b["metrics"]["reasoning.gsm8k.bpb"]["bytes"], \
        "both runs must score the same fixed-seed items"
    assert a["metrics"]["reasoning.gsm8k.bpb"]["value"] != b["metrics"]["reasoning.gsm8k.bpb"]["value"]


def test_compare_table_and_plot(run_dirs, tmp_path):
    (out_a, _), (out_b, _) = run_dirs
    made = compare_results([out_a / "results.json", out_b], tmp_path / "cmp")
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| metric | base | tuned |" in table and "| drift.kl_base |" in table
    assert made["x"] == "safety.strongreject.refusal_rate" and made["y"] == "reasoning.arc-easy.acc"
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="metric 'reasoning.humaneval.pass' is missing"):
        compare_results([out_a], tmp_path / "cmp2", y_metric="reasoning.humaneval.pass")
    from lora_core.train.cli import main

    assert main(["compare", str(out_a), str(out_b), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "comparison.png").exists()


def test_bad_inputs(tmp_path):
    model = tiny_causal_lm(vocab=64)
    with pytest.raises(ValueError, match="no chat template"):
        evaluate(model, WordTokenizer(vocab=64, chat=False), suite=TINY, progress=False)
    with pytest.raises(ValueError, match="unknown suite .medium.*quick, standard, full"):
        evaluate(model, WordTokenizer(vocab=64), suite="medium")
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        evaluate(model, WordTokenizer(vocab=64), suite="quick", limit=0)
    not_results = tmp_path / "x.json"
    not_results.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a lora-core results file"):
        load_results(not_results)
    with pytest.raises(FileNotFoundError, match="no results file"):
        load_results(tmp_path / "missing")
    # A suite without chat tasks runs on a model without a chat template (log-likelihood only).
    ll_only = SuiteConfig(safety={}, math_generation={}, bpb={"gsm8k": 1}, arc={}, drift=0, over_refusal=0)
    res = evaluate(model, WordTokenizer(vocab=64, chat=False), suite=ll_only, progress=False)
    assert set(res["metrics"]) == {"reasoning.gsm8k.bpb"}


def test_limit_caps_every_subset():
    capped = SUITES["full"].with_limit(5)
    assert capped.safety == {"strongreject": 5, "harmbench": 5}
    assert capped.bpb == {"gsm8k": 5, "math500": 5, "mbpp": 5, "humaneval": 5}
    assert capped.drift == 5 and capped.over_refusal == 5 and capped.jailbreak == 5
    assert capped.robustness == {"past-tense": 5, "future-tense": 5}
    quick = SUITES["quick"].with_limit(3)
    assert quick.safety["harmbench"] == 0, "a skipped set stays skipped"


# ------------------------------------------------------------------------ HumanEval execution

@pytest.fixture(scope="module")
def humaneval_problems():
    from lora_core.train.data.registry import load_records

    return load_records("humaneval", limit=3, seed=0)


def test_sandbox_runs_canonical_solutions_and_catches_wrong_ones(humaneval_problems):
    from lora_core.train.eval.code_runner import extract_code, humaneval_program, run_program, sandbox_available

    if not sandbox_available():
        pytest.skip("no POSIX resource limits here: execution is skipped by design")
    for p in humaneval_problems:
        assert run_program(humaneval_program(p, p["canonical_solution"]))["status"] == "passed", p["id"]
        wrong = humaneval_program(p, "    return None\n")
        assert run_program(wrong)["status"] == "failed", p["id"]
    # A chat answer with the whole function in a fenced block.
    p = humaneval_problems[0]
    whole = p["prompt"] + p["canonical_solution"]  # defines the entry point itself
    answer = f"Here you go:\n```python\n{whole}```\nDone."
    assert run_program(humaneval_program(p, extract_code(answer)))["status"] == "passed"


def test_sandbox_limits():
    from lora_core.train.eval.code_runner import SandboxLimits, run_program, sandbox_available

    if not sandbox_available():
        pytest.skip("no POSIX resource limits here")
    fast = SandboxLimits(timeout_s=2.0, memory_mb=256)
    assert run_program("while True:\n    pass\n", fast)["status"] == "timeout"
    assert run_program("import time\ntime.sleep(30)\n", fast)["status"] == "timeout"
    hog = run_program("x = bytearray(1024 * 1024 * 1024)\n", fast)
    assert hog["status"] == "failed" and "MemoryError" in hog["stderr"], hog
    env = run_program("import os, sys\nassert os.environ['HOME'] == os.getcwd(), dict(os.environ)\n"
                      "assert os.getcwd().startswith(__import__('tempfile').gettempdir())\n", fast)
    assert env["status"] == "passed", env


def test_humaneval_runs_only_when_allowed():
    from lora_core.train.eval.code_runner import sandbox_available

    model = tiny_causal_lm(vocab=64)
    cfg = SuiteConfig(safety={}, math_generation={}, bpb={}, arc={}, drift=0, humaneval=1,
                      max_new_tokens={"humaneval": 3})
    res = evaluate(model, WordTokenizer(vocab=64), suite=cfg, progress=False)
    assert "reasoning.humaneval.pass_at_1" not in res["metrics"]
    assert any("execute-code" in s for s in res["meta"]["skipped"])
    if sandbox_available():
        res = evaluate(model, WordTokenizer(vocab=64), suite=cfg, progress=False, allow_code_execution=True)
        # Three random characters are not a solution.
        m = res["metrics"]["reasoning.humaneval.pass_at_1"]
        assert (m["value"], m["n"], m["k"], m["stderr"], m["ci95"][0]) == (0.0, 1, 0, 0.0, 0.0)
