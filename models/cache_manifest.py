"""A checksum manifest for the model directories we convert into the cache, and its re-check.

A converted model (`pull`, or a `.gguf` loaded by path) is a folder of files we wrote ourselves, so
no pin covers it: at conversion time `write_manifest` records each file's size and sha256 in
`lora_core_manifest.json`. `verify_manifest` checks them before the model is used:

- quick (every load): every size, and the sha256 of any file whose (size, mtime) differs from the
  stamp taken when it was last hashed. An unchanged 540 MB model costs a few `stat` calls; a file
  edited in place (a zeroed norm) has a new mtime and is hashed, and refused.
- full (`lora-core pull`): every sha256, whatever the stamps say; this also catches an edit that
  put the old mtime back.

Stamps live in `.lora_core_verified.json` beside the manifest; it is only a cache of "already
hashed", so a missing, damaged or unwritable stamp file just means hashing again.
"""
from __future__ import annotations

import json
from pathlib import Path

from lora_core.common.fetch import CorruptCacheError, corrupt_message, sha256_of
from lora_core.common.files import atomic_write_json

MANIFEST_NAME = "lora_core_manifest.json"
STAMPS_NAME = ".lora_core_verified.json"
_FORMAT = 1


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def write_manifest(directory: str | Path) -> Path:
    """Record size and sha256 of every file in `directory` (call it on the finished folder,
    before it is renamed into place); returns the manifest's path."""
    directory = Path(directory)
    files, stamps = {}, {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name not in (MANIFEST_NAME, STAMPS_NAME):
            files[path.name] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
            stamps[path.name] = _stamp(path)
    manifest = atomic_write_json(directory / MANIFEST_NAME, {"format": _FORMAT, "files": files})
    _save_stamps(directory, stamps)
    return manifest


def has_manifest(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST_NAME).is_file()


def verify_manifest(directory: str | Path, full: bool = False, fix: str | None = None) -> None:
    """Raise CorruptCacheError naming the first file of `directory` that does not match its
    manifest (see the module docstring for quick vs full). fix: what the message tells the user."""
    directory = Path(directory)
    fix = fix or f"delete {directory} or run `lora-core pull --force`"
    files = _read_manifest(directory, fix)
    stamps = _load_stamps(directory)
    changed = False
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCacheError(corrupt_message(path, "missing", fix))
        stamp = _stamp(path)
        if stamp[0] != want["size"]:
            raise CorruptCacheError(corrupt_message(path, f"{stamp[0]} bytes, {want['size']} when converted", fix))
        if full or stamps.get(name) != stamp:
            actual = sha256_of(path)
            if actual != want["sha256"]:
                raise CorruptCacheError(corrupt_message(
                    path, f"sha256 {actual}, {want['sha256']} when converted", fix))
            changed |= stamps.get(name) != stamp
            stamps[name] = stamp
    if changed:
        _save_stamps(directory, stamps)


def _read_manifest(directory: Path, fix: str) -> dict[str, dict]:
    path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        ok = manifest.get("format") == _FORMAT and isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            and "/" not in k and k not in ("", ".", "..") for k, v in files.items())
    except FileNotFoundError:
        raise CorruptCacheError(corrupt_message(path, "missing", fix)) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CorruptCacheError(corrupt_message(path, "not a valid manifest", fix))
    return files


def _load_stamps(directory: Path) -> dict[str, list[int]]:
    try:
        stamps = json.loads((directory / STAMPS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _save_stamps(directory: Path, stamps: dict) -> None:
    try:
        atomic_write_json(directory / STAMPS_NAME, stamps)
    except OSError:
        pass  # a read-only cache: verification still works, it just hashes again next time


__all__ = ["MANIFEST_NAME", "STAMPS_NAME", "write_manifest", "has_manifest", "verify_manifest"]
