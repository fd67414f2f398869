"""Which arms each paper claim compares: the roles of a preset mapped to rows of the claims table."""
import pytest

from lora_core.train.repro.paper_claims import claim_rows
from lora_core.train.repro.preset import Arm

SAFETY, BPB = "safety.strongreject.refusal_rate", "reasoning.gsm8k.bpb"


def _values(refusals: list[int], bpb: list[float]) -> dict:
    return {0: {SAFETY: {f"s{i}": float(v) for i, v in enumerate(refusals)},
                BPB: {f"g{i}": v for i, v in enumerate(bpb)}}}


def test_regularised_arms_are_compared_with_the_plain_lora_arm_of_their_own_rate():
    arms = {n: Arm(n, kind) for n, kind in [("base", "base"), ("full", "full"), ("lora", "lora"),
                                            ("full-hi", "full"), ("lora-hi", "lora"),
                                            ("reg", "lora"), ("reg-hi", "lora")]}
    arms["merge-hi"] = Arm("merge-hi", "merge", source="lora-hi", projection="column", k=2)
    values = {name: _values([1, 0, 1, 0], [0.5, 0.6, 0.7, 0.8]) for name in arms}
    overlap = {name: {0: {"2": {"m1": 0.1, "m2": 0.2}}} for name in arms if name != "base"}
    cfg = {"safety": SAFETY, "reasoning": [BPB], "lower_is_better": [BPB], "margin": 0.1, "resamples": 200,
           "roles": {"base": "base", "lora": "lora", "full": "full", "lora_high_lr": "lora-hi",
                     "full_high_lr": "full-hi", "regularised": ["reg"], "regularised_high_lr": ["reg-hi"],
                     "merged": ["merge-hi"]}}
    rows = claim_rows(values, overlap, cfg, arms, [2])
    reference = {row["y"]: row["x"] for row in rows if row["claim"] == "d"}
    assert reference == {"reg": "lora", "reg-hi": "lora-hi", "merge-hi": "lora-hi"}
    pairs = {(row["x"], row["y"]) for row in rows if row["claim"] in "abc"}
    assert pairs == {("full", "lora"), ("full-hi", "lora-hi")}


def test_the_over_refusal_companion_row_reads_lower_as_better():
    arms = {n: Arm(n, kind) for n, kind in [("base", "base"), ("full", "full"), ("lora", "lora")]}
    over = "safety.over_refusal.rate"
    values = {"base": {0: {over: {f"b{i}": 0.0 for i in range(40)}}},
              "full": {0: {over: {f"b{i}": 1.0 for i in range(40)}}},  # refuses every benign request
              "lora": {0: {over: {f"b{i}": float(i < 4) for i in range(40)}}}}
    cfg = {"safety": SAFETY, "over_refusal": over, "reasoning": [], "lower_is_better": [over], "margin": 0.1,
           "resamples": 200, "roles": {"base": "base", "lora": "lora", "full": "full"}}
    (row,) = [r for r in claim_rows(values, {}, cfg, arms, []) if r["measure"] == over]
    assert (row["x"], row["y"], row["kind"]) == ("full", "lora", "better")
    assert row["oriented_difference"] == pytest.approx(0.9) and row["verdict"] == "supported"
