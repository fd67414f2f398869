"""Claim verdicts on synthetic results where the answer is known, and the pooled paired bootstrap
checked against a direct numpy computation."""
import numpy as np
import pytest

from lora_core.train.repro.claims import (CONTRADICTED, INCONCLUSIVE, SUPPORTED, compare, margin_for,
                                pooled_difference, pooled_mean, verdict)


def arm(values_by_seed):
    return {s: {f"item-{i}": float(v) for i, v in enumerate(vals)} for s, vals in enumerate(values_by_seed)}


def binary(rate, n, rng):
    return (rng.random(n) < rate).astype(float)


@pytest.mark.parametrize("ci,kind,margin,expected", [
    ([0.01, 0.3], "better", 0.0, SUPPORTED), ([-0.3, -0.01], "better", 0.0, CONTRADICTED),
    ([-0.1, 0.1], "better", 0.0, INCONCLUSIVE), (None, "better", 0.0, INCONCLUSIVE),
    ([-0.05, 0.1], "reaches", 0.1, SUPPORTED), ([-0.4, -0.15], "reaches", 0.1, CONTRADICTED),
    ([-0.2, 0.0], "reaches", 0.1, INCONCLUSIVE)])
def test_the_rule(ci, kind, margin, expected):
    assert verdict(ci, kind, margin) == expected


def test_rule_refuses_a_reaches_claim_without_margin_and_unknown_kinds():
    with pytest.raises(ValueError, match="margin"):
        verdict([0, 1], "reaches", 0.0)
    with pytest.raises(ValueError, match="kind"):
        verdict([0, 1], "beats")


def test_clearly_better_clearly_worse_and_overlapping():
    rng = np.random.default_rng(0)
    low = arm([binary(0.1, 60, rng) for _ in range(3)])
    high = arm([binary(0.9, 60, rng) for _ in range(3)])
    also_low = arm([binary(0.1, 60, rng) for _ in range(3)])
    assert compare(low, high, kind="better")["verdict"] == SUPPORTED
    assert compare(high, low, kind="better")["verdict"] == CONTRADICTED
    assert compare(low, also_low, kind="better")["verdict"] == INCONCLUSIVE
    # non-inferiority: equal rates reach each other within 20 points, a 0.8 drop does not
    assert compare(low, also_low, kind="reaches", margin=0.2)["verdict"] == SUPPORTED
    assert compare(high, low, kind="reaches", margin=0.2)["verdict"] == CONTRADICTED


def test_lower_is_better_is_oriented_and_said():
    x = arm([[2.0, 2.1, 1.9, 2.2, 2.0, 1.8]])  # bits per byte: lower is better
    y = arm([[1.0, 1.1, 0.9, 1.2, 1.0, 0.8]])
    row = compare(x, y, kind="better", higher_is_better=False)
    assert row["difference"] == pytest.approx(-1.0) and row["oriented_difference"] == pytest.approx(1.0)
    assert row["verdict"] == SUPPORTED and row["oriented_ci95"][0] > 0


def test_too_few_items_or_no_shared_items_is_inconclusive():
    one = compare({0: {"a": 0.0}}, {0: {"a": 1.0}}, kind="better")
    assert one["n"] == 1 and one["ci95"] is None and one["verdict"] == INCONCLUSIVE
    none = compare({0: {"a": 0.0, "b": 0.0}}, {0: {"c": 1.0, "d": 1.0}}, kind="better")
    assert none["n"] == 0 and none["verdict"] == INCONCLUSIVE


def test_difference_is_of_seed_pooled_item_means_on_shared_items():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3, 40))  # (seeds, items)
    Y = rng.normal(loc=0.3, size=(2, 40))
    x, y = arm(X), arm(Y)
    del y[1]["item-7"]  # an item one run lacks is not paired
    out = pooled_difference(x, y, resamples=500)
    keep = [i for i in range(40) if i != 7]
    assert out["n"] == 39
    assert out["difference"] == pytest.approx(Y[:, keep].mean(0).mean() - X[:, keep].mean(0).mean())
    lo, hi = out["ci95"]
    assert lo < out["difference"] < hi


def test_seed_variation_widens_the_interval():
    """Seeds that disagree (same items, shifted per seed) must give a wider interval than one seed."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=50)
    x = arm([base])
    agreeing = arm([base + 0.5 for _ in range(3)])
    disagreeing = arm([base + 0.5 + shift for shift in (-1.0, 0.0, 1.0)])
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    narrow = pooled_difference(x, agreeing, resamples=2000)
    wide = pooled_difference(x, disagreeing, resamples=2000)
    assert narrow["difference"] == pytest.approx(wide["difference"])
    assert width(wide) > 5 * width(narrow)


def test_interval_covers_the_truth_at_about_95_percent():
    """Paired bootstrap coverage on simulated paired data with a known mean difference."""
    rng = np.random.default_rng(3)
    hits = 0
    trials = 200
    for t in range(trials):
        item = rng.normal(size=60)
        x = arm([item + rng.normal(scale=0.5, size=60)])
        y = arm([item + 0.2 + rng.normal(scale=0.5, size=60)])
        lo, hi = pooled_difference(x, y, resamples=400, seed=t)["ci95"]
        hits += lo <= 0.2 <= hi
    assert 0.88 <= hits / trials <= 0.99, hits / trials


def test_margin_is_absolute_for_rates_and_relative_otherwise():
    assert margin_for("safety.strongreject.refusal_rate", 0.1, 0.4) == 0.1
    assert margin_for("reasoning.arc-easy.acc", 0.1, 0.4) == 0.1
    assert margin_for("reasoning.gsm8k.bpb", 0.1, 2.0) == pytest.approx(0.2)


def test_pooled_mean_of_one_arm():
    out = pooled_mean(arm([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]]), resamples=300)
    assert out["mean"] == pytest.approx(0.75) and out["n"] == 4 and out["seeds"] == 2
    assert out["ci95"][0] <= 0.75 <= out["ci95"][1]



def test_one_arm_rate_of_zero_has_the_wilson_interval_inside_zero_one():
    """0 of 24 refusals run once: the bootstrap alone says [0, 0]; the arm's interval is widened
    to Wilson's [0, 0.138] (the score interval's upper root at k = 0, 1.96^2 / (24 + 1.96^2)),
    and never goes below 0 as a difference against a zero arm would."""
    out = pooled_mean(arm([[0.0] * 24]), resamples=300)
    z2 = 1.959963984540054 ** 2
    assert out["mean"] == 0.0
    assert out["ci95"][0] == 0.0
    assert out["ci95"][1] == pytest.approx(z2 / (24 + z2), rel=1e-12)


def test_one_arm_all_ones_over_three_seeds_is_widened_below_one():
    out = pooled_mean(arm([[1.0] * 10 for _ in range(3)]), resamples=300)
    assert out["ci95"][1] == 1.0 and out["ci95"][0] < 0.75

def test_all_zero_refusals_do_not_support_non_inferiority():
    """0/24 refusals in both arms: the bootstrap alone gives [0, 0] and would call LoRA
    non-inferior; the Newcombe hull (0/24 vs 0/24: about +-0.14) leaves it inconclusive."""
    zeros = arm([[0.0] * 24 for _ in range(3)])
    row = compare(zeros, arm([[0.0] * 24 for _ in range(3)]), kind="reaches", margin=0.1)
    assert row["ci95"][0] < -0.1 < 0.1 < row["ci95"][1]
    assert row["verdict"] == INCONCLUSIVE


def test_one_run_each_binary_interval_contains_newcombes():
    from lora_core.train.eval.paired import mcnemar

    rng = np.random.default_rng(4)
    a, b = binary(0.3, 40, rng), binary(0.5, 40, rng)
    out = pooled_difference(arm([a]), arm([b]), resamples=1000)
    lo, hi = mcnemar(a, b)["ci95"]
    assert out["ci95"][0] <= lo and out["ci95"][1] >= hi
