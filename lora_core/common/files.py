"""File and directory writes that a reader never sees half done, and a checked JSON read.

Every writer in the project goes through here. A file is written to a temporary name in its
destination folder, fsync'ed, then moved into place with `os.replace`; a directory (checkpoint,
adapter, HF checkpoint) is filled in a temporary folder and renamed into place the same way. A
process killed at any point leaves either the previous file or directory or the complete new one.

Temporary names come from mkstemp/mkdtemp, which create 0600 files and 0700 folders; the finished
ones get the modes a plain open()/mkdir() would give (0666/0777 less the umask), so results are
readable by the people they are written for.

It lives at the bottom of the stack (lora_core/common) so models/ and train/ share it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_jsonl", "atomic_write_via",
           "atomic_directory", "read_json", "null_for_nan", "file_mode", "dir_mode"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_via(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let `write(temp_path)` produce the file (e.g. safetensors' save_file), then move it to
    `path` atomically; parents are created. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync(tmp)
        tmp.chmod(file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (parents created); returns the path."""
    return atomic_write_via(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def null_for_nan(value):
    """`value` with every non-finite float (NaN, ±inf) replaced by None and every key made a str:
    NaN is not JSON, and null says "not defined" (e.g. a standard error from one item)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): null_for_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [null_for_nan(v) for v in value]
    return value


def atomic_write_json(path: str | Path, obj, *, sort_keys: bool = True, ensure_ascii: bool = True,
                      nan_as_null: bool = False) -> Path:
    """`obj` as indented JSON and a newline. nan_as_null: non-finite floats become null (strict
    JSON, see `null_for_nan`) instead of Python's NaN/Infinity tokens."""
    obj = null_for_nan(obj) if nan_as_null else obj
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable, *, ensure_ascii: bool = True,
                       nan_as_null: bool = False) -> Path:
    """One JSON object a line (keys in their own order), as `atomic_write_json` treats NaN."""
    fix = null_for_nan if nan_as_null else (lambda row: row)
    return atomic_write_text(path, "".join(json.dumps(fix(r), ensure_ascii=ensure_ascii) + "\n" for r in rows))


def _finish_directory(directory: Path) -> None:
    for child in directory.rglob("*"):
        if child.is_file():
            _fsync(child)
            child.chmod(file_mode())
        elif child.is_dir():
            child.chmod(dir_mode())
    directory.chmod(dir_mode())


def _move_into_place(temp_dir: Path, out_dir: Path) -> None:
    if out_dir.exists() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(temp_dir, out_dir)
        return
    # Two renames: the old directory is deleted only once the new one is in place.
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    old.rmdir()
    os.replace(out_dir, old)
    try:
        os.replace(temp_dir, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on a clean exit its files are fsync'ed, given
    ordinary modes and the folder replaces `out_dir`; on an error it is removed.

    With overwrite=False an existing non-empty `out_dir` is refused before anything is written.
    """
    out_dir = Path(out_dir)
    if not overwrite and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield temp_dir
        _finish_directory(temp_dir)
        _move_into_place(temp_dir, out_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def read_json(path: str | Path):
    """Parse a JSON file; a missing file or invalid JSON raises an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
