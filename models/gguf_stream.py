"""Stream a GGUF's tensors into safetensors shards, a few rows at a time, in the target dtype.

A 7B in bf16 is 15 GB; dequantised whole in float32 it would be 30 GB, more than the machine. So
nothing here holds a whole tensor in float32, nor the whole model at all:

- Every tensor's name, shape and dtype are known from the GGUF's tensor table before any data is
  read, so each shard's safetensors header is written first and the data after it, tensor by
  tensor (the format is an 8-byte header length, a JSON header of dtype/shape/byte offsets, then
  the raw little-endian data).
- A tensor is read from the file in row blocks with plain reads (not through the reader's memory
  map, whose touched pages would count against the process until it exits), dequantised to
  float32 one block (~64 MB) at a time, cast to the target dtype and written out.

Peak memory is therefore one row block in float32 plus its cast, whatever the model's size (the
7B's import, measured: bench/RESULTS.md, "Measurements cited by the code").
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_core.common.progress import progress as progress_bar

from .gguf_tensors import GGUFFile, _unpermute_rope_rows, expected_shapes, hf_name

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_BLOCK_BYTES_F32 = 64 * 1024 * 1024  # float32 bytes per dequantised row block
WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class _Plan:
    gguf_name: str
    key: str
    shape: tuple[int, ...]  # torch order
    nbytes: int  # in the target dtype


def plan_tensors(gguf_file: GGUFFile, config: dict[str, Any], dtype: torch.dtype) -> list[_Plan]:
    """Every tensor to write, in file order, checked against the config's expected shapes."""
    expected = expected_shapes(config)
    plans, seen = [], set()
    item = torch.empty((), dtype=dtype).element_size()
    for name, tensor in gguf_file.tensors.items():
        key = hf_name(name)
        if key is None or key not in expected:
            raise ValueError(f"{gguf_file.path}: unexpected tensor {name!r} for a {config['model_type']} "
                             f"model with this config (no HF counterpart)")
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if shape != expected[key]:
            raise ValueError(f"{gguf_file.path}: tensor {name!r} has shape {shape} (torch order), "
                             f"expected {expected[key]} for {key!r}")
        plans.append(_Plan(name, key, shape, int(np.prod(shape)) * item))
        seen.add(key)
    missing = [key for key in expected if key not in seen]
    if missing:
        raise ValueError(f"{gguf_file.path}: missing tensors (HF keys) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    return plans


def peak_bytes(plans: list[_Plan], dtype: torch.dtype) -> int:
    """Memory the streaming conversion needs beyond the interpreter: one float32 row block, its
    cast, the raw bytes it came from (all <= the block size), with room for numpy's temporaries."""
    largest = max(p.nbytes for p in plans)
    item = torch.empty((), dtype=dtype).element_size()
    block = min(_BLOCK_BYTES_F32, largest * 4 // item)
    return 4 * block + 256 * 1024 * 1024


def _shards(plans: list[_Plan], max_shard_bytes: int) -> list[list[_Plan]]:
    # Greedy in file order so that a layer's tensors stay together; a tensor larger than the limit
    # gets a shard of its own (as write_hf_directory and transformers do).
    shards: list[list[_Plan]] = [[]]
    size = 0
    for plan in plans:
        if shards[-1] and size + plan.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    # Within a shard, the order safetensors' own writer uses (one dtype here: by name), so the
    # file is byte for byte what `save_file` writes for the same tensors.
    return [sorted(shard, key=lambda plan: plan.key) for shard in shards]


def _header(plans: list[_Plan], dtype: torch.dtype) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in plans:
        header[plan.key] = {"dtype": _ST_DTYPES[dtype], "shape": list(plan.shape),
                            "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors itself writes
    return len(raw).to_bytes(8, "little") + raw


def _row_blocks(gguf_file: GGUFFile, plan: _Plan, rows_per_block: int, handle):
    """Yield (first row, float32 numpy block) for the tensor, read with plain reads."""
    import gguf

    tensor = gguf_file.tensors[plan.gguf_name]
    rows = plan.shape[0] if len(plan.shape) > 1 else 1
    row_bytes = int(tensor.n_bytes) // rows
    for first in range(0, rows, rows_per_block):
        count = min(rows_per_block, rows - first)
        handle.seek(int(tensor.data_offset) + first * row_bytes)
        raw = bytearray(count * row_bytes)  # writable, so F32/F16 views of it are too
        if handle.readinto(raw) != count * row_bytes:
            raise ValueError(f"{gguf_file.path}: truncated GGUF file while reading tensor {plan.gguf_name!r}")
        data = np.frombuffer(raw, dtype=np.uint8).reshape(count, row_bytes)
        try:
            values = gguf.quants.dequantize(data, tensor.tensor_type)
        except NotImplementedError as error:
            raise ValueError(f"{gguf_file.path}: tensor {plan.gguf_name!r} has type {tensor.tensor_type.name}, "
                             f"which the gguf package cannot dequantise") from error
        shape = (count, *plan.shape[1:]) if len(plan.shape) > 1 else plan.shape
        yield first, np.asarray(values, dtype=np.float32).reshape(shape)


def _write_tensor(gguf_file: GGUFFile, plan: _Plan, config: dict[str, Any], dtype: torch.dtype,
                  source, out) -> None:
    row_elems = int(np.prod(plan.shape[1:])) if len(plan.shape) > 1 else int(plan.shape[0])
    rows_per_block = max(1, _BLOCK_BYTES_F32 // (4 * row_elems))
    heads = None
    if config["model_type"] == "llama":
        # llama.cpp permuted Q/K rows per head: blocks hold whole heads so each is undone in place.
        if ".self_attn.q_proj." in plan.key:
            heads = config["num_attention_heads"]
        elif ".self_attn.k_proj." in plan.key:
            heads = config["num_key_value_heads"]
    if heads is not None:
        head_dim = plan.shape[0] // heads
        rows_per_block = max(head_dim, rows_per_block // head_dim * head_dim)
    for _, block in _row_blocks(gguf_file, plan, rows_per_block, source):
        values = torch.from_numpy(block)
        if heads is not None:
            values = _unpermute_rope_rows(values, values.shape[0] // head_dim)
        values = values.to(dtype).contiguous()
        out.write(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")


def write_streamed_weights(gguf_file: GGUFFile, config: dict[str, Any], directory: Path, dtype: torch.dtype,
                           max_shard_bytes: int = 2 * 1024**3, progress: bool = True) -> None:
    """Write the GGUF's tensors as safetensors shards (+ index when more than one) into `directory`."""
    plans = plan_tensors(gguf_file, config, dtype)
    shards = _shards(plans, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    bar = progress_bar(total=len(plans), desc=f"importing GGUF to {str(dtype).removeprefix('torch.')}",
                       unit="tensor", enabled=None if progress else False)
    try:
        with open(gguf_file.path, "rb", buffering=0) as source:
            for shard, name in zip(shards, names):
                with open(directory / name, "wb") as out:
                    out.write(_header(shard, dtype))
                    for plan in shard:
                        _write_tensor(gguf_file, plan, config, dtype, source, out)
                        bar.update(1)
                    out.flush()
                    os.fsync(out.fileno())
    finally:
        bar.close()
    if len(shards) > 1:
        weight_map = {plan.key: name for shard, name in zip(shards, names) for plan in shard}
        index = {"metadata": {"total_size": sum(p.nbytes for p in plans)}, "weight_map": weight_map}
        (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


__all__ = ["plan_tensors", "peak_bytes", "write_streamed_weights"]
