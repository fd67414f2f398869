"""`lora-core train` from the command line: --resume against the stored config, moved and copied
runs, bad numbers refused by name, a full disk and --debug."""
import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from helpers.training import write_cli_inputs
from lora_core.train.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer):
    """A tiny HF model directory and a user JSONL of refusals."""
    return write_cli_inputs(tmp_path_factory.mktemp("inputs"), tokenizer)


@pytest.fixture
def train_args(inputs, monkeypatch):
    """`lora-core train` arguments for a 2-step run on the tiny model (no evaluation set pulled)."""
    from lora_core.train.data import refusal

    monkeypatch.setattr(refusal, "held_out_prompts", lambda names: ([], list(names)))
    model_dir, data = inputs

    def args(out, *more):
        return ["train", "--model", str(model_dir), "--data", str(data), "--rank", "2", "--lr", "1e-3",
                "--max-steps", "2", "--batch-size", "2", "--save-every", "1", "--out", str(out), *more]
    return args


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_refuses_changed_flags_by_name_and_applies_a_larger_max_steps(tmp_path, train_args, capsys):
    run = tmp_path / "run"
    assert main(train_args(run)) == 0
    capsys.readouterr()
    # Before: --lr and --rank given with --resume were dropped without a word.
    assert main(train_args(run, "--resume", "--lr", "0.5", "--rank", "4")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr 0.5 (the run has 0.001)" in err and "--rank 4 (the run has 2)" in err
    assert main(train_args(run, "--resume", "--max-steps", "1")) == 2
    assert "--max-steps 1" in capsys.readouterr().err
    # Flags left at their defaults are not compared: --resume alone continues with the stored run.
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "applying --max-steps 4 (was 2)" in out
    assert _steps(run) == [1, 2, 3, 4]
    assert json.loads((run / "config.json").read_text())["max_steps"] == 4


def test_a_copied_run_resumes_where_it_is_and_leaves_the_original_alone(tmp_path, train_args, monkeypatch, capsys):
    orig, copy = tmp_path / "orig", tmp_path / "elsewhere" / "copy"
    assert main(train_args(orig)) == 0
    shutil.copytree(orig, copy)
    before = _files(orig)
    # From another working directory, so a path taken relative to the cwd would show up there.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["train", "--out", str(copy), "--resume", "--max-steps", "3"]) == 0
    assert _files(orig) == before, "resuming the copy changed the original run"
    assert _steps(copy) == [1, 2, 3] and (copy / "checkpoints" / "step-000003").is_dir()
    assert list(cwd.iterdir()) == [], "the resumed run wrote into the working directory"
    # Paths recorded inside the run are relative to it: summary.json's output survives a move.
    assert json.loads((copy / "summary.json").read_text())["output"] == "adapter"


@pytest.mark.parametrize("flag, value, match", [
    ("--save-every", "-1", "--save-every: must be >= 0, got -1"),
    ("--keep-checkpoints", "-2", "--keep-checkpoints: must be >= 0, got -2"),
    ("--eval-every", "-1", "--eval-every: must be >= 0, got -1"),
    ("--lr", "inf", "--lr: must be a finite number, got inf"),
    ("--lr", "nan", "--lr: must be a finite number, got nan"),
])
def test_bad_numbers_are_refused_by_name_before_any_work(tmp_path, train_args, capsys, flag, value, match):
    # --save-every -1 used to checkpoint every step (step % -1 == 0).
    run = tmp_path / "run"
    assert main(train_args(run) + [flag, value]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not run.exists()


@pytest.mark.parametrize("failure", ["os.replace", "torch.save", "adapter"])
def test_a_full_disk_during_a_checkpoint_is_one_line_naming_it(tmp_path, train_args, monkeypatch, capsys, failure):
    """ENOSPC from our own rename, or torch.save's RuntimeError from its zip writer (how torch
    reports a full disk): before, the first printed "(while writing)" and no file, the second a
    traceback. The final adapter, written after the last checkpoint, is named the same way."""
    import torch

    if failure in ("os.replace", "adapter"):
        real = os.replace
        target = "step-000002" if failure == "os.replace" else "adapter"

        def replace(src, dst):
            if Path(dst).name.startswith(target):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    else:
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if obj.get("step") == 2:
                raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
                                   "PytorchStreamWriter failed writing file data/0: file write failed")
            return real(obj, f, *args, **kwargs)
        monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    assert main(train_args(run)) == 2
    err = capsys.readouterr().err
    # Progress lines may come first (stderr is not a terminal here); the error is one line, last.
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("lora-core train: error: could not write ")
    named = run / "adapter" if failure == "adapter" else run / "checkpoints" / "step-000002"
    assert str(named) in last and "--resume" in last
    if failure != "torch.save":
        assert "No space left on device" in last
    latest = "step-000002" if failure == "adapter" else "step-000001"
    assert (run / "checkpoints" / "LATEST").read_text().strip() == latest


def test_debug_shows_the_traceback(tmp_path, train_args, capsys):
    args = train_args(tmp_path / "run", "--save-every", "-1")
    assert main(args) == 2 and "Traceback" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="--save-every"):
        main(["--debug", *args])
    with pytest.raises(ValueError, match="--save-every"):
        main([*args, "--debug"])



def test_a_run_started_with_relative_paths_resumes_from_another_directory(tmp_path, inputs, train_args,
                                                                           monkeypatch, capsys):
    """--model and --data given relative to where the run started: resuming from elsewhere used
    to look for them relative to the new working directory."""
    model_dir, data = inputs
    start = tmp_path / "start"
    shutil.copytree(model_dir, start / "tiny")
    shutil.copy(data, start / "data.jsonl")
    monkeypatch.chdir(start)
    args = train_args(tmp_path / "run")
    args[args.index("--model") + 1], args[args.index("--data") + 1] = "tiny", "data.jsonl"
    assert main(args) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "3"]) == 0, \
        capsys.readouterr().err
    assert _steps(tmp_path / "run") == [1, 2, 3]
