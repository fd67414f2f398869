"""Atomic checkpoints: an injected failure mid-write leaves the previous checkpoint intact."""
import os

import pytest
import torch

from lora_core.train.sft import checkpoint as ck
from lora_core.train.sft.rng import rng_state, set_rng_state


def _model(seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    m[0].weight.requires_grad_(False)  # frozen weights are not part of a checkpoint
    return m


def _state(step):
    return {"step": step, "epoch": 0, "batch_index": step, "rng": rng_state(),
            "optimizer": {"state": {0: {"exp_avg": torch.full((3,), float(step))}}, "param_groups": []}}


def _assert_same(model, trainable):
    for name, p in model.named_parameters():
        if p.requires_grad:
            diff = (p.detach() - trainable[name]).abs().max().item()
            assert diff == 0.0, f"{name}: max abs difference {diff}"


def test_roundtrip_and_frozen_excluded(tmp_path):
    m = _model(0)
    path = ck.save_checkpoint(tmp_path, 5, m, _state(5))
    loaded = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert loaded.step == 5 and path.name == "step-000005"
    assert "0.weight" not in loaded.trainable and set(loaded.trainable) == {"0.bias", "1.weight", "1.bias"}
    _assert_same(m, loaded.trainable)
    assert torch.equal(loaded.state["optimizer"]["state"][0]["exp_avg"], torch.full((3,), 5.0))
    m2 = _model(1)
    ck.restore_trainable(m2, loaded.trainable)
    _assert_same(m2, loaded.trainable)


@pytest.mark.parametrize("fail_at", ["os.replace", "torch.save", "save_file"])
def test_failure_mid_write_keeps_previous(tmp_path, monkeypatch, fail_at):
    m = _model(0)
    ck.save_checkpoint(tmp_path, 1, m, _state(1))
    good = {k: v.clone() for k, v in ck.trainable_state(m).items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)

    def boom(*args, **kwargs):
        raise OSError(f"injected failure in {fail_at}")
    if fail_at == "os.replace":
        monkeypatch.setattr(os, "replace", boom)  # the one os.replace every atomic write goes through
    elif fail_at == "torch.save":
        monkeypatch.setattr(ck.torch, "save", boom)
    else:
        monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="injected"):
        ck.save_checkpoint(tmp_path, 2, m, _state(2))
    monkeypatch.undo()
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.name == "step-000001"
    loaded = ck.load_checkpoint(latest)
    assert loaded.step == 1
    for name, t in good.items():
        assert torch.equal(loaded.trainable[name], t), name
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temp directories left behind: {leftovers}"


def test_pointer_replaced_only_after_complete(tmp_path, monkeypatch):
    """A failure while LATEST is being replaced leaves LATEST on the old, complete checkpoint."""
    m = _model(0)
    ck.save_checkpoint(tmp_path, 1, m, _state(1))
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("LATEST"):
            raise OSError("injected failure replacing LATEST")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="LATEST"):
        ck.save_checkpoint(tmp_path, 2, m, _state(2))
    monkeypatch.undo()
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path)).step == 1


def test_keep_prunes_old(tmp_path):
    m = _model(0)
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, m, _state(step), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step-000003", "step-000004"]


@pytest.mark.parametrize("damage", ["truncate-weights", "garbage-state", "no-meta", "bad-pointer"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    m = _model(0)
    path = ck.save_checkpoint(tmp_path, 3, m, _state(3))
    if damage == "truncate-weights":
        f = path / "trainable.safetensors"
        f.write_bytes(f.read_bytes()[:20])
        match = "trainable.safetensors"
    elif damage == "garbage-state":
        (path / "state.pt").write_bytes(b"not a checkpoint")
        match = "state.pt"
    elif damage == "no-meta":
        (path / "meta.json").unlink()
        match = "meta.json missing"
    else:
        (tmp_path / "checkpoints" / "LATEST").write_text("step-999999\n")
        match = "corrupt checkpoint pointer"
    with pytest.raises(ValueError, match=match):
        ck.load_checkpoint(ck.latest_checkpoint(tmp_path))


def test_atomic_write_text_failure_keeps_old(tmp_path, monkeypatch):
    f = tmp_path / "config.json"
    ck.atomic_write_text(f, "old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("injected")))
    with pytest.raises(OSError):
        ck.atomic_write_text(f, "new")
    monkeypatch.undo()
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_rng_state_roundtrip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


def test_clean_interrupted_writes_removes_temps_and_puts_back_a_moved_aside_folder(tmp_path):
    import tempfile
    from pathlib import Path

    m = _model(0)
    ck.save_checkpoint(tmp_path, 1, m, _state(1))
    ckpts = tmp_path / "checkpoints"
    half = Path(tempfile.mkdtemp(prefix=".step-000002.", suffix=".tmp", dir=ckpts))
    (half / "trainable.safetensors").write_bytes(b"partial")
    pointer = Path(tempfile.mkstemp(prefix=".LATEST.", suffix=".tmp", dir=ckpts)[1])
    config_tmp = Path(tempfile.mkstemp(prefix=".config.json.", suffix=".tmp", dir=tmp_path)[1])
    # Killed between the two renames of a folder replacement: the adapter sits only in its ".old".
    aside = Path(tempfile.mkdtemp(prefix=".adapter.", suffix=".old", dir=tmp_path))
    (aside / "adapter_config.json").write_text("{}")
    # A ".old" whose folder is back in place is a leftover, and goes.
    (tmp_path / "model").mkdir()
    stale = Path(tempfile.mkdtemp(prefix=".model.", suffix=".old", dir=tmp_path))
    keep = tmp_path / ".hidden-by-the-user"
    keep.write_text("not ours")

    removed = ck.clean_interrupted_writes(tmp_path)
    assert sorted(removed) == sorted([half, pointer, config_tmp, stale])
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}" and not aside.exists()
    assert keep.exists()
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path)).step == 1


@pytest.mark.parametrize("failure", ["enospc", "torch-zip-writer"])
def test_a_failed_write_names_the_checkpoint(tmp_path, monkeypatch, failure):
    """A full disk reaches us as OSError(ENOSPC) from our own writes, or as torch.save's
    RuntimeError from its zip writer: either way an OSError naming the checkpoint."""
    import errno

    m = _model(0)
    ck.save_checkpoint(tmp_path, 1, m, _state(1))

    def full(*args, **kwargs):
        if failure == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(ck.CheckpointWriteError) as caught:
        ck.save_checkpoint(tmp_path, 2, m, _state(2))
    message = str(caught.value)
    assert str(tmp_path / "checkpoints" / "step-000002") in message and "--resume" in message
    assert ("No space left on device" in message) == (failure == "enospc"), message
    assert "\n" not in message
    monkeypatch.undo()
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path)).step == 1
