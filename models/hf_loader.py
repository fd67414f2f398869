"""Load an HF-format directory (config.json + safetensors, single file or sharded) into CausalLM.

The model is built on the meta device (no memory, no random init) and the checkpoint tensors are
assigned in place (`load_state_dict(assign=True)`), so loading costs one copy of the weights, in
the target dtype on the target device. Each tensor is read with a plain file read straight into its
final buffer (or, when the file stores another dtype, into a buffer of that one tensor, then cast),
so the host never holds more than the loaded model plus its largest stored tensor. safetensors'
own reader maps the file instead: the mapped pages count as resident memory next to the copies, and
a 200 MB bf16 checkpoint peaked at 444 MB above the starting RSS (an fp32 one loaded as bf16 at
800 MB); read this way they peak near 200 MB (tests/models/test_load_dtype.py).
Every key is checked before anything is assigned: missing, unexpected and mis-shaped tensors, and
safetensors files whose header is corrupt or whose data is shorter than the header promises, and
tensors holding NaN or inf, give an error naming the tensor and the file. Only safetensors is
read: no pickle anywhere.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from .config import ModelConfig
from .decoder import CausalLM

_ST_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
# Buffers some older checkpoints saved; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_ST_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The NaN/inf check runs on slices of this many values: one bool mask of a whole 7B embedding
# (545M values) would be half a gigabyte of transient memory.
_FINITE_CHUNK = 1 << 24
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header; returns {tensor name: {dtype, shape, data_offsets}}."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ValueError(f"{path}: corrupt safetensors file (only {size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise ValueError(
                f"{path}: corrupt safetensors header (declares {header_len} header bytes, file has {size})"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: corrupt safetensors header ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from error
        item = _ST_DTYPE_SIZES.get(dtype)
        if item is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        numel = 1
        for dim in shape:
            numel *= dim
        if end - start != numel * item or start < 0:
            raise ValueError(f"{path}: tensor {name!r} offsets {start}..{end} do not match shape {shape} {dtype}")
        if end > data_size:
            raise ValueError(
                f"{path}: truncated file: tensor {name!r} needs bytes up to {end} but the data section "
                f"has {data_size}"
            )
    return header


def _checkpoint_files(directory: Path) -> dict[Path, list[str] | None]:
    """{safetensors file: tensor names it should hold per the index (None = whatever it holds)}."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index}: not a valid safetensors index ({error})") from error
        files: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(directory / shard, []).append(name)
        for shard in files:
            if not shard.is_file():
                raise FileNotFoundError(f"shard {shard.name} listed in {index} is missing")
        return files
    if single.is_file():
        return {single: None}
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise ValueError(f"{directory}: only pickle checkpoints (*.bin/*.pt) found; convert them to safetensors")
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def resolve_dtype(dtype, config: ModelConfig, device) -> torch.dtype:
    """Explicit dtype, else the config's torch_dtype, else float32 (float16 becomes float32 on CPU:
    CPU half-precision matmuls are slow and the checkpoints are trained in bf16/fp32 anyway)."""
    if dtype is None:
        name = config.torch_dtype or "float32"
        if name == "float16" and torch.device(device).type == "cpu":
            name = "float32"
        dtype = name
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {dtype!r} is not supported (float32, bfloat16, float16)")
        dtype = getattr(torch, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
    return dtype


def _all_finite(tensor: torch.Tensor) -> bool:
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(_FINITE_CHUNK))


def _finite(stored: torch.Tensor, name: str, path: Path, device, dtype) -> torch.Tensor:
    """`stored` moved to device/dtype, refused by name if it holds NaN or inf.

    One isfinite pass per tensor at load: a single NaN in a norm turns every logit into NaN and
    generation into an empty answer, far from the cause. The check runs on the converted tensor so a
    value that only overflows the requested dtype (1e5 in float16) is caught as well. The move comes
    before the cast: on a GPU the cast then runs there, and the host holds the stored bytes only.
    """
    tensor = stored.to(device=device).to(dtype=dtype) if stored.is_floating_point() else stored.to(device)
    if not tensor.is_floating_point() or _all_finite(tensor):
        return tensor
    if stored.is_floating_point() and _all_finite(stored):
        raise ValueError(f"{path}: tensor {name!r} overflows {dtype} (values beyond its range); "
                         f"load it in float32 or bfloat16")
    bad = int((~torch.isfinite(stored)).sum())
    raise ValueError(f"{path}: tensor {name!r} holds NaN or inf ({bad} of {stored.numel()} values); "
                     f"the checkpoint is damaged")


def _read_tensor(handle, data_start: int, info: dict, name: str, path: Path) -> torch.Tensor:
    """One tensor of a safetensors file, read into a fresh CPU buffer of its stored dtype.

    The header was validated (read_safetensors_header), so the offsets lie inside the file.
    safetensors is little-endian, as every platform torch ships for.
    """
    dtype = _ST_TORCH.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which no model weight uses")
    start, end = info["data_offsets"]
    tensor = torch.empty(info["shape"], dtype=dtype)
    if end > start:
        handle.seek(data_start + start)
        got = handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        if got != end - start:
            raise ValueError(f"{path}: truncated file: tensor {name!r} ends early ({got} of {end - start} bytes)")
    return tensor


def load_weights(directory: str | Path, dtype=None, device="cpu") -> CausalLM:
    """Build CausalLM from `directory`'s config.json and safetensors; every key is checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    config = ModelConfig.from_json(directory / "config.json")
    dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}
    tied = config.tie_word_embeddings

    state: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    for path, names in _checkpoint_files(directory).items():
        header = read_safetensors_header(path)
        if names is not None:
            absent = sorted(set(names) - set(header))
            if absent:
                raise ValueError(f"{path}: tensor {absent[0]!r} is listed in the index but not in the file")
        for name, info in header.items():
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            if name not in expected:
                raise ValueError(f"{path}: unexpected tensor {name!r} (not part of a {config.model_type} model)")
            if tuple(info["shape"]) != expected[name]:
                raise ValueError(
                    f"{path}: tensor {name!r} has shape {tuple(info['shape'])}, expected {expected[name]}"
                )
            if name in source:
                raise ValueError(f"tensor {name!r} appears in both {source[name]} and {path}")
            source[name] = path
        try:
            with open(path, "rb") as handle:
                data_start = 8 + struct.unpack("<Q", handle.read(8))[0]
                for name, info in header.items():
                    if source.get(name) == path:
                        stored = _read_tensor(handle, data_start, info, name, path)
                        state[name] = _finite(stored, name, path, device, dtype)
                        del stored  # the stored-dtype buffer goes before the next one is read
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{path}: cannot read safetensors data ({error})") from error

    if tied:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{directory}: checkpoint is missing tensor {missing[0]!r}{more}")
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model


def load_hf_directory(path: str | Path, dtype=None, device="cpu"):
    """-> (CausalLM in eval mode, Tokenizer) from an HF-format directory."""
    from .tokenizer import Tokenizer

    path = Path(os.fspath(path))
    model = load_weights(path, dtype=dtype, device=device).eval()
    tokenizer = Tokenizer.from_directory(path)
    return model, tokenizer
