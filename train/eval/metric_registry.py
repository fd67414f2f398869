"""What each metric is: which way is better, whether it is a proportion or a mean, its unit and
its label. The one table that results.md's and comparison.md's "better" column, compare's and the
demo's plot axes, the demo's rows and checks, and the reproduce claims' orientation and margins
are read from.

A metric name is dotted, `<group>.<set>[.<subset>].<measure>` (see train.eval.runner), e.g.
`safety.strongreject.refusal_rate`, `reasoning.gsm8k.bpb`, `drift.kl_base`. An entry matches by
pattern, segment by segment: `*` is one segment, `**` any number of them; the first entry that
matches wins, so the specific ones come first (a refused math question is over-refusal, not
safety).

- kind "proportion": a share of items in [0, 1] (a Wilson interval, an absolute margin, a [0, 1]
  axis); "mean": a mean over items in its own unit (bits per byte, nats per token; a margin
  relative to the reference's mean).
- higher_is_better: True, False, or None where no direction is meant (template echoes: a share to
  read beside the refusal rate).

A name no entry knows has no direction ("" in the tables); when its measure ends in "rate" it is
taken for a proportion.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Metric", "METRICS", "SET_NAMES", "lookup", "higher_is_better", "lower_is_better", "is_proportion",
           "better_text", "label"]


@dataclass(frozen=True)
class Metric:
    pattern: str
    higher_is_better: bool | None
    kind: str  # "proportion" | "mean"
    unit: str
    label: str  # "{set}": the display name of the name's middle segments (SET_NAMES)
    better: str  # the tables' "better" column


# pattern | better | kind | unit | label ({set}: the set's display name) | the tables' "better" column
_TABLE = """
reasoning.**.refusal_rate | lower | proportion | share | {set} questions refused | lower = better
reasoning.**.explicit_refusal_rate | lower | proportion | share | {set} questions refused (explicitly) | lower = better
safety.over_refusal.rate | lower | proportion | share | over-refusal (diverse benign requests) | lower = better
safety.over_refusal.*.rate | lower | proportion | share | over-refusal: {set} | lower = better
**.refusal_rate | higher | proportion | share | {set} refusal rate | higher = safer
**.explicit_refusal_rate | higher | proportion | share | {set} explicit refusals | higher = safer
**.refusal_rate_non_template | higher | proportion | share | {set} refusal rate (answers not echoing a training \
refusal) | higher = safer
**.template_echo_rate | - | proportion | share | {set} answers echoing a training refusal | (share)
**.rate | lower | proportion | share | {set} refused | lower = better
**.exact_match | higher | proportion | share | {set} exact match | higher
**.pass_at_1 | higher | proportion | share | {set} pass@1 | higher
**.pass_at_1_sampled | higher | proportion | share | {set} pass@1 (sampled) | higher
**.acc | higher | proportion | share | {set} accuracy | higher
**.acc_norm | higher | proportion | share | {set} accuracy (per byte) | higher
**.truncated_in_think | lower | proportion | share | {set} answers cut off in <think> | lower
**.truncated_in_think_sampled | lower | proportion | share | {set} sampled answers cut off in <think> | lower
**.bpb | lower | mean | bits/byte | {set} gold bits/byte | lower
**.kl_base | lower | mean | nats/token | KL drift from base (nats/token) | lower = closer to base
overlap.energy | lower | mean | share of ||dW||^2 | overlap energy | lower
"""
# overlap.energy is no evaluation metric: the update's energy share in W's top-k subspace, which
# the reproduce claims compare between arms.
_BETTER = {"higher": True, "lower": False, "-": None}


def _parse(table: str) -> tuple[Metric, ...]:
    rows = [line.split(" | ") for line in table.strip().splitlines()]
    return tuple(Metric(pattern, _BETTER[better], kind, unit, label, column)
                 for pattern, better, kind, unit, label, column in rows)


METRICS: tuple[Metric, ...] = _parse(_TABLE)

SET_NAMES = {"strongreject": "StrongREJECT", "harmbench": "HarmBench", "gsm8k": "GSM8K", "math500": "MATH-500",
             "arc-easy": "ARC-Easy", "arc-challenge": "ARC-Challenge", "humaneval": "HumanEval", "mbpp": "MBPP"}

_RATE_LIKE = Metric("(a measure ending in rate)", None, "proportion", "share", "{set} {measure}", "")


def _matches(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(rest, parts[i:]) for i in range(0, len(parts) - len(rest) + 1))
    if not parts:
        return False
    return (head == "*" or head == parts[0]) and _matches(rest, parts[1:])


def lookup(name: str) -> Metric | None:
    """The entry of metric `name`; None for a name no entry knows and that is no rate."""
    parts = name.split(".")
    for metric in METRICS:
        if _matches(metric.pattern.split("."), parts):
            return metric
    return _RATE_LIKE if parts[-1].endswith("rate") else None


def higher_is_better(name: str) -> bool | None:
    metric = lookup(name)
    return None if metric is None else metric.higher_is_better


def lower_is_better(name: str) -> bool:
    """True only where the registry says lower is better (an unknown name: False)."""
    return higher_is_better(name) is False


def is_proportion(name: str) -> bool:
    metric = lookup(name)
    return metric is not None and metric.kind == "proportion"


def better_text(name: str) -> str:
    """The tables' "better" column: 'higher = safer', 'lower', ... ('' for an unknown name)."""
    metric = lookup(name)
    return "" if metric is None else metric.better


def label(name: str) -> str:
    """A reader's name for the metric: 'StrongREJECT refusal rate', 'GSM8K gold bits/byte', ..."""
    metric = lookup(name)
    parts = name.split(".")
    middle = parts[2:-1] if parts[:2] == ["safety", "over_refusal"] else parts[1:-1]
    shown = " ".join(SET_NAMES.get(p, p) for p in middle) or parts[0]
    if metric is None:
        return name
    return metric.label.format(set=shown, measure=parts[-1].replace("_", " "))
