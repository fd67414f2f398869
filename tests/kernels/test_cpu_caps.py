"""CPU capability detection and the half-precision route it picks for the torch path.

Reference for detection: the flags line of /proc/cpuinfo read here independently. Reference for
the route: the aten ops the kernel dispatches (recorded with a TorchDispatchMode), and the
result against float64.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_core.kernels import lora_linear
from lora_core.kernels.cpu_caps import ENV_VAR, cpu_caps, native_bf16
from lora_core.train.cli._device import default_dtype


def _proc_flags() -> set[str]:
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return set()
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def test_detection_matches_cpuinfo(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    flags = _proc_flags()
    caps = cpu_caps()
    assert caps.native_bf16 == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert set(caps.flags) <= flags
    assert caps.torch_capability == torch.backends.cpu.get_cpu_capability()
    assert default_dtype(torch.device("cpu")) == ("bfloat16" if caps.native_bf16 else "float32")
    assert set(caps.as_json()) >= {"model", "torch_capability", "flags", "native_bf16"}


def test_override_and_bad_value(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0")
    assert not native_bf16() and default_dtype(torch.device("cpu")) == "float32"
    monkeypatch.setenv(ENV_VAR, "1")
    assert native_bf16() and default_dtype(torch.device("cpu")) == "bfloat16"
    monkeypatch.setenv(ENV_VAR, "yes")
    with pytest.raises(ValueError, match=r"LORA_CORE_CPU_BF16='yes'.*0 or 1"):
        native_bf16()


class _Ops(TorchDispatchMode):
    """Records (op name, output dtype, output numel) of every aten call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.calls.append((str(func.overloadpacket.__name__), out.dtype, out.numel()))
        return out


def _bf16_step(p: float):
    M, K, N, r = 64, 48, 40, 4
    gen = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x64, w64, a64, b64, dy64 = mk(M, K), mk(N, K), mk(r, K), mk(N, r), mk(M, N)
    x = x64.bfloat16().requires_grad_(True)
    a, lb = a64.bfloat16().requires_grad_(True), b64.bfloat16().requires_grad_(True)
    with _Ops() as ops:
        y = lora_linear(x, w64.bfloat16(), None, a, lb, 0.5, dropout_p=p, training=p > 0,
                        backend="torch", seed=3)
        y.backward(dy64.bfloat16())
    want = x64.bfloat16().double() @ w64.bfloat16().double().T + 0.5 * (
        (x64.bfloat16().double() @ a64.bfloat16().double().T) @ b64.bfloat16().double().T)
    return ops.calls, y, want, M * min(K, N)


@pytest.mark.parametrize("native", ["0", "1"])
def test_bf16_route_follows_the_cpu(monkeypatch, native):
    # Native bf16 units: the rank-r expands stay bf16 addmm_ (the fp32 detour measured 30 ms
    # against 1.6 ms on AVX512-BF16). Emulated bf16: they go through fp32, no big bf16 addmm_.
    monkeypatch.setenv(ENV_VAR, native)
    calls, y, want, big = _bf16_step(0.0)
    big_fp32 = [c for c in calls if c[1] == torch.float32 and c[2] >= big]
    big_bf16_addmm = [c for c in calls if c[0] == "addmm_" and c[1] == torch.bfloat16 and c[2] >= big]
    if native == "1":
        assert not big_fp32, f"native bf16 took the fp32 detour: {big_fp32}"
        assert len(big_bf16_addmm) == 2, f"expected the y and dX expands as bf16 addmm_: {calls}"
    else:
        assert big_fp32 and not big_bf16_addmm, f"emulated bf16 must expand in fp32: {calls}"
    bound = 48 * 4.0 * math.sqrt(48)  # loose magnitude bound of |y| entries for N(0,1) inputs
    err = (y.double() - want).abs().max().item()
    assert err < 4 * torch.finfo(torch.bfloat16).eps * bound, f"route {native}: max error {err:.3e}"
