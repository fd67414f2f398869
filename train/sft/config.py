"""TrainConfig: the one run spec every way into training builds, with the paper's defaults.

The paper (authors' code): AdamW, lr 5e-5, cosine schedule, no warm-up, weight decay 1e-4, batch 2,
LoRA alpha 16, dropout 0.05, 10 epochs for LoRA and 5 for full fine-tuning. Those defaults are
for 7B+ models; `lora-core demo` is a preset over this spec for a small model on a CPU
(train/demo.py says why), and `lora-core reproduce` arms are presets over it too.

The spec is frozen and validated when built: `lora-core train`, the demo and every reproduce arm
construct one and hand it to `prepare_run` (train.sft.loop), which never writes into it. Its
knobs are grouped (data, LoRA, optimiser, regulariser, retain term, checkpoints, logging); on disk,
in presets and on the command line each is one flat key (`lr`, `rank`, `retain_beta`:
train.sft.spec_fields). Each field's metadata also says its role, and the lists callers need
(what may change on resume, what a preset arm may set, what is LoRA-only) are derived from it
below, once. The flags of `lora-core train` are generated from the same fields (train.cli._options).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from lora_core.config import INIT_METHODS
from lora_core.models.registry import DEFAULT_MODEL
from lora_core.regularizer import SIDES, WEIGHTINGS
from lora_core.train.sft import spec_fields
from lora_core.train.sft.retain_set import RETAIN_TARGETS
from lora_core.train.sft.spec_fields import group, option
from lora_core.train.sft.targets import TARGET_PRESETS, parse_layers, resolve_targets

# Choice lists with no other home: the trainer (train.sft.*) compares these strings directly.
METHODS = ("lora", "full")
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16")
PAPER_EPOCHS = {"lora": 10.0, "full": 5.0}
# Set by code (the demo, the trainer), not by a flag; the experiment runner sets it per run.
_INTERNAL = {"cli": False}
_BY_RUNNER = {"preset": False}  # a reproduce run takes it from the preset's other blocks


@dataclass(frozen=True)
class DataOptions:
    jsonl: str | None = option(None, key="data", **_BY_RUNNER,
                               help="your JSONL: {prompt, response} or {messages} per line "
                               "(default: AdvBench prompts + refusal templates)")
    dataset: str = option("advbench", **_BY_RUNNER, help="registry data set of harmful prompts (default %(default)s)")
    limit: int | None = option(None, min=1, **_BY_RUNNER, help="use at most this many examples")
    reasoning_line: bool | None = option(None, **_BY_RUNNER,
                                         help="put '<think> one sentence </think>' before each refusal "
                                         "(default: when the chat template uses <think>)")
    max_length: int = option(512, min=2, help="tokens per example; longer ones are cut (default %(default)s)")


@dataclass(frozen=True)
class LoRAOptions:
    rank: int = option(8, flags=("--rank", "-r"), help="rank r of each adapter (default %(default)s)")
    alpha: float = option(16.0, help="scale numerator: the update is alpha/r * B A (default %(default)s)")
    dropout: float = option(0.05, help="dropout on the adapter input (default %(default)s)")
    targets: str = option("attn+mlp", help=f"preset ({', '.join(TARGET_PRESETS)}) or comma-separated module names")
    layers: str | None = option(None, help="layer range, e.g. 16-31 or 3,5,7 (default: all)")
    use_rslora: bool = option(False, flags=("--rslora",), help="rank-stabilised scale alpha/sqrt(r)")
    init: str = option("default", choices=INIT_METHODS,
                       help="how A and B start; 'default': Kaiming A, B = 0 (lora_core.config.LoRAConfig)")


@dataclass(frozen=True)
class OptimOptions:
    """AdamW and its schedule, batches, precision and the seed."""

    lr: float = option(5e-5, help="learning rate (default %(default)s)")
    weight_decay: float = option(1e-4, min=0, help="AdamW weight decay (default %(default)s)")
    scheduler: str = option("cosine", choices=SCHEDULERS, help="learning-rate schedule (default %(default)s)")
    warmup_steps: int = option(0, min=0, help="linear warm-up steps (default %(default)s)")
    epochs: float | None = option(None, **_BY_RUNNER, help="passes over the data (default: the paper's 10 for "
                                  "LoRA, 5 for full fine-tuning)")
    max_steps: int | None = option(None, min=1, resume="extend", **_BY_RUNNER,
                                   help="optimiser steps (overrides --epochs)")
    batch_size: int = option(2, min=1, help="examples per micro-batch (default %(default)s)")
    grad_accum: int = option(1, min=1, help="micro-batches per optimiser step (default %(default)s)")
    clip: float | None = option(1.0, min=0, help="max gradient norm, 0 = off")
    dtype: str = option("float32", choices=DTYPES,
                        help="bfloat16: LoRA keeps the frozen base in bf16 and the adapters in fp32; "
                        "full fine-tuning uses autocast with fp32 master weights")
    grad_checkpointing: bool = option(False, help="recompute activations in the backward pass (less memory)")
    compile: bool = option(False, help="torch.compile the decoder's elementwise ops (RMSNorm, SiLU-mul, RoPE) "
                           "for training: faster steps for a few seconds of compiling, so it pays on long "
                           "runs; falls back to eager with a warning when compiling fails")
    seed: int = option(0, **_BY_RUNNER, help="random seed (default %(default)s)")


@dataclass(frozen=True)
class OrthoOptions:
    """The paper's regulariser: loss += beta * sum R over the adapted modules (lora_core.regularizer)."""

    beta: float = option(0.0, min=0, help="weight beta of the paper's R on dW = B A (default %(default)s = off)")
    k: int = option(16, min=1, help="top-k singular directions of each frozen weight (default %(default)s)")
    side: str = option("column", choices=SIDES, help="subspace side (default %(default)s)")
    weighting: str = option("spectral", choices=WEIGHTINGS,
                            help="weight directions by singular value or not (default %(default)s)")
    normalize: bool = option(False, help="divide S by ||S||_2 and R by ||dW||_F^2")
    scaled_update: bool = option(False, help="R on the update as added, (alpha/r) B A, instead of the paper's "
                                 "B A: beta then means beta * (alpha/r)^2 of the paper's")


@dataclass(frozen=True)
class RetainOptions:
    """Not in the paper: loss += beta * mean per-token KL(base || adapted) on benign chat prompts
    (train.sft.retain_set), base = the same model with its adapters switched off."""

    beta: float = option(0.0, min=0, help="weight of the retain KL (default %(default)s = off, the paper's recipe)")
    data: str = option("diverse", help="'diverse' (everyday benign requests of many topics + MATH problems "
                       "outside MATH-500: no evaluation set reads any of them; prompts only, so --retain-targets "
                       "self), 'gsm8k' (GSM8K test items minus those the --retain-exclude-suite evaluation "
                       "reads; the full suite reads them all) or a JSONL with prompt/response fields "
                       "(default %(default)s)")
    targets: str = option("self", choices=RETAIN_TARGETS,
                          help="'gold': teacher-force the set's answers; 'self': the base model's own greedy "
                          "answers (needed for --retain-data diverse) (default %(default)s)")
    target_tokens: int = option(64, min=1, help="length of the base model's own answers with --retain-targets self")
    in_sft: bool = option(False, help="also train on the retain prompts with cross-entropy on the base model's "
                          "own answers, mixed into the SFT data (needs --retain-targets self)")
    per_step: int = option(4, min=1, help="retain examples per optimiser step (default %(default)s)")
    unlikelihood: float = option(0.0, min=0, help="weight u of the refusal-unlikelihood term (train.sft."
                                 "unlikelihood_term): loss += u * mean -log(1 - p) of a training refusal's first "
                                 "--retain-unlikelihood-tokens tokens after benign retain prompts, "
                                 "--retain-per-step of them a step (default %(default)s = off)")
    unlikelihood_tokens: int = option(6, min=1, help="opening tokens of a refusal the unlikelihood term reads "
                                      "(default %(default)s)")
    limit: int | None = option(256, min=1, help="retain pool size, 'none' = all (default %(default)s)")
    max_length: int = option(192, min=2, help="tokens per retain example (default %(default)s)")
    exclude_suite: str = option("quick", help="evaluation suite whose GSM8K items are kept out of the retain set")
    exclude_limit: int | None = option(None, help="the --limit that suite will be run with (it changes which "
                                       "items it reads)")
    exclude_seed: int | None = option(None, help="the --seed that suite will be run with (default: the suite's own)")


@dataclass(frozen=True)
class CheckpointOptions:
    out: str = option("runs/train", role="invocation", **_BY_RUNNER, help="run directory (default %(default)s)")
    save_every: int = option(50, min=0, role="bookkeeping",
                             help="optimiser steps between checkpoints; 0 = only at the end (default %(default)s)")
    keep_checkpoints: int = option(2, min=0, role="bookkeeping",
                                   help="checkpoints kept on disk, 0 = all (default %(default)s)")


@dataclass(frozen=True)
class LoggingOptions:
    eval_every: int = option(0, min=0, role="bookkeeping", **_BY_RUNNER,
                             help="quick evaluation every N steps, 0 = never (default %(default)s)")
    tensorboard: bool = option(False, role="bookkeeping", help="also write the metrics as TensorBoard event "
                               "files in <out>/tensorboard (needs pip install 'lora-core[tensorboard]')")
    eval_suite: str = option("quick", role="bookkeeping", **_INTERNAL, **_BY_RUNNER)
    log_every: int = option(1, role="bookkeeping", **_INTERNAL)
    progress: bool | None = option(None, role="invocation", **_INTERNAL, **_BY_RUNNER)  # None: bar on a terminal


def _bad(name: str, why: str):
    # Errors name the flag, since most configs come from the command line.
    raise ValueError(f"--{name.replace('_', '-')}: {why}")


@dataclass(frozen=True)
class TrainConfig:
    """One refusal SFT run. Build it from flat keys with `TrainConfig.from_flat(lr=..., rank=...)`."""

    model: str = option(DEFAULT_MODEL, title="model and data", **_BY_RUNNER,
                        help="registry name, HF directory or .gguf (default %(default)s)")
    method: str = option("lora", choices=METHODS, title="model and data", **_BY_RUNNER,
                         help="lora: the paper's method; full: full fine-tuning, its baseline (default %(default)s)")
    data: DataOptions = group(DataOptions, "model and data")
    lora: LoRAOptions = group(LoRAOptions, "LoRA", lora_only=True)
    optim: OptimOptions = group(OptimOptions, "optimisation (paper defaults)")
    ortho: OrthoOptions = group(OrthoOptions, "orthogonality regulariser (loss += beta * R)", prefix="ortho_",
                                lora_only=True)
    retain: RetainOptions = group(RetainOptions, "retain term (not in the paper; off by default): loss += beta * "
                                  "mean KL(base || adapted) on benign prompts, base = the same model with its "
                                  "adapters off", prefix="retain_", lora_only=True)
    checkpoints: CheckpointOptions = group(CheckpointOptions, "run directory")
    logging: LoggingOptions = group(LoggingOptions, "run directory")

    def __post_init__(self):
        if self.optim.epochs is None:  # the paper: 10 epochs for LoRA, 5 for full fine-tuning
            epochs = PAPER_EPOCHS.get(self.method, PAPER_EPOCHS["lora"])
            object.__setattr__(self, "optim", dataclasses.replace(self.optim, epochs=epochs))
        self._validate()

    # --- building and storing ------------------------------------------------------------
    @classmethod
    def from_flat(cls, **values) -> "TrainConfig":
        return spec_fields.from_flat(cls, values)

    def to_dict(self) -> dict:
        """The flat form: config.json, presets and flags use these keys."""
        return spec_fields.to_flat(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls.from_flat(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def replace(self, **flat) -> "TrainConfig":
        """A copy with some flat keys changed (validated again)."""
        return self.from_flat(**{**self.to_dict(), **flat})

    def anchored(self) -> "TrainConfig":
        """A copy whose model/data/retain-data paths are absolute where they name an existing file
        or folder (registry names stay names): the stored config then still finds them when the run
        is resumed from another working directory."""
        flat = self.to_dict()
        fixed = {name: os.path.abspath(value) for name in ("model", "data", "retain_data")
                 if isinstance(value := flat[name], str) and value and os.path.exists(value)}
        return self.replace(**fixed)

    # --- checks ----------------------------------------------------------------------------
    def _validate(self) -> None:
        for leaf in spec_fields.leaves(type(self)):
            value = leaf.value_in(self)
            if (wrong := spec_fields.type_error(leaf, value)) is not None:
                _bad(leaf.key, wrong)
            # inf and NaN pass every comparison check below and wreck a run later (lr inf: NaN
            # weights after one step), so no float knob may take them.
            if isinstance(value, float) and not math.isfinite(value):
                _bad(leaf.key, f"must be a finite number, got {value}")
            choices, least = leaf.field.metadata.get("choices"), leaf.field.metadata.get("min")
            if choices is not None and value not in choices:
                _bad(leaf.key, f"expected one of {'|'.join(choices)}, got {value!r}")
            if least is not None and value is not None and value < least:
                _bad(leaf.key, f"must be >= {least}, got {value}")
        self._check_combinations()
        resolve_targets(self.lora.targets)
        parse_layers(self.lora.layers)

    def _check_combinations(self) -> None:
        """The checks that depend on another field, or that a choice list or a minimum cannot say."""
        lora, optim, retain = self.lora, self.optim, self.retain
        if self.method == "lora" and lora.rank < 1:
            _bad("rank", f"must be >= 1, got {lora.rank}")
        if optim.lr <= 0:
            _bad("lr", f"must be positive, got {optim.lr}")
        if optim.max_steps is None and optim.epochs <= 0:
            _bad("epochs", f"must be positive, got {optim.epochs}")
        if not 0.0 <= lora.dropout < 1.0:
            _bad("dropout", f"must be in [0, 1), got {lora.dropout}")
        if self.ortho.beta > 0 and self.method != "lora":
            _bad("ortho_beta", "the orthogonality regulariser needs --method lora")
        if retain.in_sft and (retain.beta <= 0 or retain.targets != "self"):
            _bad("retain_in_sft", "mixes the base model's own answers into the SFT data: needs "
                 "--retain-beta > 0 and --retain-targets self")
        if retain.beta > 0 and retain.data == "diverse" and retain.targets != "self":
            _bad("retain_data", "diverse has no gold answers: use --retain-targets self")
        if retain.beta > 0 and self.method != "lora":
            _bad("retain_beta", "the retain term compares against the adapters switched off: needs --method lora")
        if retain.unlikelihood > 0 and self.method != "lora":
            _bad("retain_unlikelihood", "is a LoRA recipe like the retain term it sits beside: needs --method lora")


# The lists every caller needs, derived from the fields' roles once (see train.sft.spec_fields).
LEARNING_KEYS = spec_fields.keys(TrainConfig, role="learning")  # compared on resume; a run's identity
BOOKKEEPING_KEYS = spec_fields.keys(TrainConfig, role="bookkeeping")  # may change on resume
INVOCATION_KEYS = spec_fields.keys(TrainConfig, role="invocation")  # this invocation's alone
EXTENDABLE_KEYS = spec_fields.keys(TrainConfig, resume="extend")  # may grow on resume
RUNNER_KEYS = spec_fields.keys(TrainConfig, preset=False)  # a reproduce run sets them itself
LORA_ONLY_KEYS = spec_fields.keys(TrainConfig, lora_only=True)  # meaningless for full fine-tuning
