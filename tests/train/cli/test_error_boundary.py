"""The CLI's one error boundary: expected failures and Ctrl-C become one line and an exit code,
never a traceback; `eval` refuses an unwritable --out before it evaluates anything."""
import errno
import os

import pytest

from helpers.patching import replace_everywhere

import lora_core.train.cli as cli
from lora_core.models import load_model


@pytest.fixture
def command(monkeypatch):
    """Run `lora-core pull --list` with its work replaced by `fail` (a function raising something)."""
    import lora_core.train.cli.pull as pull

    def run_with(fail):
        monkeypatch.setattr(pull, "run", lambda args: fail())
        return cli.main(["pull", "--list"])
    return run_with


def test_ctrl_c_is_one_line_and_exit_130(command, capsys):
    def interrupt():
        raise KeyboardInterrupt
    assert command(interrupt) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


def test_a_deferred_training_stop_names_its_step(command, capsys):
    from lora_core.train.sft.graceful_stop import StopRequested

    def stop():
        raise StopRequested("training stopped after step 3 of 6, which is checkpointed")
    assert command(stop) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "after step 3 of 6" in err and "Traceback" not in err


def test_a_full_disk_names_the_file(command, capsys):
    def disk_full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/checkpoints/step-000002")
    assert command(disk_full) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step-000002" in err and "Traceback" not in err


def test_existing_file_is_a_one_line_error(command, capsys):
    def exists():
        raise FileExistsError("runs/x already exists and is not empty")
    assert command(exists) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_eval_refuses_a_read_only_out_before_loading_anything(tmp_path, monkeypatch, capsys):
    replace_everywhere(monkeypatch, load_model, lambda *a, **k: pytest.fail("loaded a model first"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert cli.main(["eval", "--model", "m", "--out", str(locked / "res")]) == 2
    finally:
        locked.chmod(0o700)
    assert "not writable" in capsys.readouterr().err


def test_eval_refuses_an_out_below_a_file_before_loading_anything(tmp_path, monkeypatch, capsys):
    replace_everywhere(monkeypatch, load_model, lambda *a, **k: pytest.fail("loaded a model first"))
    (tmp_path / "file").write_text("x")
    assert cli.main(["eval", "--model", "m", "--out", str(tmp_path / "file" / "res")]) == 2
    assert "not writable" in capsys.readouterr().err
