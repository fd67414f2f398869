"""`lora-core reproduce` at the command line: a bad preset is one line naming the file and key,
--estimate-only prints the plan and the estimate and writes nothing, and a tiny grid runs to its
report and claims lines."""
import pytest
import yaml

from helpers.tiny_models import tiny_model
from helpers.training import model_vocab
from lora_core.train.cli import main
from lora_core.train.repro import runner

pytestmark = pytest.mark.usefixtures("single_thread")


def test_bad_preset_file_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "model": "m", "arms": [{"name": "base", "kind": "base", "sedes": [1]}],
                                    "eval": {"suite": "quick"}, "claims": {}}))
    assert main(["reproduce", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "arms[0].sedes" in err and "Traceback" not in err
    assert main(["reproduce", "--preset", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _tiny_yaml(tmp_path):
    """The runner tests' tiny grid (tests/helpers/repro_grid.py) written as a preset file."""
    from helpers.repro_grid import tiny_raw

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()))
    return path


def test_estimate_only_then_a_tiny_grid(tmp_path, tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_default_load", lambda name: (tiny_model(model_vocab(tokenizer)), tokenizer))
    config, out = _tiny_yaml(tmp_path), tmp_path / "grid"
    assert main(["reproduce", "--config", str(config), "--out", str(out), "--estimate-only"]) == 0
    printed = capsys.readouterr().out
    assert "grid: 3 runs (0 already done)" in printed and "estimate: about" in printed
    assert not out.exists()
    assert main(["reproduce", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(a) lora reaches the safety of full" in printed and (out / "report.md").is_file()
