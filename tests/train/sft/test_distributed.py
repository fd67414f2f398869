"""FSDP2 training under torchrun, two processes with gloo on the CPU, against one process.

Each run is tests/train/sft/train_child.py (a tiny Llama, the refusal set of helpers.training),
started either plainly or by `torchrun --standalone --nproc-per-node 2`. The two-process run splits
every micro-batch of 2 into one row per process; its losses, adapter and full checkpoint must match
the single process's within float32 rounding (the reductions run in another order), and its
output files must be the same files. Dropout is 0: masks drawn per process cannot repeat one
process's. Resuming a two-process run from its checkpoint repeats its losses and adapter exactly.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_core.train.sft import distributed

CHILD = Path(__file__).with_name("train_child.py")
ROOT = Path(__file__).resolve().parents[3]
# lr 1e-2 over 4 steps moves a tiny model far enough that a wrong gradient scale (FSDP's average
# over ranks left in, or a rank's rows counted twice) shows as a loss far outside the tolerance.
BASE = {"max_steps": 4, "dropout": 0.0, "scheduler": "constant", "save_every": 2, "keep_checkpoints": 0}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(spec: dict, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, str(CHILD), json.dumps(spec)], capture_output=True, text=True,
                          env=_env(), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _assert_close_tensors(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), f"{what}: tensor names differ"
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        # float32 rounding of a few steps' sums in another order: 1e-5 of the tensor's scale.
        tol = 1e-5 * max(1.0, float(tensor.abs().max()))
        err = float((ours[name] - tensor).abs().max())
        assert err <= tol, f"{what} {name}: max error {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from helpers.tokenizers import make_tokenizer_dir

    path, _ = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    return str(path)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_reach_the_single_process_losses_and_files(tmp_path, tokenizer_dir, method):
    config = {**BASE, "method": method, **({"lr": 1e-3} if method == "full" else {})}
    one, two = tmp_path / "one", tmp_path / "two"
    _run({"tokenizer": tokenizer_dir, "config": {**config, "out": str(one)}})
    _run({"tokenizer": tokenizer_dir, "config": {**config, "out": str(two)}}, nproc=2)

    single, double = _losses(one), _losses(two)
    assert len(double) == len(single) == 4
    assert single[-1] < single[0] - 0.1, f"the reference run did not learn: {single}"
    assert max(abs(a - b) / abs(b) for a, b in zip(double, single)) < 1e-5, f"{double} vs {single}"

    final = "adapter" if method == "lora" else "model"
    assert sorted(p.name for p in (two / final).iterdir()) == sorted(p.name for p in (one / final).iterdir())
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    _assert_close_tensors(load_file(str(two / final / weights)), load_file(str(one / final / weights)), final)
    for path in (one / final).iterdir():
        if path.suffix == ".json":
            assert (two / final / path.name).read_text() == path.read_text(), f"{final}/{path.name} differs"
    # The checkpoint holds the gathered trainable tensors, as one process writes them.
    step = "checkpoints/step-000004/trainable.safetensors"
    _assert_close_tensors(load_file(str(two / step)), load_file(str(one / step)), "checkpoint")
    assert torch.load(two / "checkpoints/step-000004/state.pt", weights_only=True)["world_size"] == 2
    # Rank 0 alone wrote: one line per step, no stray files from rank 1.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_two_process_resume_on_the_same_world_size_is_exact(tmp_path, tokenizer_dir):
    """The uninterrupted two-process run, and the same run resumed from its step-2 checkpoint."""
    run = tmp_path / "run"
    _run({"tokenizer": tokenizer_dir, "config": {**BASE, "out": str(run)}}, nproc=2)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for leftover in ("adapter", "summary.json", "checkpoints/step-000004"):
        path = resumed / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (resumed / "checkpoints" / "LATEST").write_text("step-000002\n")

    proc = _run({"tokenizer": tokenizer_dir, "config": {**BASE, "out": str(resumed)}, "resume": True}, nproc=2)
    assert "resumed from" in proc.stdout and proc.stdout.count("resumed from") == 1, proc.stdout
    assert _losses(resumed) == _losses(run)
    a, b = (r / "adapter" / "adapter_model.safetensors" for r in (run, resumed))
    assert a.read_bytes() == b.read_bytes(), "the resumed adapter differs from the uninterrupted run's"


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path, tokenizer_dir):
    run = tmp_path / "run"
    _run({"tokenizer": tokenizer_dir, "config": {**BASE, "max_steps": 2, "out": str(run)}}, nproc=2)
    proc = subprocess.run([sys.executable, str(CHILD), json.dumps(
        {"tokenizer": tokenizer_dir, "config": {**BASE, "out": str(run)}, "resume": True})],
        capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)
    assert proc.returncode != 0
    assert "was written by 2 process(es); resume it with 2 (this run has 1)" in proc.stderr


# --- bad input, in-process: no group is started ---------------------------------------------

def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    from lora_core.train.sft.config import TrainConfig

    two = distributed.Distributed(rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"--batch-size 3 does not split over 2 processes"):
        two.check_config(TrainConfig.from_flat(batch_size=3))
    two.check_config(TrainConfig.from_flat(batch_size=4))
    distributed.Distributed().check_config(TrainConfig.from_flat(batch_size=3))  # one process: anything


def test_data_whose_last_micro_batch_does_not_split_is_refused():
    two = distributed.Distributed(rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"9 examples in micro-batches of 4 leave a last micro-batch of 1.*--limit 8"):
        two.check_data(9, 4)
    two.check_data(10, 4)  # a last micro-batch of 2 splits into 1 + 1
    distributed.Distributed().check_data(9, 4)


def test_features_that_read_whole_weights_are_refused_under_torchrun():
    from lora_core.train.sft.config import TrainConfig

    two = distributed.Distributed(rank=0, world_size=2)
    for field, flag in (("ortho_beta", "--ortho-beta"), ("eval_every", "--eval-every")):
        with pytest.raises(ValueError, match=f"{flag} is not supported under torchrun"):
            two.check_config(TrainConfig.from_flat(batch_size=2, **{field: 1}))


def test_a_missing_backend_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs the gloo backend, and this torch build has none"):
        distributed.from_environment("cpu")


def test_one_process_is_not_a_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = distributed.from_environment("cpu")
    assert not dist.active and dist.is_main and dist.grad_scale == 1.0


def test_local_rows_cut_a_batch_into_equal_blocks():
    batch = {"input_ids": torch.arange(12).reshape(4, 3), "labels": torch.arange(12).reshape(4, 3)}
    blocks = [distributed.Distributed(rank=r, world_size=2).local_rows(batch) for r in (0, 1)]
    assert torch.equal(torch.cat([b["input_ids"] for b in blocks]), batch["input_ids"])
    assert all(b["labels"].shape == (2, 3) for b in blocks)
