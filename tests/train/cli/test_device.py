"""--device / --dtype on every command (train/cli/_device.py) and `train --nproc` (train/cli/_launch.py)."""
import pytest
import torch

from lora_core.train.cli import build_parser, main
from lora_core.train.cli import _device

COMMANDS_WITH_BOTH = ("chat", "eval", "overlap", "demo", "train")


def _subparser(name):
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if hasattr(a, "choices")).choices[name]


def _option_strings(name) -> set[str]:
    return {s for a in _subparser(name)._actions for s in a.option_strings}


@pytest.mark.parametrize("name", COMMANDS_WITH_BOTH)
def test_every_model_command_takes_device_and_dtype(name):
    assert {"--device", "--dtype"} <= _option_strings(name)


@pytest.mark.parametrize("name", ["merge", "reproduce"])
def test_merge_and_reproduce_take_device(name):
    # merge's --dtype is the export's (default: the source's); reproduce's arms keep their preset dtype.
    assert "--device" in _option_strings(name)


def test_cpu_default_dtype_follows_the_bf16_units(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("LORA_CORE_CPU_BF16", "1")
    assert _device.default_dtype(cpu) == "bfloat16" and _device.resolve_dtype(None, cpu) is torch.bfloat16
    monkeypatch.setenv("LORA_CORE_CPU_BF16", "0")
    assert _device.default_dtype(cpu) == "float32" and _device.resolve_dtype(None, cpu) is torch.float32
    assert _device.resolve_dtype("bfloat16", cpu) is torch.bfloat16  # typed wins


def test_default_device_is_cuda_only_when_visible():
    assert _device.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("text, message", [
    ("tpu", "expected cpu, cuda or cuda:N"),
    ("mps", "only cpu and cuda are supported"),
    ("cuda:99", "no CUDA device is visible" if not torch.cuda.is_available() else "CUDA device(s)"),
])
def test_a_device_this_machine_lacks_is_one_line(text, message, capsys):
    code = main(["chat", "--device", text, "hello"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("env, expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_chat_loads_straight_into_the_default_dtype(monkeypatch, env, expected):
    seen = {}

    def fake_load(source, dtype=None, device="cpu"):
        seen.update(dtype=dtype, device=torch.device(device))
        raise ValueError("stop after the load call")

    from lora_core.train.cli import chat

    monkeypatch.setenv("LORA_CORE_CPU_BF16", env)
    monkeypatch.setattr(chat, "load_model", fake_load)
    assert main(["chat", "--device", "cpu", "hello"]) == 2
    assert seen == {"dtype": expected, "device": torch.device("cpu")}


@pytest.mark.parametrize("env, expected", [("1", "bfloat16"), ("0", "float32")])
def test_train_dtype_defaults_by_hardware_and_a_typed_one_wins(monkeypatch, env, expected):
    from lora_core.train.cli.train import config_from_args

    monkeypatch.setenv("LORA_CORE_CPU_BF16", env)
    parser = _subparser("train")
    assert config_from_args(parser.parse_args([]), torch.device("cpu")).optim.dtype == expected
    typed = parser.parse_args(["--dtype", "float32"])
    assert config_from_args(typed, torch.device("cpu")).optim.dtype == "float32"


def test_train_nproc_refuses_a_batch_that_does_not_split_before_starting_torchrun(monkeypatch, capsys, tmp_path):
    import subprocess

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("torchrun was started"))
    code = main(["train", "--nproc", "2", "--batch-size", "3", "--device", "cpu", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "--batch-size 3 does not split over 2 processes" in err and "Traceback" not in err


def test_train_nproc_starts_torchrun_with_the_same_command(monkeypatch, tmp_path):
    import subprocess

    calls = []

    class Done:
        returncode = 0

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda command, env=None: calls.append(command) or Done())
    argv = ["train", "--nproc", "2", "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    (command,) = calls
    assert command[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            "-m", "lora_core.train.cli"]
    assert command[7:] == ["train", "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "r")]


def test_nproc_inside_torchrun_must_agree(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["train", "--nproc", "2", "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    assert "leave --nproc out" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_model_loads_in_bf16_and_lora_runs_triton(tmp_path):
    from helpers.checkpoints import write_tiny_chat_checkpoint
    from lora_core.kernels.dispatch import resolve_backend
    from lora_core import LoRAConfig, inject_lora
    from lora_core.models import load_model

    path = write_tiny_chat_checkpoint(tmp_path / "ckpt")
    device, dtype = _device.placement(_subparser("chat").parse_args(["hi"]))
    model, _ = load_model(path, dtype=dtype, device=device)
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in model.parameters())
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    x = torch.randn(2, 3, model.config.hidden_size, device=device, dtype=dtype)
    assert resolve_backend(None, x) == "triton"
    assert model(torch.tensor([[1, 2, 3]], device=device)).isfinite().all()
