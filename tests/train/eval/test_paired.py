"""Paired differences between two runs: the bootstrap is reproducible and covers a known difference
in ~95% of simulated runs; McNemar's exact p-value matches a count over every sign sequence;
Newcombe's intervals match the worked examples of his 1998 papers; bad pairings are refused."""
import itertools
import math

import numpy as np
import pytest

from lora_core.train.eval.paired import (bootstrap_difference, mcnemar, newcombe_paired_interval,
                               newcombe_unpaired_interval, normal_unpaired_interval, paired_difference)

SIMULATIONS = 200
# Coverage of a 95% interval over 200 independent simulations: binomial sd = sqrt(.95 * .05 / 200)
# = 0.0154; three sd either side fails a 90% or a 99.9% interval but not a correct one.
LOW, HIGH = 0.95 - 3 * 0.0154, 0.95 + 3 * 0.0154


def _correlated_scores(rng, n, shift):
    """Per-item scores of two runs sharing a per-item difficulty (sd 1) with run noise sd 0.3."""
    difficulty = rng.normal(0.0, 1.0, n)
    return difficulty + rng.normal(0.0, 0.3, n), difficulty + shift + rng.normal(0.0, 0.3, n)


def _correlated_outcomes(rng, n, p_a, p_b, keep=0.7):
    """0/1 outcomes with P(A=1) = p_a, P(B=1) = p_b exactly, positively correlated: B reuses A's
    uniform draw with probability `keep`."""
    u = rng.random(n)
    v = np.where(rng.random(n) < keep, u, rng.random(n))
    return (u < p_a).astype(float), (v < p_b).astype(float)


def test_bootstrap_is_reproducible_for_a_fixed_seed():
    a, b = _correlated_scores(np.random.default_rng(1), 50, 0.1)
    first = bootstrap_difference(a, b, resamples=2000, seed=7)
    assert bootstrap_difference(a, b, resamples=2000, seed=7) == first
    assert bootstrap_difference(a, b, resamples=2000, seed=8)["ci95"] != first["ci95"]
    assert first["difference"] == pytest.approx(float(np.mean(b - a)), abs=1e-12)
    lo, hi = first["ci95"]
    assert lo < first["difference"] < hi


def test_bootstrap_covers_a_known_mean_difference_in_95_percent_of_simulations():
    rng = np.random.default_rng(2024)
    true_difference = 0.2
    paired_hits = unpaired_hits = 0
    for _ in range(SIMULATIONS):
        a, b = _correlated_scores(rng, 100, true_difference)
        lo, hi = bootstrap_difference(a, b, resamples=1000, seed=int(rng.integers(2 ** 31)))["ci95"]
        paired_hits += lo <= true_difference <= hi
        se = lambda x: x.std(ddof=1) / math.sqrt(x.size)  # noqa: E731
        ulo, uhi = normal_unpaired_interval(a.mean(), se(a), b.mean(), se(b))
        unpaired_hits += ulo <= true_difference <= uhi
    assert LOW <= paired_hits / SIMULATIONS <= HIGH, paired_hits
    # Ignoring the pairing here gives intervals ~3x too wide: they cover nearly always.
    assert unpaired_hits / SIMULATIONS > HIGH


def test_bootstrap_and_newcombe_cover_a_known_difference_of_proportions():
    rng = np.random.default_rng(11)
    p_a, p_b = 0.5, 0.6
    boot_hits = newcombe_hits = 0
    for _ in range(SIMULATIONS):
        a, b = _correlated_outcomes(rng, 200, p_a, p_b)
        lo, hi = bootstrap_difference(a, b, resamples=1000, seed=int(rng.integers(2 ** 31)))["ci95"]
        boot_hits += lo <= p_b - p_a <= hi
        nlo, nhi = mcnemar(a, b)["ci95"]
        newcombe_hits += nlo <= p_b - p_a <= nhi
    assert LOW <= boot_hits / SIMULATIONS <= HIGH, boot_hits
    assert LOW <= newcombe_hits / SIMULATIONS <= HIGH, newcombe_hits


def _outcomes(both, only_a, only_b, neither):
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return np.array(a, dtype=float), np.array(b, dtype=float)


@pytest.mark.parametrize("only_a, only_b", [(1, 7), (7, 1), (0, 5), (2, 10), (3, 3), (0, 0), (0, 1), (4, 9)])
def test_mcnemar_exact_p_value_counts_every_sign_sequence(only_a, only_b):
    m = only_a + only_b
    # Under H0 each discordant item is a fair coin: count the sequences at least as extreme.
    extreme = sum(1 for seq in itertools.product((0, 1), repeat=m) if sum(seq) <= min(only_a, only_b))
    expected = min(1.0, 2 * extreme / 2 ** m)
    result = mcnemar(*_outcomes(both=4, only_a=only_a, only_b=only_b, neither=5))
    assert (result["b"], result["c"], result["both"], result["neither"]) == (only_a, only_b, 4, 5)
    assert result["p_value"] == pytest.approx(expected, rel=1e-12)
    assert result["difference"] == pytest.approx((only_b - only_a) / (m + 9))


def test_mcnemar_p_value_of_a_worked_example():
    # 1 vs 7 discordant pairs: p = 2 * (C(8,0) + C(8,1)) / 2^8 = 18/256.
    assert mcnemar(*_outcomes(1, 1, 7, 12))["p_value"] == pytest.approx(18 / 256, rel=1e-12)


# Newcombe (1998), Stat. Med. 17:2635-2650, Table II, method 10, to the paper's 4 decimals:
# (e both positive, f first only, g second only, h neither) -> interval for (f - g) / n.
NEWCOMBE_PAIRED = [((36, 12, 2, 0), (0.0569, 0.3404)), ((18, 12, 2, 18), (0.0562, 0.3290)),
                   ((53, 0, 0, 1), (-0.0729, 0.0729)), ((0, 30, 0, 0), (0.8395, 1.0))]


@pytest.mark.parametrize("table, published", NEWCOMBE_PAIRED)
def test_newcombe_paired_interval_matches_the_paper(table, published):
    lo, hi = newcombe_paired_interval(*table)
    assert lo == pytest.approx(published[0], abs=6e-5) and hi == pytest.approx(published[1], abs=6e-5)
    # The same table through per-item outcomes, with run B as the "first" classification.
    e, f, g, h = table
    a, b = _outcomes(both=e, only_a=g, only_b=f, neither=h)
    assert mcnemar(a, b)["ci95"] == pytest.approx([lo, hi], abs=1e-12)


def test_newcombe_unpaired_interval_matches_the_paper():
    # Newcombe (1998), Stat. Med. 17:873-890, method 10: 56/70 - 48/80 and 9/10 - 3/10.
    assert newcombe_unpaired_interval(48, 80, 56, 70) == pytest.approx((0.0524, 0.3339), abs=6e-5)
    assert newcombe_unpaired_interval(3, 10, 9, 10) == pytest.approx((0.1705, 0.8090), abs=6e-5)


def test_paired_difference_matches_items_by_id():
    ids = [f"q{i}" for i in range(40)]
    a, b = _correlated_outcomes(np.random.default_rng(3), 40, 0.3, 0.6)
    order = np.random.default_rng(4).permutation(40)
    shuffled = paired_difference(ids, a.tolist(), [ids[i] for i in order], b[order].tolist(),
                                 resamples=500, seed=1)
    aligned = paired_difference(ids, a.tolist(), ids, b.tolist(), resamples=500, seed=1)
    assert shuffled == aligned
    assert aligned["n_shared"] == 40 and aligned["difference"] == pytest.approx(b.mean() - a.mean())
    assert aligned["mcnemar"]["b"] + aligned["mcnemar"]["c"] == int(np.sum(a != b))
    # Only the shared ids count; a non-0/1 metric gets no McNemar test.
    partial = paired_difference(["x", "y", "z"], [0.5, 1.5, 2.0], ["z", "y", "w"], [3.0, 1.0, 9.0],
                                resamples=200)
    assert partial["n_shared"] == 2 and partial["difference"] == pytest.approx(((1.0 - 1.5) + (3.0 - 2.0)) / 2)
    assert partial["mcnemar"] is None


@pytest.mark.parametrize("ids_a, values_a, ids_b, values_b, message", [
    (["a", "b"], [1, 0], ["c", "d"], [1, 1], "the two runs share no item ids"),
    (["a", "a"], [1, 0], ["a"], [1], "run A: item id 'a' appears twice"),
    (["a", "b"], [1], ["a"], [1], "run A: 2 item ids but 1 values"),
    (["a"], [1], ["a"], [float("nan")], "run B: item 'a' has value nan"),
    (["a"], [1], ["a"], ["1"], "run B: item 'a' has value '1'"),
    ([3], [1], ["a"], [1], "run A: item id #0 is 3"),
])
def test_bad_pairings_are_refused_by_name(ids_a, values_a, ids_b, values_b, message):
    with pytest.raises(ValueError, match="^" + message):
        paired_difference(ids_a, values_a, ids_b, values_b, resamples=10)


def test_one_shared_item_gives_no_interval():
    result = paired_difference(["a"], [0.0], ["a"], [1.0], resamples=10)
    assert result["difference"] == 1.0 and result["ci95"] is None


def test_agreeing_runs_still_get_an_interval_with_width():
    """Two runs that agree on all 96 items: the bootstrap interval is [0, 0], which would claim
    certainty; the 0/1 difference's interval is Newcombe's score interval, which has width."""
    ids = [f"q{i}" for i in range(96)]
    values = [1.0] * 24 + [0.0] * 72
    result = paired_difference(ids, values, ids, values, resamples=500)
    assert result["bootstrap_ci95"] == [0.0, 0.0]
    lo, hi = result["ci95"]
    assert lo < 0.0 < hi and hi - lo > 0.05, result["ci95"]
    assert result["method"] == "Newcombe's paired score interval"
