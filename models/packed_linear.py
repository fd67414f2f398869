"""Pre-packed weights for the nn.Linear layers of a decode step on CPU.

A decode step is a chain of skinny matmuls (M = batch rows, 1 to 16) over every weight of the
model, and they are most of its time (bench/results/profile_decode_before.md: aten::mm 65-78%).
oneDNN and MKL run those faster when the weight is re-laid out once into their blocked format
instead of on every call: a batch-16 decode step gets about a fifth faster, fp32 and bf16 alike.
At batch 1 the step does not change (the matmuls are bound by reading the weights, not by their
layout). Inductor's freezing pass does the same packing, but it needs the whole step compiled,
with the weights baked in as constants. Figures: bench/RESULTS.md, "Measurements cited by the code".

How it is applied: inside `with packed_linears(model, rows):` every plain nn.Linear of the model
(on CPU, in a dtype with a packed kernel) runs a forward that calls the packed kernel with the same
weight and bias; on exit the class's forward is back. The decoder's code runs unchanged (one
source of numerics); LoRA layers keep their own forward and exact path. Patching the instances
costs nothing per call, where a TorchFunctionMode that inspected every torch call (tried first)
slowed each small op's dispatch enough to eat the gain at batch 1. Results equal F.linear's
to rounding (tests compare greedy tokens with the unpacked path).

Lifetime: packs are kept between calls (packing costs a noticeable share of a short answer at
batch 1) in a table keyed weakly by the model and, per weight, by its storage and
version counter: an optimizer step, merge() or load_state_dict writes in place and bumps the
version, and the next call repacks that weight. The cost is memory: a pack is a second copy of the
weight, held until `release(model)` or until the model is freed; models whose linear weights
exceed MAX_PACKED_BYTES are never packed (a 7B model's second copy would not fit beside it).
"""
from __future__ import annotations

import contextlib
import weakref
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_core.kernels.cpu_caps import cpu_caps

MAX_PACKED_BYTES = 2 << 30  # 2 GiB of packed copies at most

# model -> {id(weight): (stamp, packed)}; weak, so a dropped model frees its packs.
_PACKS: "weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[tuple, torch.Tensor]]]" = weakref.WeakKeyDictionary()


def _route(dtype: torch.dtype) -> str | None:
    """Which packed kernel serves this dtype on this CPU, or None for plain F.linear."""
    if dtype == torch.float32:
        # MKL's sgemm is fast on Intel CPUs only; on an AMD EPYC it ran 2-3x slower than oneDNN's
        # at every row count here, F.linear (MKL too) included (kernels/cpu_caps.py).
        if (cpu_caps().vendor == "GenuineIntel" and torch.backends.mkl.is_available()
                and hasattr(torch.ops.mkl, "_mkl_linear")):
            return "mkl"
        return "mkldnn" if torch.backends.mkldnn.is_available() else None
    # bf16 packs only where oneDNN has native bf16 (AVX512-BF16/AMX); elsewhere it emulates and
    # is no faster than the unpacked path.
    if (dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return "mkldnn"
    return None


def _pack(weight: torch.Tensor, route: str, rows: int) -> torch.Tensor:
    w = weight.detach()
    if route == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    return torch.ops.mkldnn._reorder_linear_weight(w, rows)


def _packed_forward(module: nn.Linear, packed: torch.Tensor, route: str, rows: int):
    # MKL's packed sgemm is laid out for `rows`; on a prefill's hundreds of rows it was slower than
    # the plain path, and on one row too (the plain path is a matrix-vector product there), so
    # those go plain. oneDNN's packs (bf16, and fp32 off Intel) stayed ahead on both and are
    # always used (figures in bench/RESULTS.md).
    plain_above = 4 * rows

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (M, K)
        if route == "mkl" and not 1 < flat.shape[0] <= plain_above:
            return F.linear(x, module.weight, module.bias)
        if route == "mkl":
            out = torch.ops.mkl._mkl_linear(flat, packed, module.weight, module.bias, flat.shape[0])
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat, packed, module.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])  # (..., N)
    return forward


def release(model: nn.Module) -> None:
    """Drop the packed copies kept for `model` (they are rebuilt by the next packed call)."""
    _PACKS.pop(model, None)


# Projections that read the same input and are run as one matmul within packed_linears: the
# owner module gets a `fused_<name>` callable returning their outputs side by side (the decoder
# splits them). One call instead of three (two) saved 20-50 us per layer and step, 2-3% of a
# decode step (bench/RESULTS.md, "Measurements cited by the code").
FUSED_GROUPS = {"fused_qkv": ("q_proj", "k_proj", "v_proj"), "fused_gate_up": ("gate_proj", "up_proj")}


def _fusable(model: nn.Module, linears: list[nn.Linear]) -> list[tuple[nn.Module, str, list[nn.Linear]]]:
    """(owner, attribute, members) for every group of FUSED_GROUPS whose members all run packed
    here with the same dtype."""
    eligible = {id(m) for m in linears}
    groups = []
    for owner in model.modules():
        for attr, names in FUSED_GROUPS.items():
            members = [getattr(owner, n, None) for n in names]
            if (all(isinstance(m, nn.Linear) and id(m) in eligible for m in members)
                    and len({m.weight.dtype for m in members}) == 1 and attr not in owner.__dict__):
                groups.append((owner, attr, members))
    return groups


def _fused_weight(members: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([m.weight.detach() for m in members])  # (sum N, K)
    if all(m.bias is None for m in members):
        return weight, None
    return weight, torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                              for m in members])


def _stamp(weight: torch.Tensor, rows: int) -> tuple:
    return (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, rows)


@contextlib.contextmanager
def packed_linears(model: nn.Module, rows: int, enabled: bool = True):
    """Within the block, `model`'s nn.Linear layers run on packed weights where that applies
    (CPU; fp32 with MKL on Intel, with oneDNN elsewhere; bf16 with native oneDNN bf16; total size
    within MAX_PACKED_BYTES), and the projections of FUSED_GROUPS run as one matmul per group.
    `rows` is the batch the packs are laid out for; other row counts are still correct."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
               and "forward" not in m.__dict__ and _route(m.weight.dtype) is not None
               and not (rows < 2 and _route(m.weight.dtype) == "mkl")]  # fp32 at one row: plain (above)
    total = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if not enabled or not linears or total > MAX_PACKED_BYTES:
        yield
        return
    store = _PACKS.setdefault(model, {})
    live: set = set()
    patched, fused_owners = [], []
    try:
        groups = _fusable(model, linears)
        in_groups = {id(m) for _, _, members in groups for m in members}
        for owner, attr, members in groups:
            # Members are packed only as the group (a second copy of their weights is not kept).
            key, stamp = (id(owner), attr), tuple(_stamp(m.weight, rows) for m in members)
            cached = store.get(key)
            if cached is None or cached[0] != stamp:
                weight, bias = _fused_weight(members)
                route = _route(weight.dtype)
                # MKL's path also needs the plain weight (its row counts that go plain); oneDNN's not.
                fused = SimpleNamespace(weight=weight if route == "mkl" else None, bias=bias)
                cached = store[key] = (stamp, (_pack(weight, route, rows), fused, route))
            live.add(key)
            packed, fused, route = cached[1]
            owner.__dict__[attr] = _packed_forward(fused, packed, route, rows)
            fused_owners.append((owner, attr))
        for module in linears:
            if id(module) in in_groups:
                continue
            weight = module.weight
            route = _route(weight.dtype)
            stamp = _stamp(weight, rows)
            cached = store.get(id(weight))
            if cached is None or cached[0] != stamp:  # new, or written since it was packed
                cached = store[id(weight)] = (stamp, _pack(weight, route, rows))
            live.add(id(weight))  # a tied weight (lm_head = embeddings) is packed once
            module.forward = _packed_forward(module, cached[1], route, rows)
            patched.append(module)
        for key in [k for k in store if k not in live]:
            del store[key]  # weights no longer in the model
        yield
    finally:
        for module in patched:
            del module.forward  # the class's forward again
        for owner, attr in fused_owners:
            del owner.__dict__[attr]
