"""lora_core.svd_cache on disk: a saved cache reloads to the same bases, and a damaged or foreign
file is refused with a ValueError naming it (a SafetensorError used to escape as a traceback)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_core.svd_cache import SVDCache


def _filled_cache():
    g = torch.Generator().manual_seed(0)
    cache = SVDCache()
    weights = {"a": torch.randn(12, 7, generator=g), "b": torch.randn(5, 9, generator=g)}
    for name, W in weights.items():
        cache.get(name, W, 3, dtype=torch.float64)
    return cache, weights


def test_save_then_load_serves_the_same_bases(tmp_path):
    cache, weights = _filled_cache()
    path = cache.save(tmp_path / "svd.safetensors")
    again = SVDCache()
    assert again.load(path) == 2
    for name, W in weights.items():
        want = cache.get(name, W, 3, dtype=torch.float64)
        got = again.get(name, W, 3, dtype=torch.float64)
        assert again.hits == list(weights).index(name) + 1, "the loaded entry was not used"
        for a, b in ((want.U, got.U), (want.S, got.S), (want.V, got.V)):
            assert torch.equal(a, b)


def _rewrite(path, mutate_tensors=None, mutate_index=None):
    """Re-save a cache file with its tensors or its index changed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        index = json.loads(f.metadata()["lora_core_svd_cache"])
    tensors = load_file(str(path))
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_index:
        mutate_index(index)
    save_file(tensors, str(path), metadata={"lora_core_svd_cache": json.dumps(index)})


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(b"garbage" * 10), "not a readable safetensors file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), "not a readable safetensors file"),
    (lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    (lambda p: save_file({"x": torch.zeros(1)}, str(p)), "not an SVD cache written by lora_core"),
    (lambda p: save_file({"x": torch.zeros(1)}, str(p), metadata={"lora_core_svd_cache": "{nope"}),
     "index is not valid"),
    (lambda p: _rewrite(p, mutate_tensors=lambda t: t.pop("1.V")), "missing tensor '1.V'"),
    (lambda p: _rewrite(p, mutate_index=lambda i: i[0].pop("fingerprint")), "index is not valid"),
    (lambda p: _rewrite(p, mutate_tensors=lambda t: t.update({"0.U": t["0.U"][:, :2].contiguous()})),
     "shapes"),
    (lambda p: _rewrite(p, mutate_tensors=lambda t: t["1.S"].__setitem__(0, float("nan"))), "NaN or inf"),
], ids=["garbage", "truncated", "empty", "no-index", "bad-json", "missing-tensor", "missing-field",
        "wrong-shape", "nan"])
def test_damaged_file_is_a_value_error_naming_it(tmp_path, damage, message):
    cache, _ = _filled_cache()
    path = cache.save(tmp_path / "svd.safetensors")
    damage(path)
    fresh = SVDCache()
    with pytest.raises(ValueError, match=message) as info:
        fresh.load(path)
    assert str(path) in str(info.value)
    assert len(fresh) == 0, "a refused file must not leave part of its entries behind"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        SVDCache().load(tmp_path / "nowhere.safetensors")
