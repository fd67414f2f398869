"""`lora-core eval` end to end on a tiny real-format checkpoint, judged by a guard model loaded
through our decoder (the plumbing a Llama-Guard-3 user relies on), with sampling flags; and bad
sampling flags refused before a model loads."""
import json

import pytest

from helpers.patching import replace_everywhere

import lora_core.train.cli as cli
from lora_core.models import load_model
from helpers.checkpoints import write_tiny_chat_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def test_eval_with_a_guard_model_and_sampling(tmp_path, capsys):
    ckpt = write_tiny_chat_checkpoint(tmp_path / "model")
    out = tmp_path / "res"
    assert cli.main(["eval", "--model", str(ckpt), "--guard", str(ckpt), "--suite", "quick", "--limit", "1",
                     "--samples", "2", "--temperature", "0.8", "--max-new-tokens", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["judge"] == "guard" and results["meta"]["guard"] == str(ckpt)
    assert results["meta"]["suite"] == "quick"
    assert results["meta"]["sampling"] == {"k": 2, "temperature": 0.8, "top_p": 0.95}
    assert results["metrics"]["safety.strongreject.refusal_rate"]["n"] == 1
    assert results["metrics"]["reasoning.gsm8k.pass_at_1_sampled"]["samples"] == 2
    # The guard's own error against people is measured on every run, whatever the guard is.
    assert results["judge"]["name"] == "guard" and results["judge"]["human_agreement"]["accuracy"]["n"] == 105
    assert "against human labels" in (out / "results.md").read_text()
    assert (out / "results.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("flags, named", [(["--samples", "-1"], "sampling k"),
                                          (["--samples", "2", "--top-p", "1.5"], "top_p"),
                                          (["--samples", "2", "--temperature", "0"], "temperature")])
def test_bad_sampling_flags_are_refused_before_loading(tmp_path, monkeypatch, capsys, flags, named):
    replace_everywhere(monkeypatch, load_model, lambda *a, **k: pytest.fail("loaded a model first"))
    assert cli.main(["eval", "--model", "m", "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_unknown_suite_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--suite", "medium", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2 and "invalid choice: 'medium'" in capsys.readouterr().err


def test_a_missing_guard_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    replace_everywhere(monkeypatch, load_model, lambda *a, **k: pytest.fail("loaded a model first"))
    assert cli.main(["eval", "--guard", str(tmp_path / "no-guard"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no-guard" in err and "Traceback" not in err
