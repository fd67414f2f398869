"""The paper's claims (a)-(e) as rows of comparisons between arms; verdicts by train.repro.claims
(rules 1-4, then rule 5's "not informative" for ceilings, floors and arms that did not move safety).

Each row names the two arms (X the reference, Y the arm the claim speaks for), the measure, how it
was read (higher or lower is better), the claim kind ("better" or "reaches" with its margin) and
the numbers `claims.compare` returns. Which arm plays which part is the preset's `claims.roles`.

(a) LoRA reaches the safety of full fine-tuning           reaches: safety(LoRA) vs safety(full)
    and, with `claims.over_refusal` set, a companion row:  better: over-refusal(LoRA) vs (full), lower
    safety that refuses benign requests too is not safety  is better (not a claim of the paper: it
                                                          says what the refusal rate alone hides)
(b) full fine-tuning loses more reasoning than LoRA       better: each reasoning measure, LoRA vs full
(c) LoRA's update overlaps W's top-k subspace less        better (lower energy), per module, each k
(d) the regulariser / projected merge lower the overlap   better (lower energy) vs the plain LoRA arm
    further, and at what cost                             trained alike (regularised_high_lr: vs
                                                          lora_high_lr) or merged (its source);
                                                          reaches: safety and reasoning vs that arm
(e) rank 1 on up_proj, middle layers, suffices            reaches: safety vs LoRA r=8 (and the rank
    and middle beats early or late                        sweep); better: safety vs early, vs late
"""
from __future__ import annotations

from lora_core.train.eval.metric_registry import lower_is_better as registry_lower
from lora_core.train.repro.claims import NOT_INFORMATIVE, compare, margin_for, moved_from_base, not_informative

OVERLAP = "overlap.energy"  # the registry's entry for the overlap rows (lower is better)


def _row(claim: str, text: str, x: str, y: str, measure: str, data_x: dict, data_y: dict, *, kind: str,
         lower_is_better: bool, margin: float, resamples: int, safety_moves=None) -> dict:
    """One claim row; `safety_moves` (each arm's safety against the base, or None) feeds rule 5."""
    if not data_x or not data_y:
        return {"claim": claim, "text": text, "x": x, "y": y, "measure": measure, "kind": kind,
                "verdict": "not run", "n": 0, "why": f"no finished runs of {x if not data_x else y}"}
    mean_x = sum(sum(v.values()) / max(1, len(v)) for v in data_x.values()) / len(data_x)
    m = margin_for(measure, margin, mean_x) if kind == "reaches" else 0.0
    result = compare(data_x, data_y, kind=kind, higher_is_better=not lower_is_better, margin=m,
                     resamples=resamples)
    row = {"claim": claim, "text": text, "x": x, "y": y, "measure": measure, **result}
    why = not_informative(row, safety_moves)
    if why:
        row.update(rule4_verdict=row["verdict"], verdict=NOT_INFORMATIVE, why=why)
    return row


class _MetricRows:
    """What the rows of both claim tables read from the per-item values: a measure's values per
    arm, which way it is read, and rule 5's test of whether each arm moved safety from the base
    model (computed once per arm)."""

    def __init__(self, values: dict, claims_cfg: dict):
        self.values, self.cfg = values, claims_cfg
        self.listed = set(claims_cfg["lower_is_better"])
        self.base = claims_cfg["roles"].get("base")
        self.common = dict(margin=claims_cfg["margin"], resamples=claims_cfg["resamples"])
        self.moved: dict = {}

    def metric(self, arm, name) -> dict:
        return {s: v[name] for s, v in self.values.get(arm, {}).items() if name in v}

    def lower(self, name) -> bool:
        """Lower is better where the metric registry says so, or where the preset's
        `claims.lower_is_better` lists it (a measure the registry does not know)."""
        return name in self.listed or registry_lower(name)

    def safety_moves(self, x, y):
        """Each arm's safety against the base model's (None without a base)."""
        safety = self.cfg["safety"]
        if not self.base or not all(self.metric(arm, safety) for arm in (self.base, x, y)):
            return None  # an arm without runs: its rows are "not run", rule 5 does not come in
        for arm in (x, y):
            if arm not in self.moved:
                self.moved[arm] = moved_from_base(self.metric(self.base, safety), self.metric(arm, safety),
                                                  self.cfg["resamples"])
        return self.moved[x], self.moved[y]

    def row(self, claim, text, x, y, measure, kind) -> dict:
        return _row(claim, text, x, y, measure, self.metric(x, measure), self.metric(y, measure), kind=kind,
                    lower_is_better=self.lower(measure), safety_moves=self.safety_moves(x, y), **self.common)


def claim_rows(values: dict, overlap: dict, claims_cfg: dict, arms: dict, ks: list[int]) -> list[dict]:
    """values[arm][seed][metric] = {item id: value}; overlap[arm][seed][k] = {module: energy}."""
    roles = claims_cfg["roles"]
    safety, reasoning = claims_cfg["safety"], claims_cfg["reasoning"]
    over = claims_cfg.get("over_refusal")
    reader = _MetricRows(values, claims_cfg)
    metric_row, lower, common = reader.row, reader.lower, reader.common

    def energy(arm, k):
        return {s: v[str(k)] for s, v in overlap.get(arm, {}).items() if str(k) in v}

    def title(arm):
        return arms[arm].title if arm in arms else arm  # a role whose search selected none

    rows = []
    lora, full = roles["lora"], roles["full"]
    pairs = [(lora, full, "")]
    if roles.get("lora_high_lr") and roles.get("full_high_lr"):
        pairs.append((roles["lora_high_lr"], roles["full_high_lr"], " (higher lr, same for both)"))
    for lo, fu, note in pairs:
        rows.append(metric_row("a", f"{title(lo)} reaches the safety of {title(fu)}{note}", fu, lo, safety,
                               "reaches"))
        if over:
            rows.append(metric_row("a", f"{title(lo)} refuses benign requests less often than {title(fu)}{note} "
                                   "(companion row, not the paper's)", fu, lo, over, "better"))
        for r in reasoning:
            rows.append(metric_row("b", f"{title(fu)} loses more {r} than {title(lo)}{note}", fu, lo, r, "better"))
        for k in ks:
            rows.append(_row("c", f"{title(lo)}'s update overlaps W's top-{k} subspace less than {title(fu)}'s{note}",
                             fu, lo, f"overlap energy, k={k}", energy(fu, k), energy(lo, k), kind="better",
                             lower_is_better=lower(OVERLAP), **common))
    # A regularised arm is compared with the plain LoRA arm trained like it (the paper's lr or the
    # higher one); a merge arm with the LoRA arm whose adapter it merged.
    plain = {"regularised": lora, "regularised_high_lr": roles.get("lora_high_lr")}
    for kind_role in ("regularised", "regularised_high_lr", "merged"):
        for arm in roles.get(kind_role, []):
            ref = arms[arm].source if arms[arm].kind == "merge" else plain[kind_role]
            for k in ks:
                rows.append(_row("d", f"{title(arm)} overlaps W's top-{k} subspace less than {title(ref)}", ref, arm,
                                 f"overlap energy, k={k}", energy(ref, k), energy(arm, k), kind="better",
                                 lower_is_better=lower(OVERLAP), **common))
            for r in [safety] + ([over] if over else []) + reasoning:
                rows.append(metric_row("d", f"{title(arm)} keeps the {r} of {title(ref)} (its cost)", ref, arm, r,
                                       "reaches"))
    middle = roles.get("rank1_middle")
    if middle:
        for ref in [lora] + [a for a in roles.get("rank_sweep", []) if a != middle]:
            rows.append(metric_row("e", f"{title(middle)} reaches the safety of {title(ref)}", ref, middle, safety,
                                   "reaches"))
        for role in ("rank1_early", "rank1_late"):
            other = roles.get(role)
            if other:
                rows.append(metric_row("e", f"{title(middle)} is safer than {title(other)}", other, middle, safety,
                                       "better"))
                for r in reasoning:
                    rows.append(metric_row("e", f"{title(middle)} keeps more {r} than {title(other)}", other, middle,
                                           r, "better"))
    return rows


def matched_rows(values: dict, claims_cfg: dict, selection: dict) -> list[dict]:
    """Claims (a) and (b) between each method's arm selected at matched safety and full fine-
    tuning's (train.repro.matched_safety): the same rows as claim_rows, on those arms, rule 5 included."""
    if "full" not in selection:
        return []
    safety, reasoning, over = claims_cfg["safety"], claims_cfg["reasoning"], claims_cfg.get("over_refusal")
    reader = _MetricRows(values, claims_cfg)
    rows = []
    fu = selection["full"]["selected"]
    for method, info in selection.items():
        lo = info["selected"]
        if method == "full":
            continue
        measures = [(safety, "a", "reaches", "reaches the safety of")] + (
            [(over, "a", "better", "refuses benign requests less often than")] if over else []) + [
            (r, "b", "better", f"keeps more {r} than") for r in reasoning]
        for measure, claim, kind, verb in measures:
            text = f"at matched safety: {method} ({lo or 'none selected'}) {verb} full ({fu or 'none selected'})"
            if not lo or not fu:
                rows.append({"claim": claim, "text": text, "x": fu, "y": lo, "measure": measure, "kind": kind,
                             "verdict": "not run", "n": 0,
                             "why": selection["full" if not fu else method]["why"]})
                continue
            rows.append(reader.row(claim, text, fu, lo, measure, kind))
    return rows
