"""The metric registry's answers, pinned for every metric the runner can emit: these are the
answers results.md's "better" column, compare's plot axes, the demo and the reproduce claims gave
before they were read from one table."""
import pytest

from lora_core.train.eval import metric_registry as reg

# name: (higher_is_better, kind, the tables' "better" column)
EMITTED = {
    "safety.strongreject.refusal_rate": (True, "proportion", "higher = safer"),
    "safety.harmbench.refusal_rate": (True, "proportion", "higher = safer"),
    "safety.strongreject.explicit_refusal_rate": (True, "proportion", "higher = safer"),
    "safety.strongreject.refusal_rate_non_template": (True, "proportion", "higher = safer"),
    "safety.strongreject.template_echo_rate": (None, "proportion", "(share)"),
    "safety.over_refusal.rate": (False, "proportion", "lower = better"),
    "safety.over_refusal.medicine.rate": (False, "proportion", "lower = better"),
    "robustness.past-tense.refusal_rate": (True, "proportion", "higher = safer"),
    "robustness.future-tense.explicit_refusal_rate": (True, "proportion", "higher = safer"),
    "robustness.jailbreak.refusal_rate": (True, "proportion", "higher = safer"),
    "robustness.jailbreak.dan.refusal_rate": (True, "proportion", "higher = safer"),
    "robustness.jailbreak.template_echo_rate": (None, "proportion", "(share)"),
    "reasoning.gsm8k.exact_match": (True, "proportion", "higher"),
    "reasoning.math500.exact_match": (True, "proportion", "higher"),
    "reasoning.gsm8k.refusal_rate": (False, "proportion", "lower = better"),
    "reasoning.math500.refusal_rate": (False, "proportion", "lower = better"),
    "reasoning.gsm8k.truncated_in_think": (False, "proportion", "lower"),
    "safety.strongreject.truncated_in_think": (False, "proportion", "lower"),
    "reasoning.gsm8k.pass_at_1_sampled": (True, "proportion", "higher"),
    "reasoning.gsm8k.truncated_in_think_sampled": (False, "proportion", "lower"),
    "reasoning.gsm8k.bpb": (False, "mean", "lower"),
    "reasoning.math500.bpb": (False, "mean", "lower"),
    "reasoning.mbpp.bpb": (False, "mean", "lower"),
    "reasoning.humaneval.bpb": (False, "mean", "lower"),
    "reasoning.arc-easy.acc": (True, "proportion", "higher"),
    "reasoning.arc-easy.acc_norm": (True, "proportion", "higher"),
    "reasoning.arc-challenge.acc": (True, "proportion", "higher"),
    "reasoning.arc-challenge.acc_norm": (True, "proportion", "higher"),
    "reasoning.humaneval.pass_at_1": (True, "proportion", "higher"),
    "drift.kl_base": (False, "mean", "lower = closer to base"),
}


@pytest.mark.parametrize("name", sorted(EMITTED))
def test_every_emitted_metric_has_its_direction_kind_and_column(name):
    higher, kind, better = EMITTED[name]
    metric = reg.lookup(name)
    assert metric is not None
    assert (metric.higher_is_better, metric.kind, reg.better_text(name)) == (higher, kind, better)
    assert reg.higher_is_better(name) is higher
    assert reg.lower_is_better(name) is (higher is False)
    assert reg.is_proportion(name) is (kind == "proportion")
    assert metric.unit


def test_the_runner_emits_no_metric_the_registry_does_not_know():
    """Every `run.rate`/`run.summary`/`run.mean_of_item_rates` name pattern in the task modules,
    with its placeholders filled, is known (a new metric must be added to the registry)."""
    import inspect
    import re

    from lora_core.train.eval import context, reasoning_tasks, safety_tasks

    source = "\n".join(inspect.getsource(m) for m in (safety_tasks, reasoning_tasks, context))
    names = re.findall(r"run\.(?:rate|summary|mean_of_item_rates)\(\s*f?\"([^\"]+)\"", source)
    assert len(names) >= 10, names
    fill = {"prefix": "safety.strongreject", "name": "gsm8k", "template": "dan", "topic": "medicine",
            "measure": "acc", "origin": "external"}
    for pattern in names:
        name = re.sub(r"\{(\w+)\}", lambda m: fill[m.group(1)], pattern)
        assert reg.lookup(name) is not None and reg.lookup(name) is not reg._RATE_LIKE, name


def test_unknown_names_have_no_direction():
    assert reg.lookup("custom.thing") is None
    assert (reg.better_text("custom.thing"), reg.higher_is_better("custom.thing")) == ("", None)
    assert not reg.lower_is_better("custom.thing") and not reg.is_proportion("custom.thing")
    # a new rate is a proportion, with no direction until the registry says one
    assert reg.is_proportion("reasoning.mbpp.pass_rate") and reg.higher_is_better("reasoning.mbpp.pass_rate") is None
    assert reg.label("custom.thing") == "custom.thing"


def test_labels():
    assert reg.label("safety.strongreject.refusal_rate") == "StrongREJECT refusal rate"
    assert reg.label("safety.over_refusal.rate") == "over-refusal (diverse benign requests)"
    assert reg.label("safety.over_refusal.medicine.rate") == "over-refusal: medicine"
    assert reg.label("reasoning.gsm8k.refusal_rate") == "GSM8K questions refused"
    assert reg.label("reasoning.math500.bpb") == "MATH-500 gold bits/byte"
    assert reg.label("drift.kl_base") == "KL drift from base (nats/token)"


def test_overlap_energy_is_lower_better_for_the_claims():
    assert reg.lower_is_better("overlap.energy") and not reg.is_proportion("overlap.energy")


def test_the_demo_rows_and_the_claims_read_the_registry():
    from lora_core.train.demo_report import ROWS
    from lora_core.train.repro.claims import is_rate

    assert ROWS == [
        ("safety.strongreject.refusal_rate", "StrongREJECT refusal rate", True),
        ("safety.strongreject.explicit_refusal_rate", "StrongREJECT explicit refusals", True),
        ("safety.harmbench.refusal_rate", "HarmBench refusal rate", True),
        ("safety.over_refusal.rate", "over-refusal (diverse benign requests)", False),
        ("reasoning.gsm8k.exact_match", "GSM8K exact match", True),
        ("reasoning.gsm8k.refusal_rate", "GSM8K questions refused", False),
        ("reasoning.gsm8k.bpb", "GSM8K gold bits/byte", False),
        ("reasoning.math500.bpb", "MATH-500 gold bits/byte", False),
        ("reasoning.arc-easy.acc", "ARC-Easy accuracy", True),
        ("reasoning.arc-challenge.acc", "ARC-Challenge accuracy", True),
        ("drift.kl_base", "KL drift from base (nats/token)", False),
    ]
    for name, (_, kind, _) in EMITTED.items():
        assert is_rate(name) is (kind == "proportion"), name
