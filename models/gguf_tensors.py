"""GGUF -> Hugging Face tensors and config.json, for the llama and qwen2 architectures.

Reads a GGUF file with the `gguf` package (llama.cpp's own reader), dequantises each tensor with
`gguf.quants.dequantize` (numpy), renames it to the HF LlamaForCausalLM / Qwen2ForCausalLM key and
derives config.json from the metadata.

Conventions a GGUF differs in, each undone here:
- Shapes are stored fastest-varying dimension first (`ne[0]` = in_features), the reverse of
  torch's order; the data itself is row-major over the reversed shape, so reading it with
  `reversed(shape)` gives the HF (out_features, in_features) layout directly.
- llama.cpp's converter permutes the rows of Q and K of *llama*-architecture models, from HF's
  "rotate half" RoPE layout (per head: all first halves, then all second halves) to interleaved
  pairs. We apply the inverse per head. Qwen2 files are written without that permutation.
- Tied input/output embeddings: the file has no `output.weight`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_core.common.progress import progress as progress_bar

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass
class GGUFFile:
    """An opened GGUF: its path, metadata (key -> python value) and the gguf reader's tensors."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor (memory-mapped, not yet dequantised)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file; a truncated or corrupt file raises ValueError naming it."""
    import gguf  # deferred: only GGUF imports pay for it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, KeyError, IndexError, TypeError, OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {error}") from error
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: corrupt GGUF metadata field {key!r}: {error}") from error
    tensors = {}
    size = path.stat().st_size
    for tensor in reader.tensors:
        # The reader memory-maps lazily and silently returns short arrays past the end of the file.
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise ValueError(f"{path}: truncated GGUF file: tensor {tensor.name!r} needs bytes "
                             f"{tensor.data_offset}..{tensor.data_offset + tensor.n_bytes} of a "
                             f"{size}-byte file")
        tensors[tensor.name] = tensor
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def dequantize_tensor(gguf_file: GGUFFile, name: str) -> torch.Tensor:
    """One tensor as float32 in torch dimension order (reversed GGUF shape)."""
    import gguf

    tensor = gguf_file.tensors[name]
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise ValueError(f"{gguf_file.path}: tensor {name!r} has type {tensor.tensor_type.name}, which "
                         f"the gguf package cannot dequantise") from error
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    # np.array copies out of the read-only memory map; float32 is exact for every supported type.
    values = np.array(values, dtype=np.float32).reshape(shape)
    return torch.from_numpy(values)


def _unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: per head, interleaved pairs -> [first halves | second halves]."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    rest = weight.shape[1:]
    # (n_heads, head_dim/2, 2, ...) -> (n_heads, 2, head_dim/2, ...)
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()


def _shortest_float(value) -> float:
    # GGUF stores float32; printing the shortest decimal that round-trips float32 gives back the
    # value the model's config.json had (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _meta(gguf_file: GGUFFile, key: str, default: Any = ..., kind=int):
    arch = gguf_file.architecture
    full = f"{arch}.{key}"
    if full not in gguf_file.metadata:
        if default is ...:
            raise ValueError(f"{gguf_file.path}: GGUF metadata lacks {full!r}")
        return default
    value = gguf_file.metadata[full]
    if isinstance(value, list):
        raise ValueError(f"{gguf_file.path}: per-layer values for {full!r} are not supported")
    return kind(value)


def derive_config(gguf_file: GGUFFile) -> dict[str, Any]:
    """config.json (HF keys) for a llama or qwen2 GGUF, from its metadata and tensor shapes."""
    arch = gguf_file.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{gguf_file.path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    meta = gguf_file.metadata
    path = gguf_file.path
    hidden = _meta(gguf_file, "embedding_length")
    heads = _meta(gguf_file, "attention.head_count")
    kv_heads = _meta(gguf_file, "attention.head_count_kv", heads)
    head_dim = _meta(gguf_file, "attention.key_length", hidden // heads)
    value_dim = _meta(gguf_file, "attention.value_length", head_dim)
    if value_dim != head_dim:
        raise ValueError(f"{path}: attention.value_length {value_dim} != key_length {head_dim} is not supported")
    rope_dims = _meta(gguf_file, "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dims} < "
                         f"head_dim {head_dim}) are not supported")
    scaling = _meta(gguf_file, "rope.scaling.type", "none", kind=str)
    if scaling not in ("none", ""):
        raise ValueError(f"{path}: RoPE scaling {scaling!r} ({arch}.rope.scaling.type) is not supported")
    if "rope_freqs.weight" in gguf_file.tensors:
        raise ValueError(f"{path}: tensor 'rope_freqs.weight' (Llama 3.1-style RoPE frequency factors) "
                         f"is not supported: its scaling parameters cannot be recovered from a GGUF")
    if "token_embd.weight" not in gguf_file.tensors:
        raise ValueError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = int(gguf_file.tensors["token_embd.weight"].shape[1])
    tied = "output.weight" not in gguf_file.tensors
    q_bias = "blk.0.attn_q.bias" in gguf_file.tensors
    dtype = _storage_dtype(gguf_file)

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": _meta(gguf_file, "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": _meta(gguf_file, "feed_forward_length"),
        "vocab_size": vocab,
        "hidden_act": "silu",
        "rope_theta": _shortest_float(_meta(gguf_file, "rope.freq_base", 10000.0, kind=float)),
        "rms_norm_eps": _shortest_float(_meta(gguf_file, "attention.layer_norm_rms_epsilon", kind=float)),
        "max_position_embeddings": _meta(gguf_file, "context_length"),
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch == "llama":
        config["attention_bias"] = q_bias
        config["mlp_bias"] = "blk.0.ffn_gate.bias" in gguf_file.tensors
    else:
        if not q_bias:
            raise ValueError(f"{path}: qwen2 GGUF lacks tensor 'blk.0.attn_q.bias' (Qwen2 has q/k/v biases)")
        config["use_sliding_window"] = False
        config["sliding_window"] = None
        config["max_window_layers"] = config["num_hidden_layers"]
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{key}"])
    return config


def _storage_dtype(gguf_file: GGUFFile) -> str:
    # bfloat16 only when that loses nothing: every matrix is stored BF16 and every other tensor
    # (norms, biases, usually F32) is exactly representable in bfloat16. Dequantised blocks
    # (scale * int + min) and F16 need float32 to be exact.
    types = {t.tensor_type.name for t in gguf_file.tensors.values() if len(t.shape) > 1}
    if types != {"BF16"}:
        return "float32"
    for name, tensor in gguf_file.tensors.items():
        if len(tensor.shape) == 1 and tensor.tensor_type.name != "BF16":
            values = dequantize_tensor(gguf_file, name)
            if not torch.equal(values.to(torch.bfloat16).float(), values):
                return "float32"
    return "bfloat16"


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF state-dict keys -> shapes for this config (lm_head omitted when tied)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)
    mlp_bias = config.get("mlp_bias", False)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_rows, hidden),
            p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_rows),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,),
                           p + "self_attn.v_proj.bias": (kv_rows,)})
        if config.get("attention_bias", False):
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                           p + "mlp.down_proj.bias": (hidden,)})
    return shapes


def hf_name(gguf_name: str) -> str | None:
    """The HF key of a GGUF tensor name, or None when it has no counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    if match and match.group(2) in ("ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"):
        return f"model.layers.{match.group(1)}.mlp.{match.group(2)[4:-5]}_proj.bias"
    return None


def convert_tensors(gguf_file: GGUFFile, config: dict[str, Any], progress: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of the file, dequantised, renamed to HF keys, Q/K un-permuted for llama."""

    expected = expected_shapes(config)
    dtype = getattr(torch, config["torch_dtype"])
    out: dict[str, torch.Tensor] = {}
    names = list(gguf_file.tensors)
    for name in progress_bar(names, desc="dequantising GGUF", unit="tensor",
                             enabled=None if progress else False):
        key = hf_name(name)
        if key is None or key not in expected:
            raise ValueError(f"{gguf_file.path}: unexpected tensor {name!r} for a {config['model_type']} "
                             f"model with this config (no HF counterpart)")
        tensor = dequantize_tensor(gguf_file, name)
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(f"{gguf_file.path}: tensor {name!r} has shape {tuple(tensor.shape)} "
                             f"(torch order), expected {expected[key]} for {key!r}")
        if config["model_type"] == "llama":
            if ".self_attn.q_proj." in key:
                tensor = _unpermute_rope_rows(tensor, config["num_attention_heads"])
            elif ".self_attn.k_proj." in key:
                tensor = _unpermute_rope_rows(tensor, config["num_key_value_heads"])
        out[key] = tensor.to(dtype)
    missing = [key for key in expected if key not in out]
    if missing:
        raise ValueError(f"{gguf_file.path}: missing tensors (HF keys) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    return out


__all__ = ["GGUFFile", "open_gguf", "derive_config", "convert_tensors", "dequantize_tensor",
           "expected_shapes", "hf_name", "SUPPORTED_ARCHITECTURES"]
