"""The runs of a preset: one per arm and seed, in an order that puts every merge after its source,
each with its run directory and (for trained arms) the TrainConfig it trains with.

`early` / `middle` / `late` layers are thirds of the model's depth: layer i of L is in third
floor(3 i / L). The paper's flagship range, layers 16-31 of a 48-layer model, is exactly its middle
third (16 = 48/3, 31 = 2*48/3 - 1), so "middle" is that range mapped to any depth; on the 30
layers of smollm2-135m it is 10-19.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lora_core.train.eval.suites import SUITES
from lora_core.train.repro.preset import Arm, Preset
from lora_core.train.sft.config import LORA_ONLY_KEYS, TrainConfig

THIRDS = ("early", "middle", "late")


def layer_third(name: str, num_layers: int) -> str:
    """"a-b" (inclusive) of the named third of `num_layers` layers."""
    if num_layers < 3:
        raise ValueError(f"layers {name!r}: a model of {num_layers} layer(s) has no thirds")
    part = THIRDS.index(name)
    layers = [i for i in range(num_layers) if (3 * i) // num_layers == part]
    return f"{layers[0]}-{layers[-1]}"


@dataclass(frozen=True)
class Run:
    arm: Arm
    seed: int
    run_dir: Path  # relative to the grid's output folder

    @property
    def key(self) -> str:
        return self.arm.name if self.arm.kind == "base" else f"{self.arm.name}/seed-{self.seed}"


def _stage(arm: Arm) -> int:
    """0 base, 1 trained arms, 2 arms whose lr a matched-safety search sets (they wait for the
    searches), 3 merges (they read an adapter; a merge of a stage-2 arm comes after it too)."""
    if arm.kind == "base":
        return 0
    if arm.kind == "merge":
        return 3
    return 2 if arm.matched_lr else 1


def expand(preset: Preset) -> list[Run]:
    """Every (arm, seed) once, by stage (`_stage`), in file order within a stage."""
    arms = sorted(preset.arms, key=_stage)  # stable
    runs = []
    for arm in arms:
        for seed in preset.seeds_of(arm):
            where = Path("runs") / arm.name if arm.kind == "base" else Path("runs") / arm.name / f"seed-{seed}"
            runs.append(Run(arm, seed, where))
    return runs


def planning_arm(arm: Arm) -> Arm:
    """`arm` with a matched lr dropped (the shared lr stands in): for counting steps and modules
    before the searches have selected anything; never for training."""
    if not arm.matched_lr:
        return arm
    return dataclasses.replace(arm, train={k: v for k, v in arm.train.items() if k != "lr"})


def train_config(preset: Preset, run: Run, run_dir: Path, num_layers: int | None = None,
                 matched_lrs: dict | None = None) -> TrainConfig:
    """The TrainConfig of a lora or full run: shared `train` block, then the arm's overrides,
    epochs by kind, the run's seed and directory; `layers: middle` resolved against the depth;
    `lr: matched:<method>` from `matched_lrs` (method -> the lr its search selected).

    The shared block speaks for every trained arm, so its LoRA-only keys (alpha, dropout, ...)
    apply to LoRA arms alone; an arm's own block may not hold them on a full arm (the preset check
    refuses them by name)."""
    arm = run.arm
    if arm.kind not in ("lora", "full"):
        raise ValueError(f"arm {arm.name!r} ({arm.kind}) trains nothing")
    shared = {k: v for k, v in preset.train.items() if arm.kind == "lora" or k not in LORA_ONLY_KEYS}
    fields = {**shared, **arm.train}
    if arm.matched_lr:
        if not matched_lrs or matched_lrs.get(arm.matched_lr) is None:
            raise LookupError(f"arm {arm.name!r} trains at the lr the {arm.matched_lr!r} search selects at matched "
                              "safety, and that search has selected none")
        fields["lr"] = matched_lrs[arm.matched_lr]
    if fields.get("layers") in THIRDS:
        if num_layers is None:
            raise ValueError(f"arm {arm.name!r}: layers {fields['layers']!r} needs the model's depth")
        fields["layers"] = layer_third(fields["layers"], num_layers)
    # progress off: the grid shows its own progress, and a bar per run would bury it.
    return TrainConfig.from_flat(model=preset.model, method=arm.kind, epochs=preset.epochs[arm.kind], seed=run.seed,
                                 out=str(run_dir / "train"), progress=False, dataset=preset.data["dataset"],
                                 limit=preset.data["limit"], reasoning_line=preset.data["reasoning_line"], **fields)


def suite_of(preset: Preset):
    """The one SuiteConfig every arm is evaluated with (same items: same sizes and seed)."""
    cfg = dataclasses.replace(SUITES[preset.eval["suite"]], **preset.eval["overrides"])
    return dataclasses.replace(cfg, seed=preset.eval["seed"])
