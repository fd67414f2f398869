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
from pathlib import Path
from typing import Any

import torch

from models.gguf_tensors import convert_tensors, derive_config, open_gguf
from models.gguf_tokenizer import build_tokenizer_files
from models.hf_format import write_hf_directory


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
                 extra_files: dict[str, str] | None = None) -> Path:
    """Convert `gguf_path` into an HF-format directory at `out_dir` (written atomically).

    extra_files: more files to put in the directory (e.g. a provenance record). Refuses an existing
    non-empty `out_dir` unless overwrite=True. The directory carries a checksum manifest
    (models.cache_manifest), so the cache can tell a damaged conversion from a good one.
    """
    config, tensors, files = gguf_to_hf(gguf_path)
    files.update(extra_files or {})
    return write_hf_directory(out_dir, config, tensors, extra_files=files, overwrite=overwrite, manifest=True)


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
