"""HumanEval and MBPP pass@1 by execution: gold programs pass and wrong, non-terminating or
harmful ones do not (or leave nothing behind), MBPP's prompt format, greedy and sampled pass@1
against a hand computation on a fake generator, and the code tasks in each suite."""
import json

import pytest

from helpers.tiny_models import tiny_causal_lm
from helpers.tokenizers import WordTokenizer
from lora_core.train.data.registry import load_records
from lora_core.train.eval.code_runner import SandboxLimits, mbpp_program, run_program, sandbox_available
from lora_core.train.eval.code_tasks import MBPP_PROMPT, user_prompt
from lora_core.train.eval.runner import SUITES, SuiteConfig, evaluate
from lora_core.train.eval.suites import BUDGET_TASKS, Sampling

pytestmark = pytest.mark.usefixtures("single_thread")
needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="no POSIX resource limits here")

NOTHING = dict(safety={}, over_refusal=0, robustness={}, jailbreak=0, math_generation={}, bpb={}, arc={},
               drift=0, batch_size=4, max_new_tokens={t: 3 for t in BUDGET_TASKS})


@pytest.fixture(scope="module")
def mbpp_items():
    return load_records("mbpp", limit=3, seed=0)


class ThinkingTokenizer(WordTokenizer):
    """A chat template that opens the assistant's thought, as DeepSeek-R1's does."""

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        return super().apply_chat_template(messages, add_generation_prompt, **kwargs) + "<think>\n"


def fenced(code: str) -> str:
    return f"Here is the function:\n```python\n{code}\n```\nIt works."


# ------------------------------------------------------------------------ programs

@needs_sandbox
def test_mbpp_gold_passes_and_wrong_or_endless_code_fails(mbpp_items):
    for r in mbpp_items:
        assert run_program(mbpp_program(r, r["code"]))["status"] == "passed", r["id"]
        name = r["tests"][0].split("assert ", 1)[1].split("(", 1)[0].strip()
        wrong = f"def {name}(*args):\n    return None\n"
        assert run_program(mbpp_program(r, wrong))["status"] == "failed", r["id"]
    r = mbpp_items[0]
    name = r["tests"][0].split("assert ", 1)[1].split("(", 1)[0].strip()
    endless = f"def {name}(*args):\n    while True:\n        pass\n"
    assert run_program(mbpp_program(r, endless), SandboxLimits(timeout_s=1.0))["status"] == "timeout"
    # Only the asserts' own set-up makes this item's gold pass: its test trees are built there.
    (tree,) = [x for x in load_records("mbpp") if x["id"] == "mbpp-367"]
    assert tree["test_setup"] and run_program(mbpp_program(tree, tree["code"]))["status"] == "passed"
    assert run_program(mbpp_program({**tree, "test_setup": ""}, tree["code"]))["status"] == "failed"


@needs_sandbox
def test_harmful_answer_writes_only_inside_its_folder(mbpp_items, tmp_path, monkeypatch):
    # os.system and relative or home writes land in the runner's temp folder, which is removed;
    # the runner is no security boundary (absolute paths stay writable), see code_runner.
    monkeypatch.chdir(tmp_path)
    r = mbpp_items[0]
    harm = ("import os\nos.system('echo pwned > pwned.txt')\n"
            "open(os.path.expanduser('~/also.txt'), 'w').write('x')\n" + r["code"])
    assert run_program(mbpp_program(r, harm))["status"] == "passed"
    assert list(tmp_path.iterdir()) == []


def test_mbpp_prompt_shows_the_statement_and_one_test(mbpp_items):
    r = mbpp_items[0]
    text = user_prompt("mbpp", r)
    assert text == (f"{r['prompt']}\nYour code should pass this test:\n\n{r['tests'][0]}\n\n"
                    "Reply with the whole function in a ```python code block.")
    assert text == MBPP_PROMPT.format(statement=r["prompt"], test=r["tests"][0])
    assert all(t not in text for t in r["tests"][1:]), "the other asserts are kept for scoring"
    with pytest.raises(ValueError, match="no code task 'apps'"):
        user_prompt("apps", r)


# ------------------------------------------------------------------------ greedy and sampled pass@1

def fake_generator(monkeypatch, answers):
    """EvalRun.generate answering from `answers[(statement, decoding)]`: a list of responses, the
    n-th prompt of an item getting the n-th (the k samples of an item are consecutive prompts)."""
    from lora_core.train.eval.context import EvalRun

    calls = []

    def generate(self, prompts, task, desc, temperature=0.0, top_p=1.0, seed=None):
        calls.append({"task": task, "n": len(prompts), "temperature": temperature, "top_p": top_p})
        decoding = "sampled" if temperature else "greedy"
        seen, out = {}, []
        for p in prompts:
            (key,) = [s for s, d in answers if d == decoding and s in p]
            out.append(answers[(key, decoding)][seen.get(key, 0)])
            seen[key] = seen.get(key, 0) + 1
        return out

    monkeypatch.setattr(EvalRun, "generate", generate)
    return calls


@needs_sandbox
def test_greedy_and_sampled_pass_at_1_match_a_hand_computation(monkeypatch):
    a, b = load_records("mbpp", limit=2, seed=0)
    (he,) = load_records("humaneval", limit=1, seed=0)
    ok_a, ok_b = fenced(a["code"]), fenced(b["code"])
    bad = fenced("def nothing():\n    return None")
    he_ok = fenced(he["prompt"] + he["canonical_solution"])
    he_bad = fenced(he["prompt"] + "    return None\n")
    calls = fake_generator(monkeypatch, {
        (a["prompt"], "greedy"): [ok_a], (b["prompt"], "greedy"): [bad],
        (a["prompt"], "sampled"): [ok_a, bad, ok_a], (b["prompt"], "sampled"): [bad, bad, ok_b],
        (he["prompt"], "greedy"): [he_bad], (he["prompt"], "sampled"): [he_ok, he_bad, he_ok]})
    cfg = SuiteConfig(**{**NOTHING, "humaneval": 1, "mbpp": 2, "sampling": Sampling(k=3)})
    res = evaluate(tiny_causal_lm(vocab=64), WordTokenizer(vocab=64), suite=cfg, progress=False,
                   allow_code_execution=True)
    m, items = res["metrics"], res["items"]
    assert (m["reasoning.mbpp.pass_at_1"]["value"], m["reasoning.mbpp.pass_at_1"]["k"]) == (0.5, 1)
    assert items["reasoning.mbpp.pass_at_1"] == {"ids": [a["id"], b["id"]], "values": [1, 0]}
    # Sampled: item a passes 2 of 3, item b 1 of 3; mean 1/2, sample sd sqrt(1/18), stderr 1/6.
    sampled = m["reasoning.mbpp.pass_at_1_sampled"]
    assert sampled["value"] == pytest.approx(0.5) and sampled["samples"] == 3 and sampled["n"] == 2
    assert sampled["stderr"] == pytest.approx(1 / 6)
    assert items["reasoning.mbpp.pass_at_1_sampled"]["values"] == pytest.approx([2 / 3, 1 / 3])
    assert m["reasoning.humaneval.pass_at_1"]["value"] == 0.0
    assert m["reasoning.humaneval.pass_at_1_sampled"]["value"] == pytest.approx(2 / 3)
    # The code tasks sample as the exact-match tasks do: the suite's T and top-p, k prompts per item.
    sampled_calls = [c for c in calls if c["temperature"]]
    assert [(c["task"], c["n"]) for c in sampled_calls] == [("humaneval", 3), ("mbpp", 6)]
    assert all((c["temperature"], c["top_p"]) == (0.6, 0.95) for c in sampled_calls)


@needs_sandbox
def test_generation_rows_and_thinking(monkeypatch, tmp_path):
    (r,) = load_records("mbpp", limit=1, seed=0)
    fake_generator(monkeypatch, {(r["prompt"], "greedy"): ["hm```python\nx = 1\n```"],
                                 (r["prompt"], "sampled"): [f"ok</think>{fenced(r['code'])}", "still thinking"]})
    cfg = SuiteConfig(**{**NOTHING, "mbpp": 1, "sampling": Sampling(k=2)})
    res = evaluate(tiny_causal_lm(vocab=64), ThinkingTokenizer(vocab=64), suite=cfg, progress=False,
                   allow_code_execution=True, out_dir=tmp_path)
    m = res["metrics"]
    # A code block inside an unfinished thought is not an answer: nothing runs, the item fails.
    assert m["reasoning.mbpp.pass_at_1"]["value"] == 0.0 and m["reasoning.mbpp.truncated_in_think"]["value"] == 1.0
    assert m["reasoning.mbpp.pass_at_1_sampled"]["value"] == 0.5
    assert m["reasoning.mbpp.truncated_in_think_sampled"]["value"] == 0.5
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [(x["decoding"], x.get("sample"), x["status"], x["correct"]) for x in rows] == [
        ("greedy", None, "truncated_in_think", False), ("sampled", 0, "passed", True),
        ("sampled", 1, "truncated_in_think", False)]


def test_code_runs_only_when_allowed():
    cfg = SuiteConfig(**{**NOTHING, "humaneval": 1, "mbpp": 1})
    res = evaluate(tiny_causal_lm(vocab=64), WordTokenizer(vocab=64), suite=cfg, progress=False)
    assert not res["metrics"]
    assert [s.split(":")[0] for s in res["meta"]["skipped"]] == ["humaneval", "mbpp"]
    assert all("--execute-code" in s for s in res["meta"]["skipped"])


# ------------------------------------------------------------------------ suites

def test_code_tasks_in_each_suite():
    quick, standard, full = SUITES["quick"], SUITES["standard"], SUITES["full"]
    assert (quick.humaneval, quick.mbpp) == (0, 0), "quick runs no model-written code"
    assert standard.humaneval and standard.mbpp and standard.sampling.k > 0
    assert (standard.humaneval, standard.mbpp) == (4, 4)
    assert standard.budget("humaneval") == standard.budget("mbpp") == 256
    assert (full.humaneval, full.mbpp, full.sampling.k) == (None, None, 8)
    assert (full.sampling.temperature, full.sampling.top_p) == (0.6, 0.95)
    assert full.with_limit(5).mbpp == 5 and quick.with_limit(5).mbpp == 0
    assert "mbpp" in BUDGET_TASKS and full.budget("mbpp") == 512
