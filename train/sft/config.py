"""TrainConfig: every knob of a refusal SFT run, with the paper's defaults.

The paper (authors' code): AdamW, lr 5e-5, cosine schedule, no warm-up, weight decay 1e-4, batch 2,
LoRA alpha 16, dropout 0.05, 10 epochs for LoRA and 5 for full fine-tuning. Those defaults are
for 7B+ models; `lora-core demo` overrides a few for a 135M model on CPU and says why.
The resolved config is written to the run directory as JSON, so a run can be read back and resumed.

Each field also carries its command-line help, choices and --help group in its metadata: the flags
of `lora-core train` are generated from it (train.cli._options), so a knob is written once, here.
Choice lists come from the code that uses them (lora_core, train.data.retain) or, for the strings
only the trainer compares, are defined below; validate() checks the same tuples the CLI offers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lora_core.config import INIT_METHODS
from lora_core.regularizer import SIDES, WEIGHTINGS
from lora_core.train.data.retain import RETAIN_TARGETS

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TARGET_PRESETS = {
    "attn+mlp": ATTN + MLP, "all": ATTN + MLP, "mlp": MLP, "attn": ATTN,
    **{name: [name] for name in ATTN + MLP},
}


def resolve_targets(spec: str | list[str]) -> list[str]:
    """A preset name, or comma-separated module-name suffixes, -> list of suffixes."""
    if isinstance(spec, list):
        names = spec
    else:
        spec = spec.strip()
        if spec in TARGET_PRESETS:
            return list(TARGET_PRESETS[spec])
        names = [s.strip() for s in spec.split(",") if s.strip()]
    out = []
    for name in names:
        out.extend(TARGET_PRESETS.get(name, [name]))
    if not out:
        raise ValueError(f"--targets {spec!r} names no module (presets: {', '.join(TARGET_PRESETS)})")
    return list(dict.fromkeys(out))


def parse_layers(spec: str | list[int] | None) -> list[int] | None:
    """"16-31" (inclusive, as the paper writes it), "3,5,7", "0-3,8" or None for all layers."""
    if spec is None or isinstance(spec, list):
        return spec
    layers: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                layers.extend(range(lo, hi + 1))
            elif part:
                layers.append(int(part))
        except ValueError:
            raise ValueError(f"--layers {spec!r}: expected e.g. '16-31' or '3,5,7'") from None
    if not layers or min(layers) < 0:
        raise ValueError(f"--layers {spec!r}: expected non-negative layer indices")
    return sorted(set(layers))


def _bad(name: str, why: str):
    # Errors name the flag, since most configs come from the command line.
    raise ValueError(f"--{name.replace('_', '-')}: {why}")


def _check_declared(f: dataclasses.Field, value) -> None:
    """The checks a field's metadata declares: its choices and its least value."""
    choices, least = f.metadata.get("choices"), f.metadata.get("min")
    if choices is not None and value not in choices:
        _bad(f.name, f"expected one of {'|'.join(choices)}, got {value!r}")
    if least is not None and value is not None and value < least:
        _bad(f.name, f"must be >= {least}, got {value}")


# Choice lists with no other home: the trainer (train.sft.*) compares these strings directly.
METHODS = ("lora", "full")
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16")


def _group(title: str):
    """A field factory for one `lora-core train --help` group: `_lora(8, help="...")`.

    The metadata (help, choices, flags, cli) is read by train.cli._options to make the flag, and
    by TrainConfig.validate ("choices", and "min": the least value allowed, None always passing).
    """
    def option(default, **metadata):
        return field(default=default, metadata={"group": title, **metadata})
    return option


_data = _group("model and data")
_lora = _group("LoRA")
_optim = _group("optimisation (paper defaults)")
_ortho = _group("orthogonality regulariser (loss += beta * R)")
_retain = _group("retain term (not in the paper; off by default): loss += beta * mean KL(base || adapted) "
                 "on benign prompts, base = the same model with its adapters off")
_run = _group("run directory")
PAPER_EPOCHS = {"lora": 10.0, "full": 5.0}
_INTERNAL = {"cli": False}  # set by code (the demo, the trainer), not by a flag


@dataclass
class TrainConfig:
    # what to train, on what
    model: str = _data("smollm2-135m-instruct", help="registry name, HF directory or .gguf (default %(default)s)")
    method: str = _data("lora", choices=METHODS,
                        help="lora: the paper's method; full: full fine-tuning, its baseline (default %(default)s)")
    data: str | None = _data(None, help="your JSONL: {prompt, response} or {messages} per line "
                             "(default: AdvBench prompts + refusal templates)")
    dataset: str = _data("advbench", help="registry data set of harmful prompts (default %(default)s)")
    limit: int | None = _data(None, min=1, help="use at most this many examples")
    reasoning_line: bool | None = _data(None, help="put '<think> one sentence </think>' before each refusal "
                                        "(default: when the chat template uses <think>)")
    max_length: int = _data(512, min=2, help="tokens per example; longer ones are cut (default %(default)s)")
    # LoRA
    rank: int = _lora(8, flags=("--rank", "-r"), help="rank r of each adapter (default %(default)s)")
    alpha: float = _lora(16.0, help="scale numerator: the update is alpha/r * B A (default %(default)s)")
    dropout: float = _lora(0.05, help="dropout on the adapter input (default %(default)s)")
    targets: str = _lora("attn+mlp",
                         help=f"preset ({', '.join(TARGET_PRESETS)}) or comma-separated module names")
    layers: str | None = _lora(None, help="layer range, e.g. 16-31 or 3,5,7 (default: all)")
    use_rslora: bool = _lora(False, flags=("--rslora",), help="rank-stabilised scale alpha/sqrt(r)")
    init: str = _lora("default", choices=INIT_METHODS,
                     help="how A and B start; 'default': Kaiming A, B = 0 (lora_core.config.LoRAConfig)")
    # optimisation (AdamW)
    lr: float = _optim(5e-5, help="learning rate (default %(default)s)")
    weight_decay: float = _optim(1e-4, min=0, help="AdamW weight decay (default %(default)s)")
    scheduler: str = _optim("cosine", choices=SCHEDULERS, help="learning-rate schedule (default %(default)s)")
    warmup_steps: int = _optim(0, min=0, help="linear warm-up steps (default %(default)s)")
    epochs: float | None = _optim(None, help="passes over the data (default: the paper's 10 for LoRA, "
                                  "5 for full fine-tuning)")
    max_steps: int | None = _optim(None, min=1, help="optimiser steps (overrides --epochs)")
    batch_size: int = _optim(2, min=1, help="examples per micro-batch (default %(default)s)")
    grad_accum: int = _optim(1, min=1, help="micro-batches per optimiser step (default %(default)s)")
    clip: float | None = _optim(1.0, min=0, help="max gradient norm, 0 = off")
    dtype: str = _optim("float32", choices=DTYPES,
                        help="bfloat16: LoRA keeps the frozen base in bf16 and the adapters in fp32; "
                        "full fine-tuning uses autocast with fp32 master weights")
    grad_checkpointing: bool = _optim(False, help="recompute activations in the backward pass (less memory)")
    compile: bool = _optim(False, help="torch.compile the decoder's elementwise ops (RMSNorm, SiLU-mul, RoPE) for "
                           "training: ~13%% faster steps on CPU for ~20 s of compiling, so it pays on long runs; "
                           "falls back to eager with a warning when compiling fails")
    seed: int = _optim(0, help="random seed (default %(default)s)")
    # orthogonality regulariser (paper): loss += beta * sum R (lora_core.regularizer)
    ortho_beta: float = _ortho(0.0, min=0, help="weight beta of the paper's R on dW = B A "
                               "(default %(default)s = off)")
    ortho_k: int = _ortho(16, min=1, help="top-k singular directions of each frozen weight (default %(default)s)")
    ortho_side: str = _ortho("column", choices=SIDES, help="subspace side (default %(default)s)")
    ortho_weighting: str = _ortho("spectral", choices=WEIGHTINGS,
                                  help="weight directions by singular value or not (default %(default)s)")
    ortho_normalize: bool = _ortho(False, help="divide S by ||S||_2 and R by ||dW||_F^2")
    ortho_scaled_update: bool = _ortho(False, help="R on the update as added, (alpha/r) B A, instead of the "
                                       "paper's B A: beta then means beta * (alpha/r)^2 of the paper's")
    # retain term (not in the paper; off by default): loss += retain_beta * mean per-token
    # KL(base || adapted) on benign chat prompts (train.data.retain), base = adapters switched off
    retain_beta: float = _retain(0.0, min=0,
                                 help="weight of the retain KL (default %(default)s = off, the paper's recipe)")
    retain_data: str = _retain("diverse", help="'diverse' (everyday benign requests of many topics + MATH "
                               "problems outside MATH-500: no evaluation set reads any of them; prompts only, "
                               "so --retain-targets self), 'gsm8k' (GSM8K test items minus those the "
                               "--retain-exclude-suite evaluation reads; the full suite reads them all) or a "
                               "JSONL with prompt/response fields (default %(default)s)")
    retain_targets: str = _retain("self", choices=RETAIN_TARGETS,
                                  help="'gold': teacher-force the set's answers; 'self': the base model's own "
                                  "greedy answers (needed for --retain-data diverse) (default %(default)s)")
    retain_target_tokens: int = _retain(64, min=1,
                                        help="length of the base model's own answers with --retain-targets self")
    retain_in_sft: bool = _retain(False, help="also train on the retain prompts with cross-entropy on the base "
                                  "model's own answers, mixed into the SFT data (needs --retain-targets self)")
    retain_per_step: int = _retain(4, min=1, help="retain examples per optimiser step (default %(default)s)")
    retain_limit: int | None = _retain(256, min=1, help="retain pool size, 'none' = all (default %(default)s)")
    retain_max_length: int = _retain(192, min=2, help="tokens per retain example (default %(default)s)")
    retain_exclude_suite: str = _retain("quick",
                                        help="evaluation suite whose GSM8K items are kept out of the retain set")
    retain_exclude_limit: int | None = _retain(
        None, help="the --limit that suite will be run with (it changes which items it reads)")
    retain_exclude_seed: int | None = _retain(
        None, help="the --seed that suite will be run with (default: the suite's own)")
    # bookkeeping
    out: str = _run("runs/train", help="run directory (default %(default)s)")
    save_every: int = _run(50, min=0, help="optimiser steps between checkpoints; 0 = only at the end "
                           "(default %(default)s)")
    keep_checkpoints: int = _run(2, min=0, help="checkpoints kept on disk, 0 = all (default %(default)s)")
    eval_every: int = _run(0, min=0, help="quick evaluation every N steps, 0 = never (default %(default)s)")
    tensorboard: bool = _run(False, help="also write the metrics as TensorBoard event files in <out>/tensorboard "
                             "(needs pip install 'lora-core[tensorboard]')")
    eval_suite: str = field(default="quick", metadata=_INTERNAL)
    log_every: int = field(default=1, metadata=_INTERNAL)
    progress: bool | None = field(default=None, metadata=_INTERNAL)  # None: bar only on a terminal
    data_info: dict = field(default_factory=dict, metadata=_INTERNAL)  # provenance of the data

    def __post_init__(self):
        if self.epochs is None:  # the paper: 10 epochs for LoRA, 5 for full fine-tuning
            self.epochs = PAPER_EPOCHS.get(self.method, PAPER_EPOCHS["lora"])

    def validate(self) -> "TrainConfig":
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # inf and NaN pass every comparison check below and wreck a run later (lr inf: NaN
            # weights after one step), so no float knob may take them.
            if isinstance(value, float) and not math.isfinite(value):
                _bad(f.name, f"must be a finite number, got {value}")
            _check_declared(f, value)
        self._check_combinations()
        resolve_targets(self.targets)
        parse_layers(self.layers)
        return self

    def _check_combinations(self) -> None:
        """The checks that depend on another field, or that a choice list or a minimum cannot say."""
        if self.method == "lora" and self.rank < 1:
            _bad("rank", f"must be >= 1, got {self.rank}")
        if self.lr <= 0:
            _bad("lr", f"must be positive, got {self.lr}")
        if self.max_steps is None and self.epochs <= 0:
            _bad("epochs", f"must be positive, got {self.epochs}")
        if not 0.0 <= self.dropout < 1.0:
            _bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.ortho_beta > 0 and self.method != "lora":
            _bad("ortho_beta", "the orthogonality regulariser needs --method lora")
        if self.retain_in_sft and (self.retain_beta <= 0 or self.retain_targets != "self"):
            _bad("retain_in_sft", "mixes the base model's own answers into the SFT data: needs "
                 "--retain-beta > 0 and --retain-targets self")
        if self.retain_beta > 0 and self.retain_data == "diverse" and self.retain_targets != "self":
            _bad("retain_data", "diverse has no gold answers: use --retain-targets self")
        if self.retain_beta > 0 and self.method != "lora":
            _bad("retain_beta", "the retain term compares against the adapters switched off: needs --method lora")

    def anchored(self) -> "TrainConfig":
        """A copy whose model/data/retain-data paths are absolute where they name an existing file
        or folder (registry names stay names): the stored config then still finds them when the run
        is resumed from another working directory."""
        fixed = {name: os.path.abspath(value) for name in ("model", "data", "retain_data")
                 if isinstance(value := getattr(self, name), str) and value and os.path.exists(value)}
        return dataclasses.replace(self, **fixed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        return cls.from_dict(json.loads(path.read_text()))
