"""TrainConfig: every knob of a refusal SFT run, with the paper's defaults.

The paper (authors' code): AdamW, lr 5e-5, cosine schedule, no warm-up, weight decay 1e-4, batch 2,
LoRA alpha 16, dropout 0.05, 10 epochs for LoRA and 5 for full fine-tuning. Those defaults are
for 7B+ models; `lora-core demo` overrides a few for a 135M model on CPU and says why.
The resolved config is written to the run directory as JSON, so a run can be read back and resumed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class TrainConfig:
    # what to train
    model: str = "smollm2-135m-instruct"
    method: str = "lora"                    # lora | full
    # data
    data: str | None = None                 # user JSONL; None -> AdvBench prompts + refusal templates
    dataset: str = "advbench"
    limit: int | None = None
    reasoning_line: bool | None = None      # None: on when the chat template knows <think>
    max_length: int = 512
    # LoRA
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str = "attn+mlp"
    layers: str | None = None
    use_rslora: bool = False
    init: str = "default"
    # optimisation
    lr: float = 5e-5
    weight_decay: float = 1e-4
    scheduler: str = "cosine"               # cosine | linear | constant
    warmup_steps: int = 0
    epochs: float = 10.0
    max_steps: int | None = None            # overrides epochs when set
    batch_size: int = 2
    grad_accum: int = 1
    clip: float | None = 1.0                # max grad norm; None or 0 disables
    dtype: str = "float32"                  # float32 | bfloat16 (LoRA: bf16 frozen base + fp32 adapters;
                                            # full: autocast with fp32 master weights)
    grad_checkpointing: bool = False
    seed: int = 0
    # orthogonality regulariser (paper): loss += beta * sum R
    ortho_beta: float = 0.0
    ortho_k: int = 16
    ortho_side: str = "column"
    ortho_weighting: str = "spectral"
    ortho_normalize: bool = False
    # retain term (not in the paper; off by default): loss += retain_beta * mean per-token
    # KL(base || adapted) on benign chat prompts (train.data.retain), base = adapters switched off
    retain_beta: float = 0.0
    retain_data: str = "gsm8k"              # "gsm8k" (minus the eval suite's items), "diverse" or a JSONL path
    retain_targets: str = "gold"            # "gold" (the set's answers) or "self" (the base model's own)
    retain_target_tokens: int = 64          # length of the base model's own answers ("self")
    retain_per_step: int = 4                # retain examples per optimiser step
    retain_limit: int | None = 256          # size of the retain pool (fixed-seed subset)
    retain_max_length: int = 192
    retain_exclude_suite: str = "quick"     # evaluation suite whose GSM8K items are excluded
    retain_exclude_limit: int | None = None  # ... evaluated with this --limit (it changes the subsets)
    retain_exclude_seed: int | None = None   # ... and this --seed (None: the suite's own seed)
    # bookkeeping
    out: str = "runs/train"
    save_every: int = 50                    # optimiser steps between checkpoints; 0 = only at end
    keep_checkpoints: int = 2
    eval_every: int = 0                     # optimiser steps between quick evaluations; 0 = never
    eval_suite: str = "quick"
    log_every: int = 1
    progress: bool | None = None            # None: bar only on a terminal
    data_info: dict = field(default_factory=dict)  # filled by the trainer (provenance of the data)

    def validate(self) -> "TrainConfig":
        def bad(flag, why):
            raise ValueError(f"--{flag}: {why}")
        if self.method not in ("lora", "full"):
            bad("method", f"expected 'lora' or 'full', got {self.method!r}")
        if self.method == "lora" and self.rank < 1:
            bad("rank", f"must be >= 1, got {self.rank}")
        if self.lr <= 0:
            bad("lr", f"must be positive, got {self.lr}")
        if self.scheduler not in ("cosine", "linear", "constant"):
            bad("scheduler", f"expected cosine|linear|constant, got {self.scheduler!r}")
        if self.batch_size < 1:
            bad("batch-size", f"must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            bad("grad-accum", f"must be >= 1, got {self.grad_accum}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max-steps", f"must be >= 1, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            bad("epochs", f"must be positive, got {self.epochs}")
        if self.dtype not in ("float32", "bfloat16"):
            bad("dtype", f"expected float32 or bfloat16, got {self.dtype!r}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.ortho_beta < 0:
            bad("ortho-beta", f"must be >= 0, got {self.ortho_beta}")
        if self.ortho_beta > 0 and self.method != "lora":
            bad("ortho-beta", "the orthogonality regulariser needs --method lora")
        if self.ortho_side not in ("column", "row", "both"):
            bad("ortho-side", f"expected column|row|both, got {self.ortho_side!r}")
        if self.ortho_weighting not in ("spectral", "uniform"):
            bad("ortho-weighting", f"expected spectral|uniform, got {self.ortho_weighting!r}")
        if self.retain_beta < 0:
            bad("retain-beta", f"must be >= 0, got {self.retain_beta}")
        if self.retain_beta > 0 and self.method != "lora":
            bad("retain-beta", "the retain term compares against the adapters switched off: needs --method lora")
        if self.retain_targets not in ("gold", "self"):
            bad("retain-targets", f"expected 'gold' or 'self', got {self.retain_targets!r}")
        if self.retain_target_tokens < 1:
            bad("retain-target-tokens", f"must be >= 1, got {self.retain_target_tokens}")
        if self.retain_per_step < 1:
            bad("retain-per-step", f"must be >= 1, got {self.retain_per_step}")
        if self.retain_limit is not None and self.retain_limit < 1:
            bad("retain-limit", f"must be >= 1, got {self.retain_limit}")
        if self.warmup_steps < 0:
            bad("warmup-steps", f"must be >= 0, got {self.warmup_steps}")
        resolve_targets(self.targets)
        parse_layers(self.layers)
        return self

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
