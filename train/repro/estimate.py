"""The time a grid will take, from a per-step / per-item cost model, printed before anything runs.

cost(run) = steps x step cost of its method (LoRA or full, at the preset's batch size)
          + generated items x per-item generation cost + bits-per-byte and ARC items x their costs
          + code items (greedy and samples, with eval.execute_code) x the per-item cost of writing and
            running a program (code_item_s: hundreds of tokens, not a refusal's few dozen)
          + the matched-safety validation split's items, for the arms of a search
          + analysed modules x overlap cost per module and k (LoRA or dense update).
The unit costs are the preset's `cost` block, measured once on the reference machine and stated
there (`cost.measured` says how and where); they are not re-measured at run time. Without a cost
block there is no estimate, and the runner says so. After each run the runner also rescales the
remaining estimate by the ratio of measured to predicted time so far, so a slower or faster machine
is corrected as the grid goes.
"""
from __future__ import annotations

import math

from lora_core.train.repro.grid import Run


def eval_items(suite, execute_code: bool = False) -> dict:
    """Generated, code, bits-per-byte, ARC and drift item counts of one evaluation with `suite` (None sizes
    count as 0: the whole set is not a size this model knows; presets give explicit sizes). Code items
    count only when the evaluation runs code (otherwise the suite skips them)."""
    def n(v):
        return v or 0

    generated = (sum(n(v) for v in suite.safety.values()) + n(suite.over_refusal)
                 + sum(n(v) for v in suite.robustness.values()) + n(suite.jailbreak)
                 + sum(n(v) for v in suite.math_generation.values()) * (1 + suite.sampling.k))
    code = (n(suite.humaneval) + n(suite.mbpp)) * (1 + suite.sampling.k) if execute_code else 0
    return {"generated": generated, "code": code, "bpb": sum(n(v) for v in suite.bpb.values()),
            "arc": sum(n(v) for v in suite.arc.values()), "drift": n(suite.drift)}


def run_seconds(run: Run, steps: int | None, suite, cost: dict, modules: int, execute_code: bool = False,
                validation_items: int = 0) -> float:
    items = eval_items(suite, execute_code)
    seconds = ((items["generated"] + validation_items) * cost["generate_item_s"] + items["bpb"] * cost["bpb_item_s"]
               + items["arc"] * cost["arc_item_s"])
    if items["code"]:
        seconds += items["code"] * cost["code_item_s"]  # the preset check requires it when code runs
    if run.arm.kind != "base":
        seconds += items["drift"] * 2 * cost["bpb_item_s"]  # two forwards of a text: model and base
        # LoRA overlap works on r x r cores (~3 ms a module); a dense update needs a top-m SVD of
        # each dW (~0.15 s a module on smollm2-135m), so full fine-tuning and merges cost far more.
        per_module = cost.get("overlap_lora_module_s" if run.arm.kind == "lora" else "overlap_dense_module_s", 0.0)
        seconds += modules * per_module
    if run.arm.kind in ("lora", "full"):
        seconds += (steps or 0) * cost[f"{run.arm.kind}_step_s"]
    return seconds


def has_cost_model(cost: dict) -> bool:
    return all(k in cost for k in ("lora_step_s", "full_step_s", "generate_item_s", "bpb_item_s", "arc_item_s"))


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes = seconds / 60
    return f"{seconds:.0f} s" if seconds < 120 else f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"
