"""`lora-core overlap --svd-cache FILE`: a damaged cache file or a folder in its place is a
one-line error naming it, given before any model is loaded (it used to be a SafetensorError
traceback)."""
import pytest

from helpers.patching import replace_everywhere

import lora_core.train.cli as cli
from lora_core.models import load_model


@pytest.fixture
def no_model_load(monkeypatch):
    assert replace_everywhere(monkeypatch, load_model, lambda *a, **k: pytest.fail("loaded a model first"))


def _overlap(tmp_path, cache):
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    return cli.main(["overlap", "--model", "m", "--adapter", str(adapter), "--k", "2",
                     "--out", str(tmp_path / "out"), "--svd-cache", str(cache)])


def test_corrupt_svd_cache_is_one_line_naming_the_file(tmp_path, no_model_load, capsys):
    bad = tmp_path / "svd.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert _overlap(tmp_path, bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "Traceback" not in err
    assert "not a readable safetensors file" in err


def test_svd_cache_that_is_a_folder_is_refused_before_the_work(tmp_path, no_model_load, capsys):
    folder = tmp_path / "svd-folder"
    folder.mkdir()
    assert _overlap(tmp_path, folder) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(folder) in err and "not a file" in err
