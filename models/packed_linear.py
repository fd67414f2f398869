"""Pre-packed weights for the nn.Linear layers of a decode step on CPU.

A decode step is a chain of skinny matmuls (M = batch rows, 1 to 16) over every weight of the
model, and they are most of its time (bench/results/profile_decode_before.md: aten::mm 65-78%).
oneDNN and MKL run those faster when the weight is re-laid out once into their blocked format
instead of on every call: measured on the 2-core AVX512-BF16/AMX box, the model's 211 matmuls at
M = 16 took 168 -> 100 ms (fp32, MKL packed sgemm) and 52 -> 34 ms (bf16, oneDNN); at M = 1 in
bf16 44 -> 26 ms. This is what inductor's freezing pass does, but freezing compiles the whole
model for minutes and bakes the weights in as constants; here the packs are kept beside the
parameters and checked against them on every generate() call.

How it is applied: `packed_linears(model, rows)` returns a TorchFunctionMode that reroutes
`F.linear(x, W, b)` to the packed kernel when W is a weight it packed, and leaves every other call
alone. The decoder's code runs unchanged (one source of numerics), and a LoRA layer, which calls
its own kernel and not F.linear on its frozen weight, keeps its exact path. The results equal
F.linear's to rounding (tests compare greedy tokens with the unpacked path).

Staleness: a pack is keyed by the parameter's identity, storage and version counter, so an
optimizer step, merge() or load_state_dict (in-place writes bump `_version`) repacks it. Memory:
a pack is a second copy of the weight, so models whose linear weights exceed
MAX_PACKED_BYTES are not packed (a 7B model would need 14 GB more in bf16).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MAX_PACKED_BYTES = 2 << 30  # 2 GiB of packed copies at most (SmolLM2-135M: 0.54 GB in fp32)

# model -> {id(weight): (stamp, packed)}; weak so a dropped model frees its packs.
_PACKS: "weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[tuple, torch.Tensor]]]" = weakref.WeakKeyDictionary()


def _route(dtype: torch.dtype) -> str | None:
    """Which packed kernel serves this dtype on this CPU, or None for plain F.linear."""
    if dtype == torch.float32 and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        return "mkl"
    # bf16 packs only where oneDNN has native bf16 (AVX512-BF16/AMX); elsewhere it emulates and
    # is no faster than the unpacked path.
    if (dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return "mkldnn"
    return None


def _stamp(weight: torch.Tensor, rows: int) -> tuple:
    return weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, rows


def _pack(weight: torch.Tensor, route: str, rows: int) -> torch.Tensor:
    w = weight.detach()
    if route == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    return torch.ops.mkldnn._reorder_linear_weight(w, rows)


class _PackedLinearMode(TorchFunctionMode):
    def __init__(self, table: dict[int, tuple[torch.Tensor, torch.Tensor, str]]):
        super().__init__()
        self.table = table  # id(weight) -> (weight, packed, route)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            entry = self.table.get(id(args[1]))
            if entry is not None and entry[0] is args[1]:
                weight, packed, route = entry
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                x = args[0]
                flat = x.reshape(-1, x.shape[-1])  # (M, K)
                if route == "mkl":
                    out = torch.ops.mkl._mkl_linear(flat, packed, weight, bias, flat.shape[0])
                else:
                    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
                return out.reshape(*x.shape[:-1], out.shape[-1])
        return func(*args, **kwargs)


def packed_linears(model: nn.Module, rows: int) -> TorchFunctionMode | None:
    """A mode that runs `model`'s linear weights through packed kernels, or None
    when nothing qualifies (not CPU, unsupported dtype, too large). `rows` is the batch the packs
    are laid out for; other row counts still give correct results."""
    # nn.Linear and anything shaped like it (a LoRA layer's frozen base weight when merged or
    # disabled goes through F.linear too).
    linears = [m for m in model.modules() if hasattr(m, "in_features") and isinstance(getattr(m, "weight", None), torch.Tensor)
               and m.weight.device.type == "cpu"]
    if not linears:
        return None
    total = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if total > MAX_PACKED_BYTES:
        return None
    store = _PACKS.setdefault(model, {})
    table = {}
    seen = set()
    for module in linears:
        weight = module.weight
        route = _route(weight.dtype)
        if route is None or weight.dim() != 2 or id(weight) in seen:
            continue
        seen.add(id(weight))
        stamp = _stamp(weight, rows)
        cached = store.get(id(weight))
        if cached is None or cached[0] != stamp:
            cached = store[id(weight)] = (stamp, _pack(weight, route, rows))
        table[id(weight)] = (weight, cached[1], route)
    for key in [k for k in store if k not in seen]:
        del store[key]  # weights no longer in the model: free their packs
    return _PackedLinearMode(table) if table else None
