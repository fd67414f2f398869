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


def _three_arms(base: list[int], full: list[int], lora: list[int]) -> tuple[dict, dict, dict]:
    arms = {n: Arm(n, kind) for n, kind in [("base", "base"), ("full", "full"), ("lora", "lora")]}
    values = {name: {0: {SAFETY: {f"s{i}": float(v) for i, v in enumerate(flags)}}}
              for name, flags in (("base", base), ("full", full), ("lora", lora))}
    cfg = {"safety": SAFETY, "reasoning": [], "lower_is_better": [], "margin": 0.1, "resamples": 500,
           "roles": {"base": "base", "lora": "lora", "full": "full"}}
    return arms, values, cfg


def _safety_row(arms, values, cfg) -> dict:
    (row,) = [r for r in claim_rows(values, {}, cfg, arms, []) if r["claim"] == "a"]
    return row


def test_both_arms_at_the_ceiling_is_not_informative_not_supported():
    """Both methods refuse all 40 prompts: rule 4 alone would call "LoRA reaches full's safety"
    supported, but two arms at 1.000 cannot differ."""
    arms, values, cfg = _three_arms([int(i < 8) for i in range(40)], [1] * 40, [1] * 40)
    row = _safety_row(arms, values, cfg)
    assert row["rule4_verdict"] == "supported"
    assert row["verdict"] == "not informative" and "both arms at 1.000 (ceiling)" in row["why"]


def test_arms_that_did_not_move_safety_from_the_base_are_not_informative():
    """Neither arm's refusals differ from the base model's (two flips), and the arms agree: rule 4
    alone calls LoRA's safety equal to full fine-tuning's, but neither was aligned."""
    base = [int(i % 3 == 0) for i in range(40)]
    trained = [1 - b if i in (1, 2) else b for i, b in enumerate(base)]
    arms, values, cfg = _three_arms(base, trained, list(trained))
    row = _safety_row(arms, values, cfg)
    assert row["rule4_verdict"] == "supported"
    assert row["verdict"] == "not informative" and "neither arm moved safety" in row["why"]


def test_a_real_difference_keeps_its_verdict():
    """Full fine-tuning moved safety (0.1 -> 0.9), LoRA too (-> 0.85): rule 5 leaves rule 4's verdict."""
    arms, values, cfg = _three_arms([int(i < 4) for i in range(40)], [int(i < 36) for i in range(40)],
                                    [int(i < 34) for i in range(40)])
    row = _safety_row(arms, values, cfg)
    assert "rule4_verdict" not in row and row["verdict"] in ("supported", "inconclusive at this n")
    assert "why" not in row
