"""The decoder's configuration, read from (and written back to) a Hugging Face `config.json`.

Only the two families the project runs are accepted: `llama` (SmolLM2, Llama 3.x, Llama-Guard 3)
and `qwen2` (Qwen2.5, DeepSeek-R1-Distill-Qwen). Everything the decoder does not implement is
refused by name instead of being silently ignored, because a checkpoint that loads but computes
something else is worse than one that does not load.

Both spellings of RoPE settings are read: the classic `rope_theta` + `rope_scaling` keys and the
`rope_parameters` dict that transformers 5 writes. `to_hf_dict()` writes the classic spelling, which
every transformers version still reads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_core.common.files import read_json

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    model_type: str = "llama"
    hidden_size: int = 576
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    vocab_size: int = 49152
    rope_theta: float = 10000.0
    # None, or the Llama 3 dict: rope_type="llama3", factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings.
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # Bias on q/k/v projections (Qwen2 always; Llama when `attention_bias`), and on o_proj
    # (Llama's `attention_bias` covers o_proj too, Qwen2 never has it).
    qkv_bias: bool = False
    o_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    # One id or several: Llama 3 instruct checkpoints list all their end-of-turn tokens.
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # Keys of the source config.json that the decoder does not use but a writer should keep.
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if self.torch_dtype is not None and self.torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype {self.torch_dtype!r} is not supported (supported: {', '.join(_DTYPES)})")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> set[int]:
        if self.eos_token_id is None:
            return set()
        if isinstance(self.eos_token_id, int):
            return {self.eos_token_id}
        return set(self.eos_token_id)

    # -- HF config.json -----------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = d.get("architectures")
            raise ValueError(
                f"model_type {model_type!r} (architectures={arch}) is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        _refuse_unsupported_options(d)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if key not in d:
                raise ValueError(f"config.json has no {key!r}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if d.get("head_dim") is None and d["hidden_size"] % heads:
            raise ValueError(f"hidden_size={d['hidden_size']} is not divisible by num_attention_heads={heads}")

        rope_theta, rope_scaling = _read_rope(d)
        if model_type == "qwen2":
            # Qwen2 hard-codes bias on q/k/v and none on o_proj.
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        dtype = d.get("torch_dtype", d.get("dtype"))
        known = {
            "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "vocab_size", "rope_theta", "rope_scaling", "rope_parameters",
            "rms_norm_eps", "tie_word_embeddings", "attention_bias", "max_position_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
        }
        return cls(
            model_type=model_type,
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=d["intermediate_size"],
            vocab_size=d["vocab_size"],
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=dtype,
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return cls.from_hf_dict(read_json(path))

    def to_hf_dict(self) -> dict[str, Any]:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        d: dict[str, Any] = dict(self.extra)
        d.pop("rope_parameters", None)
        d.update(
            architectures=[arch],
            model_type=self.model_type,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            hidden_act="silu",
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = False
        if self.torch_dtype is not None:
            d["torch_dtype"] = self.torch_dtype
        return d

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        return out


def _read_rope(d: dict) -> tuple[float, dict | None]:
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    theta = d.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    elif params is not None:
        raise ValueError(f"rope_parameters must be a dict, got {type(params).__name__}")
    if theta is None:
        theta = 10000.0
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be a dict or null, got {scaling!r}")
        scaling = dict(scaling)
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        if rope_type == "default":
            return theta, None
        scaling = {"rope_type": rope_type, **scaling}
        _check_rope_scaling(scaling)
    return theta, scaling


def _check_rope_scaling(scaling: dict) -> None:
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "llama3":
        missing = [k for k in _LLAMA3_ROPE_KEYS if k not in scaling]
        if missing:
            raise ValueError(f"llama3 rope_scaling lacks {', '.join(missing)}")
        if scaling["high_freq_factor"] == scaling["low_freq_factor"]:
            raise ValueError("llama3 rope_scaling needs high_freq_factor != low_freq_factor")


def _refuse_unsupported_options(d: dict) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
    if d.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if d.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"pretraining_tp={d['pretraining_tp']} is not supported (only 1)")
    if d.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true (sliding-window attention) is not supported")
    layer_types = d.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        odd = sorted({t for t in layer_types if t != "full_attention"})
        raise ValueError(f"layer_types {odd} are not supported (only 'full_attention')")
    for key in ("quantization_config", "attn_logit_softcapping", "final_logit_softcapping"):
        if d.get(key) is not None:
            raise ValueError(f"config option {key!r} is not supported")
