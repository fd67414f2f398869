"""What this CPU can do natively, read once: the ISA level torch dispatches to and the bf16 units.

Two decisions depend on it and must agree, so they live here:
- the LoRA kernel's route for half precision on CPU (torch_path.py): with native bf16 dot
  products (AVX512-BF16 or AMX-BF16) oneDNN's bf16 GEMMs are fast, including the skinny rank-r
  ones, so the plain addmm route is right; without them bf16 is emulated and the skinny products
  fall off a cliff (an order of magnitude slower than fp32; bench/RESULTS.md), so those run
  in fp32.
- the default training dtype: bf16 where it has native units, fp32 where bf16 would be emulated.

- the fp32 route of packed decode matmuls (models/packed_linear.py): MKL's sgemm on Intel CPUs,
  oneDNN's elsewhere: on an AMD EPYC MKL ran 2-3x slower than oneDNN at every row count a decode
  step or a prefill has (bench/RESULTS.md, "Measurements cited by the code").

fp16 follows the same rule with AVX512-FP16 / AMX-FP16 (there the rank-r fp16 `addmm_` is several
times faster than the route through fp32).

`LORA_CORE_CPU_BF16=0|1` overrides the bf16 detection (for tests, and to force a route when the
kernel's cpuinfo reading is wrong, e.g. in a VM that hides the flags).
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass

import torch

ENV_VAR = "LORA_CORE_CPU_BF16"
# The flags that matter to the routes above, in /proc/cpuinfo spelling.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


@dataclass(frozen=True)
class CpuCaps:
    model: str             # "Intel(R) Xeon(R) ..." or platform.processor()
    vendor: str            # /proc/cpuinfo vendor_id: "GenuineIntel", "AuthenticAMD", "" when unknown
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    flags: tuple[str, ...]  # the subset of ISA_FLAGS present
    native_bf16: bool      # bf16 dot products in hardware (AVX512-BF16 or AMX-BF16)
    native_fp16: bool      # fp16 arithmetic in hardware (AVX512-FP16 or AMX-FP16)

    def as_json(self) -> dict:
        return asdict(self) | {"flags": list(self.flags)}


def _cpuinfo() -> tuple[str, str, set[str]]:
    """(model name, vendor, flag set) from /proc/cpuinfo's first processor; empty off Linux."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            text = handle.read(1 << 16)
    except OSError:
        return platform.processor() or "unknown", "", set()
    model, vendor, flags = "", "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        if model and vendor and flags:
            break
    return model or platform.processor() or "unknown", vendor, flags


def _env_override() -> bool | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VAR}={value!r}: expected 0 or 1")
    return value == "1"


@functools.lru_cache(maxsize=1)
def _detected() -> CpuCaps:
    model, vendor, flags = _cpuinfo()
    capability = torch.backends.cpu.get_cpu_capability()
    return CpuCaps(model=model, vendor=vendor, torch_capability=capability,
                   flags=tuple(f for f in ISA_FLAGS if f in flags),
                   native_bf16="avx512_bf16" in flags or "amx_bf16" in flags,
                   native_fp16="avx512_fp16" in flags or "amx_fp16" in flags)


def cpu_caps() -> CpuCaps:
    """The detected capabilities, with LORA_CORE_CPU_BF16 applied to `native_bf16`."""
    caps = _detected()
    forced = _env_override()
    if forced is None or forced == caps.native_bf16:
        return caps
    return CpuCaps(caps.model, caps.vendor, caps.torch_capability, caps.flags, forced, caps.native_fp16)


def native_bf16() -> bool:
    """True when bf16 matmuls run on bf16 hardware units here."""
    return cpu_caps().native_bf16


def native_half(dtype: torch.dtype) -> bool:
    """True when `dtype` (bf16 or fp16) matmuls run on native units on this CPU."""
    caps = cpu_caps()
    return caps.native_bf16 if dtype == torch.bfloat16 else caps.native_fp16

