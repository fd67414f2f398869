"""The main job (`lora-core demo`): base vs LoRA-aligned model, one table.

pull the default model and data -> evaluate the base model (quick suite) -> train a LoRA refusal
adapter on AdvBench prompts (disjoint from the StrongREJECT/HarmBench evaluation prompts) ->
evaluate again, with KL drift measured against the same weights with the adapter switched off ->
demo.json + demo.md + demo.png in the run directory, and the table on stdout.

Defaults for a 135M model on 2 CPU cores (the paper's recipe is for 7B+ models on GPUs; every
default can be changed with a flag, and `--retain-beta 0` gives the refusal-only recipe):
- lr 1e-3 instead of 5e-5: the paper's rate moves a rank-8 adapter on a 135M model too little in a
  few hundred steps to change its behaviour.
- 24 steps of batch 8 instead of 10 epochs of batch 2: the refusal templates are learnt within a
  fraction of an epoch, and every extra step costs CPU time the demo's 10 minutes do not have.
- a retain term (not in the paper; `lora-core train` has it off): loss += beta * mean per-token
  KL(base || adapted) on benign prompts answered by the base model itself (train.sft.retain_set,
  source "diverse", targets "self"). Trained on refusals alone, this model learns "always refuse".
  The retain prompts span the kinds of request people make (writing, how-to, recipes, advice,
  code, small talk, sensitive-looking but legitimate requests, facts, science, medicine, and
  MATH problems outside MATH-500), because the KL protects only what it sees: a GSM8K-only retain
  set kept math answered while every everyday request was refused. None of them is in any
  evaluation set. beta 4 with 8
  retain prompts per step: of the recipes measured (README), the one that keeps StrongREJECT
  refusal >= 0.80 with the least over-refusal; none reached over-refusal <= 0.10.
- rank 8 on q,k,v,o,gate,up,down (the paper's attn+mlp preset), alpha 16, dropout 0.05, cosine, no
  warm-up, weight decay 1e-4: as the paper.
Measured figures, and the refusal-only run beside this recipe, are in the README.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from lora_core import AdaptersOff
from lora_core.common.files import atomic_write_json, atomic_write_text
from lora_core.models import load_model
from lora_core.train.demo_report import build_table, plot_table, table_markdown
from lora_core.train.eval.runner import evaluate
from lora_core.train.sft.config import TrainConfig
from lora_core.train.sft.loop import prepare_run

# The demo's recipe: the TrainConfig keys it sets otherwise than `lora-core train` does (the module
# docstring says why). Short retain sequences (128 tokens) keep the KL on the opening of the
# answer, where a refusal starts, and the step cheap; no checkpoint before the end.
DEMO_RECIPE = {"lr": 1e-3, "max_steps": 24, "batch_size": 8, "retain_beta": 4.0, "retain_per_step": 8,
               "retain_max_length": 128, "retain_limit": 128, "save_every": 0}
_SPEC_DEFAULTS = TrainConfig().to_dict()


def _knob(key: str, **metadata):
    """A demo flag that is TrainConfig's `key`: the recipe's value, else the trainer's default."""
    return field(default=DEMO_RECIPE.get(key, _SPEC_DEFAULTS[key]), metadata=metadata)


@dataclass
class DemoConfig:
    """The demo as a preset over the run spec: where it writes and what it evaluates, plus the
    TrainConfig keys a user may change (same names, the recipe's values as defaults; help and
    choices come from TrainConfig's fields, see train.cli.demo)."""

    model: str = _knob("model")
    out: str = field(default="runs/demo", metadata={
        "help": "run directory (default %(default)s; must be new or empty)"})
    max_steps: int = _knob("max_steps", flags=("--steps",), help="optimiser steps (default %(default)s)")
    lr: float = _knob("lr", help="learning rate (default %(default)s; see train/demo.py for why not 5e-5)")
    rank: int = _knob("rank")
    targets: str = _knob("targets")
    layers: str | None = _knob("layers")
    batch_size: int = _knob("batch_size")
    dtype: str = _knob("dtype")
    device: str = field(default="cpu", metadata={"cli": False})  # set from --device (train/cli/_device.py)
    suite: str = field(default="quick", metadata={"help": "evaluation suite (default %(default)s)"})
    eval_limit: int | None = field(default=None, metadata={"help": "cap every evaluation subset"})
    seed: int = _knob("seed")
    progress: bool | None = field(default=None, metadata={"cli": False})
    retain_beta: float = _knob("retain_beta", help="weight of the retain KL on benign prompts (default "
                               "%(default)s; 0 = refusal data only, as the paper; see train/demo.py)")
    retain_per_step: int = _knob("retain_per_step")
    retain_data: str = _knob("retain_data", help="'diverse' (everyday benign requests of many topics + MATH "
                             "problems outside MATH-500, none in any evaluation set), 'gsm8k', or a JSONL/CSV "
                             "of prompts (default %(default)s)")
    retain_targets: str = _knob("retain_targets", help="'self': the base model's own answers; 'gold': the "
                                "set's answers (default %(default)s)")
    train_overrides: dict = field(default_factory=dict, metadata={"cli": False})  # more TrainConfig keys


def demo_spec(cfg: DemoConfig) -> TrainConfig:
    """The run spec the demo trains with: the recipe, the user's knobs, and what follows from the
    demo's other settings (its run folder, the evaluation whose GSM8K items the retain set avoids)."""
    knobs = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in _SPEC_DEFAULTS}
    return TrainConfig.from_flat(**{
        **DEMO_RECIPE, **knobs, "method": "lora", "out": str(Path(cfg.out) / "train"), "progress": cfg.progress,
        "retain_exclude_suite": cfg.suite, "retain_exclude_limit": cfg.eval_limit, "retain_exclude_seed": cfg.seed,
        **cfg.train_overrides})


def run_demo(cfg: DemoConfig, log=print) -> dict:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; choose another run directory")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} already exists and is not empty; choose another run directory")
    out.mkdir(parents=True, exist_ok=True)
    log(f"[1/4] loading {cfg.model} (pulled on first use)")
    # Straight into the dtype it trains in: a bf16 run keeps its frozen base in bf16 (no fp32 copy).
    model, tokenizer = load_model(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)
    eval_kw = dict(suite=cfg.suite, limit=cfg.eval_limit, progress=cfg.progress, seed=cfg.seed)
    log(f"[2/4] evaluating the base model ({cfg.suite} suite)")
    t = time.perf_counter()
    base = evaluate(model, tokenizer, out_dir=out / "eval-base", meta={"model": cfg.model, "stage": "base"}, **eval_kw)
    eval_base_seconds = time.perf_counter() - t
    spec = demo_spec(cfg)
    log(f"[3/4] training a rank-{cfg.rank} LoRA adapter ({cfg.targets}) for {cfg.max_steps} steps, lr {cfg.lr}, "
        f"retain beta {cfg.retain_beta}")
    result = prepare_run(spec, model=model, tokenizer=tokenizer, log=log).run()
    log(f"      {result.steps} steps in {result.train_seconds:.0f} s, loss {result.losses[0]:.3f} -> "
        f"{result.losses[-1]:.3f}; adapter in {result.output_path}")
    log("[4/4] evaluating the aligned model")
    t = time.perf_counter()
    aligned = evaluate(model, tokenizer, base_model=AdaptersOff(model), out_dir=out / "eval-aligned",
                       meta={"model": cfg.model, "stage": "aligned", "adapter": str(result.output_path)}, **eval_kw)
    eval_aligned_seconds = time.perf_counter() - t
    table = build_table(base, aligned, result.train_seconds, {
        "eval_base_seconds": eval_base_seconds, "eval_aligned_seconds": eval_aligned_seconds,
        "total_seconds": time.perf_counter() - t_start, "train_steps": result.steps,
        "trainable_params": result.trainable_params, "final_loss": result.losses[-1],
        "data": result.provenance, "config": asdict(cfg), "threads": torch.get_num_threads()})
    markdown = table_markdown(table)
    atomic_write_json(out / "demo.json", table)
    atomic_write_text(out / "demo.md", "# lora-core demo: base vs LoRA-aligned\n\n" + markdown)
    plot_table(table, out / "demo.png")
    log("\n" + markdown)
    log(f"wrote {out / 'demo.md'}, {out / 'demo.json'}, {out / 'demo.png'}")
    return table
