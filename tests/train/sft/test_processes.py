"""Training in separate processes (tests/train/sft/train_child.py): the same command twice gives
the same adapter files byte for byte, and a run killed inside a checkpoint write resumes to the
uninterrupted run's losses exactly, with the previous checkpoint intact and no temp folder left;
a Ctrl-C or SIGTERM mid-step finishes and checkpoints that step, and the resumed run matches."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lora_core.train.sft import checkpoint as ck

CHILD = Path(__file__).with_name("train_child.py")


def _run_child(spec: dict) -> subprocess.CompletedProcess:
    # One thread everywhere: bit-identical floats need the same reduction order in both runs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(CHILD), json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_the_same_command_twice_gives_identical_adapter_files(tmp_path, tokenizer):
    # dropout > 0: the masks come from the seeded generators too.
    config = {"max_steps": 3, "dropout": 0.1, "seed": 5}
    for name in ("a", "b"):
        _ok(_run_child({"tokenizer": tokenizer.name, "config": {**config, "out": str(tmp_path / name)}}))
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        a, b = (tmp_path / n / "adapter" / file for n in ("a", "b"))
        assert a.read_bytes() == b.read_bytes(), f"{file} differs between two identical runs"
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_a_kill_inside_a_checkpoint_write_resumes_to_the_same_losses(tmp_path, tokenizer):
    # keep_checkpoints 0 keeps them all, so the killed run's step 2 can be compared byte for byte.
    config = {"max_steps": 6, "save_every": 2, "keep_checkpoints": 0, "dropout": 0.1, "batch_size": 3}
    full, killed = tmp_path / "full", tmp_path / "killed"
    _ok(_run_child({"tokenizer": tokenizer.name, "config": {**config, "out": str(full)}}))

    proc = _run_child({"tokenizer": tokenizer.name, "config": {**config, "out": str(killed)},
                       "kill_in_save_of_step": 4})
    assert proc.returncode == -signal.SIGKILL, f"the child was not killed:\n{proc.stdout}\n{proc.stderr}"
    checkpoints = killed / "checkpoints"
    orphans = _hidden(checkpoints)
    assert any(n.startswith(".step-000004.") for n in orphans), f"no half-written checkpoint: {orphans}"
    assert (checkpoints / "LATEST").read_text().strip() == "step-000002"
    for file in ("trainable.safetensors", "state.pt", "meta.json"):
        ours, theirs = checkpoints / "step-000002" / file, full / "checkpoints" / "step-000002" / file
        assert ours.read_bytes() == theirs.read_bytes(), f"step-000002/{file} differs from the uninterrupted run's"

    resumed = _ok(_run_child({"tokenizer": tokenizer.name, "config": {**config, "out": str(killed)},
                              "resume": True}))
    assert "removed" in resumed.stdout and ".step-000004." in resumed.stdout
    assert _hidden(checkpoints) == [] and _hidden(killed) == [], "a temp file or folder was left behind"
    assert ck.load_checkpoint(checkpoints / "step-000002").step == 2
    assert _losses(killed) == _losses(full), f"resumed {_losses(killed)} != uninterrupted {_losses(full)}"
    a, b = (run / "adapter" / "adapter_model.safetensors" for run in (full, killed))
    assert a.read_bytes() == b.read_bytes()



STOP_CONFIG = {"max_steps": 6, "save_every": 0, "dropout": 0.1, "batch_size": 3}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer) -> Path:
    """The run the stopped-and-resumed ones must match, trained once for both signals."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    _ok(_run_child({"tokenizer": tokenizer.name, "config": {**STOP_CONFIG, "out": str(run)}}))
    return run


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_stop_mid_step_checkpoints_that_step_and_resumes_to_the_same_run(tmp_path, tokenizer, uninterrupted,
                                                                            signal_name):
    """No periodic checkpoints (save_every 0): a Ctrl-C or SIGTERM in the middle of step 3 finishes
    that step, checkpoints it and stops; the resumed run then matches the uninterrupted one."""
    stopped = tmp_path / "stopped"
    proc = _run_child({"tokenizer": tokenizer.name, "config": {**STOP_CONFIG, "out": str(stopped)},
                       "signal_in_step": [3, signal_name]})
    assert proc.returncode == 130, f"the child did not stop cleanly ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "stopped after step 3 of 6" in proc.stdout and "stopping after the step in flight" in proc.stdout
    assert (stopped / "checkpoints" / "LATEST").read_text().strip() == "step-000003"
    assert [s for s, _ in _losses(stopped)] == [1, 2, 3]
    _ok(_run_child({"tokenizer": tokenizer.name, "config": {**STOP_CONFIG, "out": str(stopped)}, "resume": True}))
    assert _losses(stopped) == _losses(uninterrupted)
    a, b = (run / "adapter" / "adapter_model.safetensors" for run in (uninterrupted, stopped))
    assert a.read_bytes() == b.read_bytes()
