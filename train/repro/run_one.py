"""One arm x seed of the grid, in its own run directory, resumable at every stage.

    <out>/runs/<arm>/seed-<s>/
        spec.json    what this run is (arm, seed, resolved TrainConfig, suite, overlap k): a rerun
                     whose preset changed this run is refused by name instead of mixing two setups
        train/       the SFT run (train.sft): config, metrics.jsonl, checkpoints/, adapter/ or model/
        merge.json   merge arms: the merge report (share of dW removed per module)
        validation.json  arms of a matched-safety search: refusals on the validation split
                     (train.repro.matched_safety), which selects among the search's arms
        eval/        results.json (+ .md, generations.jsonl) on the grid's one suite and item list
        overlap/     k-<k>.json / .md per k: dW against W's top-k subspace, per module
        done.json    written last, atomically: the completion marker a rerun skips on
    A full fine-tuning run's checkpoints/ (weights + optimiser moments) are deleted once done.json
    is written: model/ is what later stages read, and three seeds would otherwise keep ~5 GB.

Stages already on disk are not redone: a finished training run is loaded (adapter or model), an
interrupted one resumes from its newest checkpoint (train.sft's resume: losses repeat exactly), an
evaluation with results.json is read back. A Ctrl-C or SIGTERM during training loses nothing but
the step in flight, which is finished and checkpointed first (train.sft.graceful_stop); one during
evaluation or overlap loses that stage; a SIGKILL loses the work since the last checkpoint
(save_every steps).
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_core import AdaptersOff, load_adapter, merge_lora
from lora_core.common.files import atomic_write_json, read_json
from lora_core.overlap import analyse_adapter, analyse_update
from lora_core.overlap_report import write_json, write_markdown
from lora_core.train.eval.judges import KeywordRefusalJudge
from lora_core.train.eval.runner import evaluate
from lora_core.train.repro.grid import Run, train_config
from lora_core.train.repro.matched_safety import validation_rate
from lora_core.train.repro.preset import Preset, matched_method
from lora_core.train.sft.checkpoint import latest_checkpoint
from lora_core.train.sft.config import LEARNING_KEYS
from lora_core.train.sft.loop import prepare_run

DONE = "done.json"


@dataclass
class GridContext:
    """What every run of one grid shares: the base model (never modified), its weights, the
    training examples (built once, so every arm and seed trains on the same data), the suite and
    the SVD cache (each W decomposed once for all arms)."""

    preset: Preset
    out: Path
    base_model: torch.nn.Module
    tokenizer: object
    examples: list
    data_info: dict
    suite: object
    cache: object
    log: object = print
    base_state: dict = field(default_factory=dict)
    validation: list | None = None  # the matched-safety validation split's records, when the preset has one
    search_arms: frozenset = frozenset()  # arms of a matched-safety search (they get validation.json)
    matched_lrs: dict = field(default_factory=dict)  # method -> lr its search selected (runner fills it)
    matched_arms: dict = field(default_factory=dict)  # method -> arm its search selected (runner fills it)
    tensorboard: bool = False  # training curves as TensorBoard events too (reproduce --tensorboard)
    _eval_base: torch.nn.Module | None = field(default=None, init=False, repr=False)  # built on first use

    def __post_init__(self):
        if not self.base_state:
            self.base_state = {n: t.detach().clone() for n, t in self.base_model.state_dict().items()}

    @property
    def eval_dtype(self) -> torch.dtype:
        """The one precision every arm is evaluated in: the preset's training dtype (train.dtype)."""
        return getattr(torch, self.preset.train.get("dtype", "float32"))

    @property
    def eval_base(self) -> torch.nn.Module:
        """The base model in the evaluation dtype: the base arm, and the reference of KL drift for
        full and merged arms. base_model itself stays float32: full fine-tuning's master weights and
        the overlap's dW = W' - W start from it."""
        if self._eval_base is None:
            self._eval_base = self.base_model
            if self.eval_dtype != torch.float32:
                self._eval_base = copy.deepcopy(self.base_model).to(self.eval_dtype).eval()
        return self._eval_base

    @property
    def num_layers(self) -> int:
        return self.base_model.config.num_hidden_layers


def is_done(ctx: GridContext, run: Run) -> bool:
    return (ctx.out / run.run_dir / DONE).is_file()


def spec_of(ctx: GridContext, run: Run) -> dict:
    spec = {"arm": dataclasses.asdict(run.arm), "seed": run.seed, "model": ctx.preset.model,
            "suite": dataclasses.asdict(ctx.suite), "overlap": ctx.preset.overlap, "data": ctx.preset.data}
    if run.arm.kind == "merge" and matched_method(run.arm.source):
        spec["merges"] = merge_source(ctx, run.arm)  # a selection that changed is another run
    if run.arm.kind in ("lora", "full"):
        cfg = train_config(ctx.preset, run, ctx.out / run.run_dir, ctx.num_layers, ctx.matched_lrs).to_dict()
        # What the run learns from, alone: a rerun may change bookkeeping (checkpoint cadence,
        # TensorBoard) as `train --resume` may.
        spec["train"] = {k: v for k, v in cfg.items() if k in LEARNING_KEYS}
    return spec


def _check_spec(ctx: GridContext, run: Run, run_dir: Path) -> None:
    spec, path = spec_of(ctx, run), run_dir / "spec.json"
    if path.is_file():
        old = read_json(path)
        if old != spec:
            changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            raise ValueError(f"{path}: run {run.key} was started with other settings ({', '.join(changed)} "
                             "differ from the preset now); remove that folder to redo it, or use another --out")
    else:
        atomic_write_json(path, spec)


def _trained_model(ctx: GridContext, run: Run, run_dir: Path):
    """The model of a lora/full run: trained now, resumed, or loaded when training had finished."""
    model = copy.deepcopy(ctx.base_model)
    config = train_config(ctx.preset, run, run_dir, ctx.num_layers, ctx.matched_lrs)
    if ctx.tensorboard:
        config = config.replace(tensorboard=True)
    train_dir = Path(config.checkpoints.out)
    summary = train_dir / "summary.json"
    if summary.is_file():
        _load_output(model, train_dir / read_json(summary)["output"], run.arm.kind, ctx.preset.model)
        ctx.log(f"      training already finished: loaded {train_dir / read_json(summary)['output']}")
        return model, read_json(summary)
    resume = train_dir.is_dir() and latest_checkpoint(train_dir) is not None
    prepared = prepare_run(config, resume=resume, model=model, tokenizer=ctx.tokenizer, examples=ctx.examples,
                           data_info=ctx.data_info, log=lambda *a: ctx.log("      " + " ".join(map(str, a))))
    optim = prepared.config.optim
    ctx.log(f"      {'resuming' if resume else 'training'} {run.arm.kind}: {prepared.trainer.total_steps} steps "
            f"({optim.epochs:g} epochs of {len(ctx.examples)} examples, batch {optim.batch_size}, lr {optim.lr:g})")
    prepared.run()
    return model, read_json(summary)


def _load_output(model, path: Path, kind: str, model_name: str) -> None:
    if kind == "lora":
        load_adapter(model, path, base_model=model_name)
        return

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing = [n for n in model.state_dict() if n not in state and n != "lm_head.weight"]
    if missing:
        raise ValueError(f"{path}: the fine-tuned model lacks {missing[0]} (and {len(missing) - 1} more)")
    model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):  # load_state_dict copies into the embedding; re-tie to be sure
        model.tie_weights()


def merge_source(ctx: GridContext, arm) -> str:
    """The LoRA arm a merge arm merges: its `source`, or the arm a search selected (`matched:<method>`)."""
    method = matched_method(arm.source)
    if method is None:
        return arm.source
    if not ctx.matched_arms.get(method):
        raise LookupError(f"merge arm {arm.name!r} merges the arm the {method!r} search selects, and it has "
                          "selected none")
    return ctx.matched_arms[method]


def _merged_model(ctx: GridContext, run: Run, run_dir: Path):
    merged_arm = merge_source(ctx, run.arm)
    source = ctx.out / "runs" / merged_arm / f"seed-{run.seed}" / "train" / "adapter"
    if not source.is_dir():
        raise FileNotFoundError(f"run {run.key} merges {source}, which is missing (is the run of "
                                f"{merged_arm!r} seed {run.seed} complete?)")
    model = copy.deepcopy(ctx.base_model)
    load_adapter(model, source, base_model=ctx.preset.model)
    report = merge_lora(model, run.arm.projection, run.arm.k, cache=ctx.cache)
    atomic_write_json(run_dir / "merge.json", {**report.to_dict(), "adapter": str(source.relative_to(ctx.out))})
    return model, [m["name"] for m in report.modules]


def to_eval_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model`, cast in place to the grid's evaluation dtype as a LoRA arm trains in it
    (train.sft.model_prep): frozen weights in `dtype`, LoRA factors kept float32 (the kernel casts
    them per call)."""
    if dtype == torch.float32:
        return model
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in ("lora_A", "lora_B"):
            param.data = param.data.to(dtype)
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
    return model


def _evaluate(ctx: GridContext, run: Run, model, run_dir: Path) -> dict:
    path = run_dir / "eval" / "results.json"
    if path.is_file():
        return read_json(path)
    # Drift is measured against the base weights: the adapters switched off for LoRA, the kept
    # base model otherwise; the base model against itself is 0 by definition and not measured.
    drift_base = {"lora": AdaptersOff(model), "base": None}.get(run.arm.kind, ctx.eval_base)
    return evaluate(model, ctx.tokenizer, suite=ctx.suite, base_model=drift_base, out_dir=run_dir / "eval",
                    progress=False, meta={"model": ctx.preset.model, "arm": run.arm.name, "seed": run.seed,
                                          "dtype": str(ctx.eval_dtype).removeprefix("torch.")},
                    allow_code_execution=ctx.preset.eval.get("execute_code", False))


def _validate(ctx: GridContext, model, run_dir: Path) -> dict:
    path = run_dir / "validation.json"
    if not path.is_file():
        atomic_write_json(path, validation_rate(model, ctx.tokenizer, ctx.validation, ctx.suite, KeywordRefusalJudge()))
    return read_json(path)


def _overlap(ctx: GridContext, run: Run, model, run_dir: Path, merged_names=None) -> dict:
    out = {}
    for k in ctx.preset.overlap["k"]:
        path = run_dir / "overlap" / f"k-{k}.json"
        if not path.is_file():
            if run.arm.kind == "lora":
                report = analyse_adapter(model, k, cache=ctx.cache, progress=False)
            else:
                tuned = {n: t.detach() for n, t in model.state_dict().items()}
                names = None if merged_names is None else [n + ".weight" for n in merged_names]
                report = analyse_update(ctx.base_state, tuned, k, names, cache=ctx.cache, progress=False)
            write_markdown(report, run_dir / "overlap" / f"k-{k}.md")
            write_json(report, path)
        out[str(k)] = read_json(path)["summary"]["overall"]
    return out


def run_one(ctx: GridContext, run: Run) -> dict:
    """Do (or finish) one run; returns its completion record (also in done.json)."""
    run_dir = ctx.out / run.run_dir
    if (run_dir / DONE).is_file():
        return read_json(run_dir / DONE)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_spec(ctx, run, run_dir)
    t0 = time.perf_counter()
    seconds, train_summary, merged = {}, None, None
    if run.arm.kind == "base":
        model = ctx.base_model
    elif run.arm.kind == "merge":
        model, merged = _merged_model(ctx, run, run_dir)
    else:
        model, train_summary = _trained_model(ctx, run, run_dir)
    seconds["train"] = time.perf_counter() - t0
    model.eval()
    # The overlap first: a full or merged model's dW = W' - W is read in float32, before the model
    # is cast to the evaluation dtype (bf16 rounding of W' would swamp a small update).
    t = time.perf_counter()
    overlap = {} if run.arm.kind == "base" else _overlap(ctx, run, model, run_dir, merged)
    seconds["overlap"] = time.perf_counter() - t
    model = ctx.eval_base if run.arm.kind == "base" else to_eval_dtype(model, ctx.eval_dtype)
    if run.arm.name in ctx.search_arms:
        t = time.perf_counter()
        with torch.no_grad():
            _validate(ctx, model, run_dir)
        seconds["validation"] = time.perf_counter() - t
    t = time.perf_counter()
    results = _evaluate(ctx, run, model, run_dir)
    seconds["eval"] = time.perf_counter() - t
    record = {"key": run.key, "arm": run.arm.name, "kind": run.arm.kind, "seed": run.seed,
              "train": train_summary, "eval": "eval/results.json", "eval_seconds": results.get("timings", {}),
              "overlap": overlap, "seconds": seconds}
    atomic_write_json(run_dir / DONE, record)  # last: the run counts as finished only now
    if run.arm.kind == "full":
        # A full checkpoint holds the weights and AdamW's two moments (~1.6 GB for a 135M model,
        # three seeds ~5 GB); once the run is done only model/ is ever read again.
        shutil.rmtree(run_dir / "train" / "checkpoints", ignore_errors=True)
    return record
