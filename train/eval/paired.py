"""Differences between two evaluation runs, with 95% intervals: paired when the runs scored the
same items, unpaired when they did not.

Two runs of the same suite score the same fixed-seed items, and an item that is hard for one model
is usually hard for the other. Pairing the per-item outcomes removes that shared variation, so a
paired interval is much narrower than one built from the two standard errors (and an unpaired one
is conservative for positively correlated runs). Every difference here is run B minus run A.

- `paired_difference`: items matched by id; the difference of the per-item means and a paired
  bootstrap percentile interval (resample the shared items with replacement). For 0/1 outcomes it
  adds McNemar's exact test and Newcombe's interval (below).
- `mcnemar`: discordant counts and the exact two-sided p-value, 2 * P(X <= min(b, c)) for
  X ~ Binomial(b + c, 1/2), capped at 1 (the conditional binomial form of McNemar's test).
- `newcombe_paired_interval`: Newcombe's method 10 for paired proportions (R. G. Newcombe, 1998,
  "Improved confidence intervals for the difference between binomial proportions based on paired
  data", Stat. Med. 17:2635-2650): Wilson score limits of the two marginal proportions combined
  square-and-add, with the correlation between them estimated by a continuity-corrected phi.
- `newcombe_unpaired_interval` and `normal_unpaired_interval`: the fall-backs for result files
  without per-item outcomes (Newcombe 1998, Stat. Med. 17:873-890, method 10, for rates; the
  normal interval from the two standard errors for means).

Ratio-of-sums metrics (corpus bits per byte = total bits / total bytes) are compared through their
per-item values: the difference and its interval are those of the per-item mean, every item
weighing the same, not of the corpus ratio shown as the metric's value.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from lora_core.common.text import short_repr

__all__ = ["Z95", "is_number", "ci95_of", "interval95", "error_bar", "item_values", "align_items",
           "bootstrap_difference", "mcnemar", "newcombe_paired_interval", "newcombe_unpaired_interval",
           "square_and_add_interval", "normal_unpaired_interval", "paired_difference", "is_binary"]

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal

# Cells of a resampling chunk: 10,000 resamples of 1,000 items would otherwise be an 80 MB array.
_CHUNK_CELLS = 2_000_000


def _wilson(k: int, n: int) -> tuple[float, float]:
    from lora_core.train.eval.metrics import wilson_interval  # one Wilson formula for the whole project

    return wilson_interval(k, n, Z95)


def is_number(value) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ci95_of(m: dict):
    """A metric entry's "ci95" when it is a whole [low, high]; None when absent or [null, null]."""
    ci = m.get("ci95")
    return ci if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci else None


def interval95(m: dict | None) -> tuple[float, float] | None:
    """A metric entry's 95% interval: its own "ci95" when whole (Wilson's for a rate, never empty
    at 0 or 1), else value ± Z95 standard errors; None without either. A "ci95" of [null, null]
    (a NaN written as JSON) counts as none."""
    if not m:
        return None
    ci, value, se = ci95_of(m), m.get("value"), m.get("stderr")
    if ci is not None:
        return ci[0], ci[1]
    if isinstance(value, (int, float)) and is_number(se):
        return value - Z95 * se, value + Z95 * se
    return None


def error_bar(m: dict | None) -> tuple[float, float] | None:
    """(below, above) distances of a metric's 95% interval (`interval95`) from its value, for a
    plot; None without a finite value or an interval."""
    if not m or not is_number(m.get("value")):
        return None
    ci, value, se = ci95_of(m), m["value"], m.get("stderr")
    if ci is not None:
        return max(0.0, value - ci[0]), max(0.0, ci[1] - value)
    return (Z95 * se, Z95 * se) if is_number(se) else None


def item_values(ids: Sequence, values: Sequence, where: str) -> dict[str, float]:
    """{id: value} of one run's per-item results; errors start with `where` (e.g. the file)."""
    if not isinstance(ids, (list, tuple)) or not isinstance(values, (list, tuple, np.ndarray)):
        raise ValueError(f"{where}: item ids and values must be lists")
    if len(ids) != len(values):
        raise ValueError(f"{where}: {len(ids)} item ids but {len(values)} values")
    by_id: dict[str, float] = {}
    for i, (item, value) in enumerate(zip(ids, values)):
        if not isinstance(item, str):
            raise ValueError(f"{where}: item id #{i} is {short_repr(item)}, not a string")
        if item in by_id:
            raise ValueError(f"{where}: item id {short_repr(item)} appears twice, so it cannot be paired")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(value):
            raise ValueError(f"{where}: item {short_repr(item)} has value {short_repr(value)}, not a finite number")
        by_id[item] = float(value)
    return by_id


def align_items(ids_a: Sequence[str], values_a: Sequence[float], ids_b: Sequence[str],
                values_b: Sequence[float]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(shared ids in run A's order, A's values (n,), B's values (n,)) on the ids both runs have.

    Refuses duplicate ids, non-finite values and runs that share no item.
    """
    a, b = item_values(ids_a, values_a, "run A"), item_values(ids_b, values_b, "run B")
    shared = [item for item in a if item in b]
    if not shared:
        raise ValueError(f"the two runs share no item ids (A has {len(a)}, B has {len(b)}): "
                         "they were not evaluated on the same items, so they cannot be paired")
    return (shared, np.array([a[i] for i in shared], dtype=np.float64),
            np.array([b[i] for i in shared], dtype=np.float64))


def is_binary(*arrays: np.ndarray) -> bool:
    """Every value of every array is 0 or 1 (0/1 outcomes: McNemar, Newcombe, Wilson apply)."""
    return all(bool(np.all((a == 0.0) | (a == 1.0))) for a in arrays)


def bootstrap_difference(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0,
                         confidence: float = 0.95) -> dict:
    """Paired bootstrap of mean(b - a): {"difference", "ci95": [lo, hi] or None, "resamples", "seed"}.

    Each resample draws n item indices with replacement from `numpy.random.default_rng(seed)`; the
    interval is the (2.5, 97.5) percentiles of the resampled mean differences. The same seed, items
    and resample count give the same interval. With fewer than 2 items there is no interval (None):
    resampling one item only ever returns it.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length, non-empty 1-D arrays, got {a.shape} and {b.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = b - a  # (n,)
    n = d.size
    result = {"difference": float(d.mean()), "ci95": None, "resamples": int(resamples), "seed": int(seed)}
    if n < 2:
        return result
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))  # (chunk, n)
        means[start:stop] = d[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    result["ci95"] = [float(lo), float(hi)]
    return result


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """McNemar's exact test on paired 0/1 outcomes, with Newcombe's interval for mean(b) - mean(a).

    Returns {"b": items with A = 1 and B = 0, "c": items with A = 0 and B = 1, "both", "neither",
    "p_value": exact two-sided, "difference": (c - b) / n, "ci95": `newcombe_paired_interval`}.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length, non-empty 1-D arrays, got {a.shape} and {b.shape}")
    if not is_binary(a, b):
        raise ValueError("McNemar's test needs 0/1 outcomes")
    only_a = int(np.sum((a == 1) & (b == 0)))
    only_b = int(np.sum((a == 0) & (b == 1)))
    both = int(np.sum((a == 1) & (b == 1)))
    neither = a.size - only_a - only_b - both
    m = only_a + only_b
    # Exact integer sums: float binomial terms lose the tail when m is in the thousands.
    tail = sum(math.comb(m, k) for k in range(min(only_a, only_b) + 1))
    p_value = 1.0 if m == 0 else min(1.0, 2 * tail / 2 ** m)
    return {"b": only_a, "c": only_b, "both": both, "neither": neither, "p_value": p_value,
            "difference": (only_b - only_a) / a.size,
            "ci95": list(newcombe_paired_interval(both, only_b, only_a, neither))}


def newcombe_paired_interval(e: int, f: int, g: int, h: int) -> tuple[float, float]:
    """95% interval for p1 - p2 = (f - g) / n from a paired 2x2 table, Newcombe (1998) method 10.

    Cells as in the paper: e = both positive, f = first positive only, g = second positive only,
    h = both negative; p1 = (e + f) / n, p2 = (e + g) / n. With (l1, u1) and (l2, u2) the Wilson
    limits of p1 and p2 and phi the continuity-corrected phi coefficient of the table (0 when a
    margin is empty; eh - fg reduced by n/2 towards 0 when positive, never below 0):
        lower = d - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        upper = d + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)
    """
    cells = (e, f, g, h)
    if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0 for x in cells) or sum(cells) == 0:
        raise ValueError(f"a paired 2x2 table needs non-negative integer counts with n > 0, got {cells}")
    n = e + f + g + h
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = _wilson(e + f, n)
    l2, u2 = _wilson(e + g, n)
    margins = (e + f) * (g + h) * (e + g) * (f + h)
    cross = e * h - f * g
    if margins == 0:
        phi = 0.0
    elif cross > 0:
        phi = max(cross - n / 2.0, 0.0) / math.sqrt(margins)
    else:
        phi = cross / math.sqrt(margins)
    d = p1 - p2
    below = (p1 - l1) ** 2 - 2.0 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2.0 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return d - math.sqrt(max(below, 0.0)), d + math.sqrt(max(above, 0.0))


def square_and_add_interval(value_a: float, ci_a: Sequence[float], value_b: float,
                            ci_b: Sequence[float]) -> tuple[float, float]:
    """Interval for value_b - value_a from two independent estimates' own intervals (Newcombe's
    square-and-add, also called MOVER): each side adds the distances to the limits in quadrature."""
    (la, ua), (lb, ub) = ci_a, ci_b
    d = value_b - value_a
    return (d - math.sqrt((value_b - lb) ** 2 + (ua - value_a) ** 2),
            d + math.sqrt((ub - value_b) ** 2 + (value_a - la) ** 2))


def newcombe_unpaired_interval(k_a: int, n_a: int, k_b: int, n_b: int) -> tuple[float, float]:
    """95% interval for k_b/n_b - k_a/n_a from independent samples: Newcombe (1998, Stat. Med.
    17:873-890) method 10, the square-and-add of the two Wilson intervals."""
    return square_and_add_interval(k_a / n_a, _wilson(k_a, n_a), k_b / n_b, _wilson(k_b, n_b))


def normal_unpaired_interval(value_a: float, se_a: float, value_b: float, se_b: float) -> tuple[float, float]:
    """value_b - value_a ± 1.96 sqrt(se_a^2 + se_b^2): independent means, normal approximation."""
    half = Z95 * math.hypot(se_a, se_b)
    d = value_b - value_a
    return d - half, d + half


def paired_difference(ids_a: Sequence[str], values_a: Sequence[float], ids_b: Sequence[str],
                      values_b: Sequence[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """Run B minus run A on the items both scored.

    Returns {"n_shared", "difference", "ci95", "method", "bootstrap_ci95", "resamples", "seed",
    "mcnemar": `mcnemar(...)` when every value is 0 or 1, else None}. "ci95" is the paired
    bootstrap interval, except for 0/1 outcomes, where it is Newcombe's paired score interval:
    when the two runs agree on every item the bootstrap interval is [0, 0] whatever n is, which
    claims certainty 96 items cannot give; the score interval still has width there.
    """
    shared, a, b = align_items(ids_a, values_a, ids_b, values_b)
    boot = bootstrap_difference(a, b, resamples=resamples, seed=seed)
    binary = is_binary(a, b)
    exact = mcnemar(a, b) if binary else None
    return {"n_shared": len(shared), "difference": boot["difference"],
            "ci95": exact["ci95"] if binary and len(shared) >= 2 else boot["ci95"],
            "method": "Newcombe's paired score interval" if binary else "paired bootstrap",
            "bootstrap_ci95": boot["ci95"], "resamples": boot["resamples"], "seed": boot["seed"],
            "mcnemar": exact}
