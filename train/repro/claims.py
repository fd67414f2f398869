"""Claim verdicts computed from confidence intervals: the one rule every row of the claims table uses.

The rule, in full:

1. A comparison is the difference D = mean(Y) - mean(X) of one measure between two arms, Y being
   the arm the claim speaks for (LoRA in "LoRA reaches full fine-tuning's safety"). For a measure
   where lower is better (bits per byte, KL drift, overlap) D is negated, so D > 0 always means
   "Y is better" and the table says which way it was read.
2. Values are per unit and per seed: a unit is an evaluation item (its id) or, for overlap, a
   module (its name). The arms are paired by unit: only units that every run of both arms scored
   count, and n is that count. Seeds are pooled: an arm's value of a unit is its mean over seeds.
3. The interval is a 95% percentile interval of a two-level paired bootstrap: each resample draws
   n units with replacement (the same draw for both arms: that is the pairing) and, for each arm
   on its own, as many seeds as it has, with replacement. So the interval carries the variation of
   the items and of the training seeds. An arm run once (the base model) adds item variation only.
   Fewer than 2 shared units give no interval.
   For 0/1 measures (refusals, correct answers) the bootstrap can be degenerate: when both arms
   refuse none of 24 prompts every resample gives 0 and the interval is [0, 0], which would
   "support" any non-inferiority claim. So when every value is 0 or 1 and either each arm ran
   once or the bootstrap interval has zero width (then every seed of an arm scored every item
   alike, and the first seeds' table is the table), the interval is widened to contain Newcombe's
   paired interval (train.eval.paired.mcnemar) of the first seeds' 2x2 table.
4. Verdicts (lo, hi = the interval of the oriented D):
   - "better" claims (Y beats X): "supported" when lo > 0, "contradicted" when hi < 0;
   - "reaches" claims (Y is not worse than X by more than the margin m): "supported" when
     lo > -m, "contradicted" when hi < -m. The margin is the preset's `claims.margin` in the
     measure's own units for rates and accuracies (0.10 = 10 points), and that share of |mean(X)|
     for any other measure (bits per byte, overlap energy): `margin_for`;
   - anything else, and every comparison without an interval: "inconclusive at this n".
5. "not informative" replaces the verdict of rule 4 (which the row keeps as `rule4_verdict`), with
   the reason in the row, when the data cannot speak to the claim (`not_informative`):
   - ceiling or floor: the measure is a proportion and both arms sit at the same bound (both at
     1.000 or both at 0.000): a "reaches" claim would be supported by two arms that cannot differ;
   - unmoved: the claim is about aligned models, and neither arm moved the safety measure from the
     base model (each arm's paired interval of safety - base safety contains 0): comparing two
     arms that training did not change says nothing about the methods. Not applied to overlap
     rows, which read the direction of the update, not its effect.
   A verdict is never written by hand: the report only prints what `verdict` and rule 5 return.
"""
from __future__ import annotations

import numpy as np

from lora_core.train.eval.metric_registry import is_proportion
from lora_core.train.eval.metrics import wilson_interval
from lora_core.train.eval.paired import is_binary, mcnemar

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive at this n"
NOT_INFORMATIVE = "not informative"
KINDS = ("better", "reaches")


def verdict(ci, kind: str, margin: float = 0.0) -> str:
    """The verdict of an oriented difference's 95% interval `ci` = [lo, hi] (or None)."""
    if kind not in KINDS:
        raise ValueError(f"claim kind must be one of {KINDS}, got {kind!r}")
    if kind == "reaches" and not margin > 0:
        raise ValueError(f"a 'reaches' claim needs a positive margin, got {margin}")
    if ci is None:
        return INCONCLUSIVE
    lo, hi = ci
    bound = 0.0 if kind == "better" else -margin
    if lo > bound:
        return SUPPORTED
    if hi < bound:
        return CONTRADICTED
    return INCONCLUSIVE


def is_rate(metric: str) -> bool:
    """Measures bounded in [0, 1] that an absolute margin suits (refusal rates, accuracies, pass@1):
    the metric registry's proportions."""
    return is_proportion(metric)


def margin_for(metric: str, margin: float, mean_x: float | None) -> float:
    """Rule 4's margin for `metric`: absolute for rates, relative to |mean(X)| otherwise."""
    if is_rate(metric) or mean_x is None or mean_x == 0:
        return margin
    return margin * abs(mean_x)


def _matrix(runs: dict, units: list[str]) -> np.ndarray:
    """(seeds, units) values of one arm; `runs` is {seed: {unit: value}}."""
    return np.array([[runs[s][u] for u in units] for s in sorted(runs)], dtype=np.float64)


def shared_units(x: dict, y: dict) -> list[str]:
    """Units every run of both arms scored, in a fixed (sorted) order."""
    sets = [set(v) for v in list(x.values()) + list(y.values())]
    return sorted(set.intersection(*sets)) if sets else []


def _bootstrap(X: np.ndarray, Y: np.ndarray | None, resamples: int, seed: int) -> list[float]:
    """95% percentile interval of mean(Y) - mean(X) (X None: of mean(Y)) under rule 3's two-level
    bootstrap: units drawn once per resample for both arms (the pairing), seeds per arm."""
    n = Y.shape[1]
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    rows = max(Y.shape[0], 1 if X is None else X.shape[0])
    chunk = max(1, 2_000_000 // (n * rows))
    for start in range(0, resamples, chunk):
        b = min(resamples, start + chunk) - start
        sy = rng.integers(0, Y.shape[0], size=(b, Y.shape[0]))
        d = Y[sy].mean(axis=1)  # (b, n)
        if X is not None:
            sx = rng.integers(0, X.shape[0], size=(b, X.shape[0]))  # seeds drawn for X per resample
            d = d - X[sx].mean(axis=1)
        items = rng.integers(0, n, size=(b, n))  # one unit draw shared by both arms: the pairing
        draws[start:start + b] = np.take_along_axis(d, items, axis=1).mean(axis=1)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return [float(lo), float(hi)]


def pooled_difference(x: dict, y: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """mean(Y) - mean(X) over shared units, seeds pooled, with the two-level paired bootstrap
    interval of rule 3. `x`, `y`: {seed: {unit id: value}}. Not oriented (see `compare`)."""
    if not x or not y:
        raise ValueError("each arm needs at least one run to compare")
    units = shared_units(x, y)
    out = {"n": len(units), "seeds_x": len(x), "seeds_y": len(y), "difference": None, "ci95": None,
           "mean_x": None, "mean_y": None, "resamples": resamples, "bootstrap_seed": seed}
    if not units:
        return out
    X, Y = _matrix(x, units), _matrix(y, units)  # (Sx, n), (Sy, n)
    out["mean_x"], out["mean_y"] = float(X.mean()), float(Y.mean())
    out["difference"] = float(Y.mean(0).mean() - X.mean(0).mean())
    if len(units) < 2:
        return out
    lo, hi = _bootstrap(X, Y, resamples, seed)
    out["ci95"] = [lo, hi]
    out["interval"] = "two-level paired bootstrap"
    if is_binary(X, Y) and ((X.shape[0] == 1 and Y.shape[0] == 1) or hi - lo == 0):
        n_lo, n_hi = mcnemar(X[0], Y[0])["ci95"]
        out["ci95"] = [min(lo, n_lo), max(hi, n_hi)]
        out["interval"] = "hull of the paired bootstrap and Newcombe's paired interval"
    return out


def compare(x: dict, y: dict, *, kind: str, higher_is_better: bool = True, margin: float = 0.0,
            resamples: int = 2000, seed: int = 0) -> dict:
    """One claim row's numbers: the pooled paired difference Y - X, oriented so that > 0 means Y
    is better, its interval and the verdict of rule 4."""
    raw = pooled_difference(x, y, resamples=resamples, seed=seed)
    sign = 1.0 if higher_is_better else -1.0
    diff = None if raw["difference"] is None else sign * raw["difference"]
    ci = None if raw["ci95"] is None else sorted(sign * v for v in raw["ci95"])
    return {**raw, "oriented_difference": diff, "oriented_ci95": ci, "higher_is_better": higher_is_better,
            "kind": kind, "margin": margin if kind == "reaches" else None,
            "verdict": verdict(ci, kind, margin)}


def pooled_mean(y: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """One arm's mean over its units (seeds pooled) with rule 3's bootstrap interval: the arm's row
    in the per-arm table. `y`: {seed: {unit id: value}}. For 0/1 values run once (or with a
    zero-width bootstrap) the interval is widened to contain the Wilson interval of the first
    seed, the one-arm counterpart of rule 3's Newcombe widening: a rate of 0 of 24 is not known
    to be exactly 0, and a rate's interval never leaves [0, 1]."""
    if not y:
        raise ValueError("an arm needs at least one run")
    units = sorted(set.intersection(*[set(v) for v in y.values()]))
    out = {"mean": None, "ci95": None, "n": len(units), "seeds": len(y)}
    if not units:
        return out
    Y = _matrix(y, units)
    out["mean"] = float(Y.mean(0).mean())
    if len(units) < 2:
        return out
    lo, hi = _bootstrap(None, Y, resamples, seed)
    if is_binary(Y) and (Y.shape[0] == 1 or hi - lo == 0):
        w_lo, w_hi = wilson_interval(int(Y[0].sum()), len(units))
        lo, hi = min(lo, w_lo), max(hi, w_hi)
    out["ci95"] = [lo, hi]
    return out


def _bound(mean: float | None) -> str | None:
    if mean is None:
        return None
    return "1.000 (ceiling)" if mean == 1.0 else "0.000 (floor)" if mean == 0.0 else None


def moved_from_base(base: dict, arm: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """Whether training moved one arm's measure from the base model's: the paired difference
    arm - base with rule 3's interval; moved = the interval excludes 0."""
    raw = pooled_difference(base, arm, resamples=resamples, seed=seed)
    ci = raw["ci95"]
    return {"difference": raw["difference"], "ci95": ci, "moved": ci is not None and (ci[0] > 0 or ci[1] < 0)}


def not_informative(row: dict, safety_moves: tuple[dict, dict] | None = None) -> str | None:
    """Rule 5's reason why a compared row cannot speak to its claim, or None.

    row: a `compare` result with its `measure`; safety_moves: `moved_from_base` of arm X and arm Y
    on the claim's safety measure (None: the unmoved test does not apply, e.g. overlap rows)."""
    if is_rate(row["measure"]):
        bx, by = _bound(row.get("mean_x")), _bound(row.get("mean_y"))
        if bx is not None and bx == by:
            return f"both arms at {bx}"
    if safety_moves is not None and not any(m["moved"] for m in safety_moves):
        shown = ", ".join(f"{m['difference']:+.3f}" + (f" [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]"
                                                        if m["ci95"] else "") for m in safety_moves)
        return f"neither arm moved safety from the base model (X, Y minus base: {shown})"
    return None
