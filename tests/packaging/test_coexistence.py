"""Our wheel installs one import name, and works beside the newest transformers.

transformers 5 depends on Hugging Face's `kernels` package. When ours was a top-level `kernels`
too, `lora_core`'s LoRA forward imported theirs (AttributeError: no `lora_linear`) in any venv
holding both, and `python -m pytest` failed at collection. These tests build our wheel from the
working tree, install it into a fresh venv beside the newest transformers and `kernels`, and run
there, from a folder outside the repository:
(a) a LoRA forward and backward, bit for bit the numbers of the repository's own venv;
(b) `import kernels` gives Hugging Face's package, and transformers loads a tiny checkpoint (its
    logits agree with our decoder's on the same weights);
(c) `lora-core chat --adapter` on that checkpoint, the same answer as in the repository's venv.

The venv needs PyPI (as the README's install command does). It is cached under the lora-core cache
(`LORA_CORE_CACHE`, default ~/.cache/lora-core) because building it costs minutes, and refreshed
on every run (`pip install --upgrade transformers kernels`), so it always meets the newest release.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import write_tiny_chat_checkpoint
from safetensors.torch import load_file

import lora_core
from lora_core.common.fetch import cache_dir

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("coexist_probe.py")
# What setup.py installs (the four layers); everything else in the repository stays out of the wheel.
SOURCES = ("setup.py", "lora_core", "kernels", "models", "train")
TORCH = torch.__version__.split("+")[0]
VENV = f"newest-transformers-py{sys.version_info[0]}{sys.version_info[1]}-torch{TORCH}"


def _run(command, cwd, timeout=900) -> subprocess.CompletedProcess:
    # No PYTHONPATH or venv of ours leaks into the child: it sees only its own environment.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Our wheel, built from a copy of the working tree's sources (a stale build/ in the repository
    would otherwise leak deleted modules into it)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, src / name)
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src], cwd=out)
    (built,) = out.glob("lora_core-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_python(wheel) -> Path:
    """The python of a venv holding our wheel beside the newest transformers and kernels."""
    root = cache_dir() / "test-venvs" / VENV
    python = root / "bin" / "python"
    # Built in place (a venv's scripts name its path, so it cannot be built elsewhere and moved);
    # `ready` is written last, so a build that was killed is started again.
    if not (root / "ready").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", root], cwd=root.parent)
        # The CPU torch this repository's venv runs, so (a) can demand identical bits.
        _run([python, "-m", "pip", "install", "-q", f"torch=={TORCH}"], cwd=root)
        (root / "ready").write_text("")
    _run([python, "-m", "pip", "install", "-q", "--upgrade", "transformers", "kernels", wheel], cwd=root)
    _run([python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel], cwd=root)
    return python


def test_the_wheel_holds_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = next((t for t in top if t.endswith(".dist-info")), "")
    assert top == {"lora_core", dist_info} and dist_info.startswith("lora_core-"), top
    # The layers sit inside the namespace, with the data files they read at run time.
    for inside in ("lora_core/kernels/dispatch.py", "lora_core/models/decoder.py", "lora_core/train/cli/__init__.py",
                   "lora_core/train/data/benign_eval.jsonl", "lora_core/train/repro/presets/paper-small.yaml"):
        assert inside in names, f"{inside} is missing from {wheel.name}"
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt")
    assert b"lora-core = lora_core.train.cli:main" in entry_points


def test_a_lora_layer_beside_the_newest_transformers(fresh_python, tmp_path):
    checkpoint = write_tiny_chat_checkpoint(tmp_path / "tiny")
    _run([sys.executable, PROBE, tmp_path / "here"], cwd=tmp_path)
    _run([fresh_python, PROBE, tmp_path / "fresh", checkpoint], cwd=tmp_path)

    here, fresh = load_file(tmp_path / "here" / "lora.safetensors"), load_file(tmp_path / "fresh" / "lora.safetensors")
    for name in here:
        diff = (here[name] - fresh[name]).abs().max().item()
        assert torch.equal(here[name], fresh[name]), f"{name}: the fresh venv differs by up to {diff:g}"

    where = json.loads((tmp_path / "fresh" / "where.json").read_text())
    site = Path(fresh_python).parent.parent
    for name in ("lora_core", "lora_core.kernels", "kernels"):
        assert Path(where[name]).is_relative_to(site), f"{name} came from {where[name]}, not the fresh venv"
    assert not Path(where["kernels"]).is_relative_to(REPO)
    assert Path(where["kernels"]).parent.name == "kernels" and "site-packages" in where["kernels"]
    # A tiny fp32 model: the two implementations differ by float32 rounding only.
    assert where["transformers_logits_max_diff"] < 1e-4, where["transformers_logits_max_diff"]


def test_chat_with_an_adapter_beside_the_newest_transformers(fresh_python, tmp_path):
    from lora_core.models import load_model

    checkpoint = write_tiny_chat_checkpoint(tmp_path / "tiny")
    model, _ = load_model(str(checkpoint), dtype=torch.float32, device="cpu")
    lora_core.inject_lora(model, lora_core.LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for module in lora_core.lora_modules(model).values():
            module.lora_B.normal_(0.0, 0.5)
    adapter = lora_core.save_adapter(model, tmp_path / "adapter", base_model=str(checkpoint))

    chat = ["chat", "--model", checkpoint, "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "12",
            "How do I bake bread?"]
    fresh_cli = Path(fresh_python).parent / "lora-core"
    base = _run([fresh_cli, *chat], cwd=tmp_path).stdout
    fresh = _run([fresh_cli, *chat, "--adapter", adapter], cwd=tmp_path).stdout
    here = _run([sys.executable, "-m", "lora_core.train.cli", *chat, "--adapter", adapter], cwd=tmp_path).stdout
    assert fresh == here, f"fresh venv answered {fresh!r}, the repository's venv {here!r}"
    assert fresh.strip() and fresh != base, f"the adapter changed nothing: {fresh!r}"
