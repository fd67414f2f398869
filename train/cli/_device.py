"""--device and --dtype for every command that loads a model: one spelling, one default rule.

Defaults, decided when the command runs (never at --help, which must not import torch):
  --device  cuda when a CUDA device is visible, else cpu
  --dtype   bfloat16 on a GPU with bf16 support, or on a CPU with bf16 units (AVX512-BF16 or
            AMX-BF16, read by kernels.cpu_caps); else float32, since emulated bf16 matmuls are far
            slower than fp32 (kernels/cpu_caps.py has the figures)
The model then loads straight into that dtype on that device (models.hf_loader), and on CUDA the
LoRA layers run the Triton kernels (kernels.dispatch picks them for CUDA tensors).

The flags record themselves as typed (train.cli._options.given_fields), so `train --resume` can
tell a typed --dtype from a default one.
This module's name starts with "_", so the CLI does not take it for a command.
"""
from __future__ import annotations

import torch

from lora_core.kernels.cpu_caps import native_bf16 as cpu_native_bf16
from lora_core.train.cli._options import _STORE

DTYPES = ("float32", "bfloat16")


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default=None, action=_STORE,
                        help="cpu, cuda or cuda:N (default: cuda when a CUDA device is visible, else cpu)")


def add_dtype_argument(parser, help: str | None = None) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=None, action=_STORE,
                        help=help or "dtype the weights load and compute in (default: bfloat16 on a GPU or "
                        "on a CPU with bf16 units, else float32)")


def add_device_arguments(parser, dtype_help: str | None = None) -> None:
    add_device_argument(parser)
    add_dtype_argument(parser, dtype_help)


def resolve_device(name: str | None):
    """-> torch.device for a --device value (None: cuda when visible, else cpu); a device this
    machine lacks is refused in one line."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name.strip())
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible to this torch "
                         f"(torch {torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def native_bf16(device) -> bool:
    """Whether bf16 matmuls run on bf16 hardware on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()

    return cpu_native_bf16()


def default_dtype(device) -> str:
    return "bfloat16" if native_bf16(device) else "float32"


def resolve_dtype(name: str | None, device):
    """-> torch.dtype for a --dtype value (None: default_dtype(device))."""
    return getattr(torch, name or default_dtype(device))


def placement(args):
    """(torch.device, torch.dtype) of a command's --device/--dtype."""
    device = resolve_device(getattr(args, "device", None))
    return device, resolve_dtype(getattr(args, "dtype", None), device)
