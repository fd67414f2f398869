"""The grid runner behind `lora-core reproduce`: estimate, run every arm x seed, report.

Resumable: a run with its done.json is skipped, an unfinished one continues where it stopped
(train.repro.run_one), so the same command after a kill (or after adding seeds) does only what is
missing. The base model is loaded once and evaluated once; every arm is evaluated with the same
suite and item list (train.repro.grid.suite_of); the training examples are built once, so every
arm and seed trains on the same data.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from lora_core.common.files import atomic_write_json, read_json
from lora_core.models import load_model
from lora_core.svd_cache import SVDCache
from lora_core.train.repro.estimate import fmt_duration, has_cost_model, run_seconds
from lora_core.train.repro.grid import Run, expand, planning_arm, suite_of, train_config
from lora_core.train.repro.matched_safety import (collect_validation, safety_set, select, selected_lrs,
                                                  validation_records)
from lora_core.train.repro.preset import Preset, matched_method
from lora_core.train.repro.report import write_report
from lora_core.train.repro.run_one import GridContext, is_done, run_one
from lora_core.train.sft.config import TrainConfig
from lora_core.train.sft.examples import build_examples
from lora_core.train.sft.schedule import total_steps_of
from lora_core.train.sft.targets import parse_layers, resolve_targets
from lora_core.train.sft.tensorboard_log import summary_writer_class


def _default_load(name: str):
    return load_model(name, dtype=torch.float32)


def _modules_of(ctx: GridContext, run: Run) -> int:
    """How many weights the overlap analysis decomposes for this run (for the estimate)."""
    arm = run.arm
    if arm.kind == "base":
        return 0
    if arm.kind == "merge":
        # A search's selection is not known yet: its first arm stands in (a search shares targets).
        method = matched_method(arm.source)
        arm = ctx.preset.arm(ctx.preset.claims["matched_safety"]["search"][method][0] if method else arm.source)
    if arm.kind == "full":
        return 7 * ctx.num_layers
    cfg = train_config(ctx.preset, Run(planning_arm(arm), run.seed, run.run_dir), ctx.out, ctx.num_layers)
    layers = parse_layers(cfg.lora.layers)
    return len(resolve_targets(cfg.lora.targets)) * (len(layers) if layers else ctx.num_layers)


def _steps_of(ctx: GridContext, run: Run) -> int | None:
    if run.arm.kind not in ("lora", "full"):
        return None
    planned = Run(planning_arm(run.arm), run.seed, run.run_dir)
    return total_steps_of(train_config(ctx.preset, planned, ctx.out, ctx.num_layers), len(ctx.examples))


def plan(ctx: GridContext, runs: list[Run]) -> list[dict]:
    """Per run: steps, overlap modules and predicted seconds (None without a cost model)."""
    cost = ctx.preset.cost
    rows = []
    for run in runs:
        steps, modules = _steps_of(ctx, run), _modules_of(ctx, run)
        modules_k = modules * len(ctx.preset.overlap["k"])
        validation = len(ctx.validation or ()) if run.arm.name in ctx.search_arms else 0
        predicted = (run_seconds(run, steps, ctx.suite, cost, modules_k, ctx.preset.eval.get("execute_code", False),
                                 validation) if has_cost_model(cost) else None)
        rows.append({"key": run.key, "steps": steps, "modules": modules, "predicted_s": predicted,
                     "done": is_done(ctx, run)})
    return rows


def _print_estimate(ctx: GridContext, rows: list[dict], log) -> float | None:
    pending = [r for r in rows if not r["done"]]
    log(f"grid: {len(rows)} runs ({len(rows) - len(pending)} already done), "
        f"{sum(r['steps'] or 0 for r in pending)} training steps to go")
    if not has_cost_model(ctx.preset.cost):
        log("estimate: none (the preset has no cost block)")
        return None
    total = sum(r["predicted_s"] for r in pending) + ctx.preset.cost.get("load_s", 0.0)
    log(f"estimate: about {fmt_duration(total)} for the {len(pending)} runs to go, from the unit costs in "
        f"the preset ({ctx.preset.cost.get('measured', 'no note on how they were measured')})")
    return total


def build_context(preset: Preset, out: Path, load=None, log=print, tensorboard: bool = False) -> GridContext:
    model, tokenizer = (load or _default_load)(preset.model)
    data = preset.data
    # One set of examples for the whole grid (data seed fixed): arms differ only in how they train.
    spec = TrainConfig.from_flat(model=preset.model, dataset=data["dataset"], limit=data["limit"], seed=data["seed"],
                                 reasoning_line=data["reasoning_line"])
    examples, info = build_examples(spec, tokenizer)
    suite = suite_of(preset)
    validation, search_arms = None, frozenset()
    matched = preset.claims.get("matched_safety")
    if matched:
        name = safety_set(preset.claims["safety"])
        validation = validation_records(name, suite.safety.get(name), suite.seed, matched["validation_n"],
                                        matched["validation_seed"])
        search_arms = frozenset(a for arms in matched["search"].values() for a in arms)
    return GridContext(preset=preset, out=out, base_model=model.eval(), tokenizer=tokenizer,
                       examples=examples, data_info=info, suite=suite, cache=SVDCache(), log=log,
                       tensorboard=tensorboard, validation=validation, search_arms=search_arms)


def reproduce(preset: Preset, out: str | Path, *, load=None, log=print, estimate_only: bool = False,
              tensorboard: bool = False) -> dict:
    """Run (or finish) the grid of `preset` in `out`, then write the report; returns the report.

    `load(name) -> (model, tokenizer)` replaces the model registry (tests pass a tiny model).
    `tensorboard`: also write TensorBoard events (train.repro.tensorboard_grid).
    """
    t_start = time.perf_counter()  # the wall time includes loading the model and the data
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if tensorboard:
        summary_writer_class()  # a missing package is reported now, not after an hour of training
    ctx = build_context(preset, out, load=load, log=log, tensorboard=tensorboard)
    runs = expand(preset)
    rows = plan(ctx, runs)
    predicted_total = _print_estimate(ctx, rows, log)
    if estimate_only:
        return {"plan": rows, "predicted_s": predicted_total}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "preset.json", {**preset.to_dict(), "plan": rows})
    with _Invocation(out, sum(not r["done"] for r in rows), t_start) as invocation:
        _run_grid(ctx, runs, rows, predicted_total, t_start, log, invocation)
    log(f"grid finished in {fmt_duration(time.perf_counter() - t_start)}; writing the report")
    return write_report(ctx, runs, wall_seconds=time.perf_counter() - t_start)


def _run_grid(ctx: GridContext, runs: list[Run], rows: list[dict], predicted_total, t_start: float, log,
              invocation: "_Invocation") -> None:
    spent, predicted_spent = 0.0, 0.0
    for i, (run, row) in enumerate(zip(runs, rows), 1):
        if row["done"]:
            log(f"[{i}/{len(runs)}] {run.key}: done before, skipped")
            continue
        why = _waits_for_a_search(ctx, runs, run)
        if why:
            log(f"[{i}/{len(runs)}] {run.key}: not run ({why})")
            continue
        remaining = sum(r["predicted_s"] or 0 for r in rows[i - 1:] if not r["done"])
        if predicted_spent > 0:
            remaining *= spent / predicted_spent  # this machine's speed, as measured so far
        log(f"[{i}/{len(runs)}] {run.key} ({run.arm.kind}); elapsed {fmt_duration(time.perf_counter() - t_start)}"
            + (f", about {fmt_duration(remaining)} to go" if predicted_total is not None else ""))
        t = time.perf_counter()
        run_one(ctx, run)
        row["done"] = True
        invocation.finished += 1
        spent += time.perf_counter() - t
        predicted_spent += row["predicted_s"] or 0.0


def _waits_for_a_search(ctx: GridContext, runs: list[Run], run: Run) -> str | None:
    """Why a run that a matched-safety search sets (its lr, or the adapter it merges) cannot run
    because the search selected no arm, or None; fills ctx.matched_lrs and ctx.matched_arms from
    the finished searches' validation files first."""
    method = matched_method(run.arm.source) if run.arm.kind == "merge" else None
    if method is None:
        arm = run.arm if run.arm.kind != "merge" else ctx.preset.arm(run.arm.source)
        method = arm.matched_lr
    if not method:
        return None
    matched = ctx.preset.claims["matched_safety"]
    selection = select(matched["search"], collect_validation(ctx.out, runs), matched["target"])
    ctx.matched_arms = {m: info["selected"] for m, info in selection.items()}
    ctx.matched_lrs = selected_lrs(selection, lambda name: train_config(
        ctx.preset, Run(ctx.preset.arm(name), 0, Path("runs") / name), ctx.out, ctx.num_layers).optim.lr)
    if ctx.matched_arms.get(method) is None:
        return f"it takes the arm the {method!r} search selects: {selection[method]['why']}"
    return None


class _Invocation:
    """One `reproduce` of this grid, appended to <out>/invocations.json when it ends (finished,
    interrupted or failed), so the report can give the grid's wall time over every invocation."""

    def __init__(self, out: Path, pending: int, t_start: float):
        self.path, self.pending, self.t_start, self.finished = out / "invocations.json", pending, t_start, 0
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        # Read now: a damaged file is reported before an hour of runs, not after them.
        self.history = read_json(self.path) if self.path.is_file() else []
        if not isinstance(self.history, list):
            raise ValueError(f"{self.path} is not a list of invocations; remove it to start its record afresh")

    def __enter__(self) -> "_Invocation":
        return self

    def __exit__(self, kind, error, tb) -> None:
        history = self.history
        outcome = "finished" if kind is None else "interrupted" if issubclass(kind, KeyboardInterrupt) else "failed"
        history.append({"started": self.started, "wall_seconds": time.perf_counter() - self.t_start,
                        "runs_pending": self.pending, "runs_finished": self.finished, "outcome": outcome})
        atomic_write_json(self.path, history)
