"""Write a Hugging Face-format model directory atomically.

The layout is the one `transformers` and our own loader read: `config.json`, the weights as
`model.safetensors` (or `model-0000i-of-0000n.safetensors` shards plus
`model.safetensors.index.json` when they exceed `max_shard_bytes`), and any extra files
(tokenizer.json, tokenizer_config.json, generation_config.json, ...).

Atomic: everything is written into a hidden temporary sibling directory which is renamed onto
`out_dir` only when complete, so an interrupted write never leaves a directory that looks like a
model. Replacing an existing directory (overwrite=True) moves the old one aside first, renames the
new one into place, then deletes the old one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_core.common.files import atomic_directory

from .cache_manifest import MANIFEST_NAME, STAMPS_NAME, write_manifest

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_RESERVED = {"config.json", WEIGHTS_NAME, INDEX_NAME, MANIFEST_NAME, STAMPS_NAME}


def write_hf_directory(
    out_dir: str | os.PathLike,
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    extra_files: Mapping[str, str | bytes] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    manifest: bool = False,
) -> Path:
    """Write config.json, safetensors weights and `extra_files` into `out_dir`; return its path.

    config: the config.json content. tensors: name -> tensor (any dtype; made contiguous; two
    names sharing storage are refused because safetensors cannot store aliases - drop the tied one).
    extra_files: file name -> text or bytes, written as given. Refuses an existing non-empty
    `out_dir` unless overwrite=True. manifest: also record every file's size and sha256
    (models.cache_manifest), for directories the cache re-verifies before use.
    """
    out_dir = Path(out_dir)
    extra_files = dict(extra_files or {})
    _check_inputs(out_dir, config, tensors, extra_files, max_shard_bytes, overwrite)

    with atomic_directory(out_dir, overwrite=overwrite) as temp_dir:
        (temp_dir / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        for name, content in extra_files.items():
            target = temp_dir / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        _write_weights(temp_dir, tensors, max_shard_bytes)
        if manifest:
            write_manifest(temp_dir)
    return out_dir


def _check_inputs(out_dir, config, tensors, extra_files, max_shard_bytes, overwrite) -> None:
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (the config.json content), got {type(config).__name__}")
    if not tensors:
        raise ValueError(f"no tensors to write into {out_dir}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    for name, content in extra_files.items():
        if name in _RESERVED or name.startswith("model-"):
            raise ValueError(f"extra file {name!r} would clash with a file write_hf_directory writes")
        if "/" in name or "\\" in name or name in (".", "..") or not name:
            raise ValueError(f"extra file name {name!r} must be a plain file name")
        if not isinstance(content, (str, bytes)):
            raise TypeError(f"extra file {name!r} must be str or bytes, got {type(content).__name__}")
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        if key in seen:
            raise ValueError(f"tensors {seen[key]!r} and {name!r} share storage (tied weights); "
                             f"write only one of them and say so in the config")
        seen[key] = name
    if out_dir.exists():
        if not out_dir.is_dir():
            raise NotADirectoryError(f"output path {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"output directory {out_dir} exists and is not empty "
                                  f"(pass overwrite=True to replace it)")


def _shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    # Greedy in insertion order, so that layers stay together; a single tensor larger than the
    # limit gets a shard of its own (as transformers does).
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    return shards


def _write_weights(directory: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards = _shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file_name), metadata=metadata)
        for name, tensor in shard.items():
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index_json, indent=2) + "\n")


__all__ = ["write_hf_directory", "WEIGHTS_NAME", "INDEX_NAME"]
