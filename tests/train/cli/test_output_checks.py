"""Every command that writes results checks its output folder before the first model loads: an
--out below a file is one line and exit 2, with no model loaded (issue 14: no lost work)."""
import pytest

from helpers.patching import replace_everywhere

import lora_core.train.cli as cli
from lora_core.models import load_hf_directory, load_model


@pytest.fixture
def no_model_loads(monkeypatch):
    def fail(*a, **k):
        pytest.fail("a model was loaded before the output folder was checked")

    for function in (load_model, load_hf_directory):
        assert replace_everywhere(monkeypatch, function, fail), function.__name__


@pytest.mark.parametrize("command", [
    ["train", "--max-steps", "1"],
    ["eval"],
    ["demo"],
    ["reproduce", "--preset", "paper-small"],
    ["merge", "--model", "smollm2-135m-instruct", "--adapter", "ADAPTER"],
    ["overlap", "--model", "smollm2-135m-instruct", "--adapter", "ADAPTER", "--k", "4"],
])
def test_an_out_below_a_file_is_refused_before_any_model_loads(tmp_path, capsys, no_model_loads, command):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    argv = [str(adapter) if a == "ADAPTER" else a for a in command] + ["--out", str(afile / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "afile" in err and "Traceback" not in err
    assert not (afile.parent / "out").exists()


def test_check_output_dir_accepts_new_and_existing_folders(tmp_path):
    from lora_core.train.cli._paths import check_output_dir

    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists(), "checking creates nothing"
    assert check_output_dir(tmp_path) == tmp_path
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "f")
