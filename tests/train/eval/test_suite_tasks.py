"""The standard suite's parts on a tiny random decoder: robustness and jailbreak sets, sampled
pass@1 with fixed seeds, thinking stripped and truncation counted, per-item values that
`lora-core compare` pairs, the judge's human agreement on every run, and bad suite settings."""
import dataclasses

import pytest

from helpers.tiny_models import tiny_causal_lm
from helpers.tokenizers import WordTokenizer
from lora_core.train.eval.runner import SUITES, SuiteConfig, evaluate
from lora_core.train.eval.suites import BUDGET_TASKS, Sampling

pytestmark = pytest.mark.usefixtures("single_thread")

NOTHING = dict(safety={}, over_refusal=0, robustness={}, jailbreak=0, math_generation={}, bpb={}, arc={},
               drift=0, batch_size=4, max_new_tokens={t: 3 for t in BUDGET_TASKS})


class ThinkingTokenizer(WordTokenizer):
    """A chat template that opens the assistant's thought, as DeepSeek-R1's does."""

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        return super().apply_chat_template(messages, add_generation_prompt, **kwargs) + "<think>\n"


def test_robustness_and_jailbreak_sets():
    cfg = SuiteConfig(**{**NOTHING, "robustness": {"past-tense": 3, "future-tense": 2}, "jailbreak": 2})
    res = evaluate(tiny_causal_lm(vocab=64), WordTokenizer(vocab=64), suite=cfg, progress=False)
    m = res["metrics"]
    assert m["robustness.past-tense.refusal_rate"]["n"] == 3 and m["robustness.future-tense.refusal_rate"]["n"] == 2
    # Three templates around the same two StrongREJECT requests, each template reported on its own.
    assert m["robustness.jailbreak.refusal_rate"]["n"] == 6
    per_template = [k for k in m if k.startswith("robustness.jailbreak.") and k.count(".") == 3]
    assert sorted(per_template) == sorted(f"robustness.jailbreak.{t}.refusal_rate" for t in ("DUDE", "Dan_6_0", "STAN"))
    assert sum(m[k]["k"] for k in per_template) == m["robustness.jailbreak.refusal_rate"]["k"]


def test_jailbreak_wraps_the_request_and_judges_against_the_bare_request(monkeypatch):
    from lora_core.train.data.jailbreak import jailbreak_records
    from lora_core.train.eval.context import EvalRun

    seen_prompts, judged = [], []
    monkeypatch.setattr(EvalRun, "generate",
                        lambda self, prompts, *a, **k: seen_prompts.extend(prompts) or [""] * len(prompts))

    class SpyJudge:
        name = "spy"

        def judge(self, prompts, responses):
            judged.extend(prompts)
            return [True] * len(responses)

    cfg = SuiteConfig(**{**NOTHING, "jailbreak": 1})
    evaluate(tiny_causal_lm(vocab=64), WordTokenizer(vocab=64), suite=cfg, progress=False, judge=SpyJudge())
    records = jailbreak_records(1)
    assert len(seen_prompts) == 3 and all("DAN" in p or "DUDE" in p or "STAN" in p for p in seen_prompts)
    assert all(r["request"] in p for r, p in zip(records, seen_prompts)), "the request follows the wrapper"
    assert judged[:3] == [r["request"] for r in records], "the judge compares the answer with the bare request"
    assert "{generator.name}" not in "".join(seen_prompts)


def test_sampled_pass_at_1_is_reproducible_and_follows_the_seed():
    cfg = SuiteConfig(**{**NOTHING, "math_generation": {"gsm8k": 3}, "sampling": Sampling(k=2, temperature=1.0)})
    model, tok = tiny_causal_lm(vocab=64), WordTokenizer(vocab=64)
    a = evaluate(model, tok, suite=cfg, progress=False)
    b = evaluate(model, tok, suite=cfg, progress=False)
    c = evaluate(model, tok, suite=dataclasses.replace(cfg, seed=1), progress=False)
    key = "reasoning.gsm8k.pass_at_1_sampled"
    assert a["metrics"][key] == b["metrics"][key] and a["metrics"][key]["samples"] == 2
    assert a["meta"]["sampling"] == {"k": 2, "temperature": 1.0, "top_p": 0.95} and a["meta"]["seed"] == 0

    def sampled(res):
        return res["metrics"][key], res["items"][key]

    assert sampled(a) == sampled(b)
    lo, hi = a["metrics"][key]["ci95"]
    assert lo < hi and 0.0 <= lo <= a["metrics"][key]["value"] <= hi <= 1.0
    # Another seed draws other samples (its item ids are different too: the subset follows the seed).
    assert c["items"][key]["ids"] != a["items"][key]["ids"]


def test_sampled_generations_differ_between_seeds_on_the_same_items(monkeypatch):
    from lora_core.train.eval.context import EvalRun

    texts = {}
    real = EvalRun.generate

    def keep(self, prompts, task, desc, **kw):
        out = real(self, prompts, task, desc, **kw)
        if kw.get("temperature"):
            texts.setdefault(self.cfg.seed, []).append(out)
        return out

    monkeypatch.setattr(EvalRun, "generate", keep)
    model, tok = tiny_causal_lm(vocab=64), WordTokenizer(vocab=64)
    cfg = SuiteConfig(**{**NOTHING, "math_generation": {"gsm8k": 2}, "sampling": Sampling(k=2, temperature=1.0)})
    evaluate(model, tok, suite=cfg, progress=False)
    evaluate(model, tok, suite=cfg, progress=False)
    assert texts[0][0] == texts[0][1], "a fixed seed must give the same samples"
    # The k samples of one item differ from each other (one prompt, several draws).
    assert texts[0][0][0] != texts[0][0][1] or texts[0][0][2] != texts[0][0][3]


def test_thinking_is_stripped_and_truncation_inside_think_is_counted():
    from lora_core.train.eval.answers import final_answer_text, thinks_anywhere, unfinished_thought

    assert unfinished_thought("<user>q</user><assistant><think>\n", "so 2+2 is") is True
    assert final_answer_text("...<think>\n", "so 2+2 is 4") is None
    assert final_answer_text("...<think>\n", "hm 5</think>The answer is \\boxed{4}") == "The answer is \\boxed{4}"
    assert unfinished_thought("plain prompt", "The answer is 4") is False
    assert not thinks_anywhere(["plain"], ["The answer is 4"])
    cfg = SuiteConfig(**{**NOTHING, "math_generation": {"gsm8k": 2}, "safety": {"strongreject": 2}})
    res = evaluate(tiny_causal_lm(vocab=64), ThinkingTokenizer(vocab=64), suite=cfg, progress=False)
    m = res["metrics"]
    # Three random tokens never close the thought: every answer is cut off inside it.
    assert m["reasoning.gsm8k.truncated_in_think"]["value"] == 1.0
    assert m["safety.strongreject.truncated_in_think"]["value"] == 1.0
    assert m["reasoning.gsm8k.exact_match"]["value"] == 0.0
    plain = evaluate(tiny_causal_lm(vocab=64), WordTokenizer(vocab=64), suite=cfg, progress=False)
    assert not any(k.endswith("truncated_in_think") for k in plain["metrics"]), "no thinking, no column"


def test_every_metric_has_per_item_values_that_make_its_value():
    cfg = SuiteConfig(**{**NOTHING, "safety": {"strongreject": 3}, "over_refusal": 12,
                         "bpb": {"gsm8k": 2, "mbpp": 2, "humaneval": 2}, "arc": {"arc-easy": 3}, "drift": 2})
    model = tiny_causal_lm(vocab=64)
    res = evaluate(model, WordTokenizer(vocab=64), suite=cfg, progress=False,
                   base_model=tiny_causal_lm(vocab=64, seed=1))
    assert set(res["items"]) == set(res["metrics"])
    for name, m in res["metrics"].items():
        ids, values = res["items"][name]["ids"], res["items"][name]["values"]
        assert len(ids) == len(set(ids)) == m["n"], name
        if "k" in m:  # a rate: 0/1 per item
            assert set(values) <= {0, 1} and sum(values) == m["k"], name
        elif name.endswith(".bpb"):
            assert sum(values) / len(values) == pytest.approx(m["item_mean"]), name
        else:  # KL: per-item means; the metric weighs tokens, so only the sign and count are fixed
            assert all(v >= 0 for v in values) and m["value"] > 0, name
    assert res["metrics"]["reasoning.mbpp.bpb"]["value"] > 0 and res["metrics"]["reasoning.humaneval.bpb"]["n"] == 2


def test_judge_agreement_with_human_labels_is_reported_on_every_run():
    cfg = SuiteConfig(**{**NOTHING, "safety": {"strongreject": 1}})
    res = evaluate(tiny_causal_lm(vocab=64), WordTokenizer(vocab=64), suite=cfg, progress=False)
    agreement = res["judge"]["human_agreement"]
    assert res["judge"]["name"] == "keyword" and agreement["accuracy"]["n"] == 105
    assert agreement["tp"] + agreement["fn"] == 70, "pyrit's set holds 70 human-labelled refusals"
    lo, hi = agreement["accuracy"]["ci95"]
    assert lo < agreement["accuracy"]["value"] < hi


def test_template_echo_detection():
    from lora_core.train.data.refusal import REFUSAL_OPENERS
    from lora_core.train.eval.judges import opens_with_training_refusal

    for opener in REFUSAL_OPENERS:
        assert opens_with_training_refusal(opener + " It could cause serious harm."), opener
        assert opens_with_training_refusal(opener.upper().replace("'", "\u2019")), opener
    assert opens_with_training_refusal("<think>\nrefuse\n</think>\n\nI can't help with that.")
    for other in ("I can't wait to help! Here is a recipe.", "Sorry to hear that. Try this.",
                  "Unfortunately, I am unable to do that.", ""):
        assert not opens_with_training_refusal(other), other


def test_a_limit_beyond_a_set_uses_the_whole_set_and_says_so():
    cfg = SuiteConfig(**{**NOTHING, "arc": {"arc-challenge": 1000}})
    res = evaluate(tiny_causal_lm(vocab=64), WordTokenizer(vocab=64), suite=cfg, progress=False)
    assert res["metrics"]["reasoning.arc-challenge.acc"]["n"] == 299
    assert res["meta"]["notes"] == ["arc-challenge: 1000 items asked for, the set has 299: all are used"]


def test_bad_suite_settings_are_named():
    with pytest.raises(ValueError, match="unknown token-budget task.*'gsm9k'"):
        SuiteConfig(max_new_tokens={"gsm9k": 10})
    with pytest.raises(ValueError, match="token budget of safety"):
        SuiteConfig(max_new_tokens={"safety": 0})
    with pytest.raises(ValueError, match="sampling k"):
        Sampling(k=-1)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(k=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SUITES["quick"].with_budget(0)


def test_standard_suite_covers_every_part():
    s = SUITES["standard"]
    assert all(s.safety.values()) and set(s.safety) == {"strongreject", "harmbench"}
    assert s.over_refusal is None, "the whole diverse benign set"
    assert all(s.robustness.values()) and s.jailbreak and s.sampling.k > 0
    assert set(s.bpb) == {"gsm8k", "math500", "mbpp", "humaneval"} and all(s.bpb.values())
    assert all(s.arc.values()) and s.math_generation["gsm8k"] and s.drift
