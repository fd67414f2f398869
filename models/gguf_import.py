"""Convert a GGUF checkpoint (llama / qwen2, byte-level BPE vocabulary) into an HF-format directory.

The result is what `transformers` and our own `load_hf_directory` read: config.json, safetensors
weights, tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json.
The pieces live in `gguf_tensors` (weights and config) and `gguf_tokenizer` (tokenizer files); this
module puts them together. The library never imports transformers: tests compare the result
against transformers' own GGUF loader.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lora_core.common.files import atomic_directory
from lora_core.models.cache_manifest import write_manifest
from lora_core.models.gguf_stream import peak_bytes, plan_tensors, write_streamed_weights
from lora_core.models.gguf_tensors import convert_tensors, derive_config, open_gguf
from lora_core.models.gguf_tokenizer import build_tokenizer_files
from lora_core.models.host_memory import check_memory


def gguf_to_hf(gguf_path: str | os.PathLike, progress: bool = True
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """Read a GGUF into memory as (config.json dict, HF-named tensors, {file name: text}).

    The files are tokenizer.json, tokenizer_config.json and generation_config.json. Useful to
    load a .gguf without writing a directory; `convert_gguf` writes the same thing to disk.
    """
    gguf_file = open_gguf(gguf_path)
    config = derive_config(gguf_file)
    files = build_tokenizer_files(gguf_file.metadata, gguf_file.path)
    tensors = convert_tensors(gguf_file, config, progress=progress)
    files["generation_config.json"] = json.dumps(_generation_config(gguf_file.metadata), indent=2) + "\n"
    return config, tensors, files


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                 extra_files: dict[str, str] | None = None, dtype: str | None = None,
                 progress: bool = True, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Convert `gguf_path` into an HF-format directory at `out_dir` (written atomically).

    The weights are streamed tensor by tensor, a row block at a time (models.gguf_stream), so
    memory stays at one block whatever the model's size; free memory and disk are checked first,
    with the estimate in the message. dtype: "bfloat16", "float16" or "float32" for the stored
    weights; None keeps what loses nothing (float32 for quantised files, see gguf_tensors).
    extra_files: more files to put in the directory (e.g. a provenance record). Refuses an existing
    non-empty `out_dir` unless overwrite=True. The directory carries a checksum manifest
    (models.cache_manifest), so the cache can tell a damaged conversion from a good one.
    """
    gguf_file = open_gguf(gguf_path)
    config = derive_config(gguf_file)
    if dtype is not None:
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype {dtype!r} is not supported for a GGUF import (bfloat16, float16, float32)")
        config["torch_dtype"] = dtype
    torch_dtype = getattr(torch, config["torch_dtype"])
    plans = plan_tensors(gguf_file, config, torch_dtype)
    check_memory(peak_bytes(plans, torch_dtype), f"importing {gguf_file.path.name}")
    _check_disk(Path(out_dir), sum(p.nbytes for p in plans))
    files = build_tokenizer_files(gguf_file.metadata, gguf_file.path)
    files["generation_config.json"] = json.dumps(_generation_config(gguf_file.metadata), indent=2) + "\n"
    files.update(extra_files or {})
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out_dir} exists and is not empty (pass overwrite=True to replace it)")
    with atomic_directory(out_dir, overwrite=overwrite) as temp_dir:
        (temp_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, content in files.items():
            if "/" in name or name in ("", ".", "..") or name == "config.json" or name.startswith("model"):
                raise ValueError(f"extra file name {name!r} must be a plain file name that the import does not write")
            (temp_dir / name).write_text(content, encoding="utf-8")
        write_streamed_weights(gguf_file, config, temp_dir, torch_dtype, max_shard_bytes=max_shard_bytes,
                               progress=progress)
        write_manifest(temp_dir)
    return out_dir


def _check_disk(out_dir: Path, weight_bytes: int) -> None:
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = weight_bytes + 64 * 1024 * 1024
    if free < needed:
        raise ValueError(f"importing into {out_dir} needs about {needed / 1e9:.1f} GB of disk, only "
                         f"{free / 1e9:.1f} GB is free there")


def _generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    get = lambda key: metadata.get(f"tokenizer.ggml.{key}")  # noqa: E731
    config: dict[str, Any] = {}
    if get("bos_token_id") is not None:
        config["bos_token_id"] = int(get("bos_token_id"))
    eos = [int(get(k)) for k in ("eos_token_id", "eot_token_id", "eom_token_id") if get(k) is not None]
    eos = list(dict.fromkeys(eos))  # unique, in order: EOS first, then end-of-turn markers
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if get("padding_token_id") is not None:
        config["pad_token_id"] = int(get("padding_token_id"))
    return config


__all__ = ["convert_gguf", "gguf_to_hf"]
