"""Merge LoRA adapters into their base weights, optionally removing dW's principal-subspace part.

Every adapted module becomes a plain `nn.Linear` whose weight is cast(W + dW'), with the sum done in
float32 (or float64) and cast back to the weight's dtype once (tested against a naive bf16 add). A
weight wider than the requested dtype (float64) is decomposed and summed in its own dtype.
The arithmetic, including the column / row / both / either projections of dW away from W's top-k
singular subspaces, is `merge_math.merged_weight`, shared with `LoRALinear.merge`; this module
adds the SVD bases (from the cache), the module swap and the report. "both" removes the component
in the left and right subspaces at once, the one the regulariser's side "both" penalises; "either"
removes the union (see merge_math).

The report gives, per module, the share of ||dW||_F^2 removed (||dW - dW'||^2 / ||dW||^2; the
projections are orthogonal so this equals 1 - ||dW'||^2 / ||dW||^2) and the rounding error of the
final cast: max |W32 - cast(W32)| and ||W32 - cast(W32)||_F / ||W32||_F.

All inputs are checked before any module is touched, so a refused call leaves the model unchanged.
Safe mode (the default, PEFT's `safe_merge`) also refuses a merged weight with NaN/inf, e.g. a
finite delta that overflows float16 in the final cast: it is checked before its module is swapped,
and a refusal puts back the modules already swapped. The check is one pass over each weight,
cheap beside the matmul that builds the delta.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lora_core._adapted import adapted_modules
from lora_core.merge_math import PROJECTIONS, merge_dtype, merged_weight, project_update
from lora_core.svd_cache import DEFAULT_CACHE, SVDCache, check_k, check_svd_dtype

__all__ = ["MergeReport", "PROJECTIONS", "merge_lora", "project_update"]


@dataclass
class MergeReport:
    projection: str | None
    k: int | None
    dtype: str
    modules: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        removed = [m["removed_share"] for m in self.modules if m["removed_share"] is not None]
        return {
            "projection": self.projection,
            "k": self.k,
            "compute_dtype": self.dtype,
            "modules_merged": len(self.modules),
            "max_cast_abs_error": max((m["cast_max_abs"] for m in self.modules), default=0.0),
            "max_cast_rel_fro_error": max((m["cast_rel_fro"] for m in self.modules), default=0.0),
            "mean_removed_share": (sum(removed) / len(removed)) if removed else None,
            "modules": self.modules,
        }

    def markdown(self) -> str:
        d = self.to_dict()
        lines = [
            "# LoRA merge report",
            "",
            f"Projection: {self.projection or 'none'}; k = {self.k}; merged in {self.dtype}, cast back once.",
            f"Modules merged: {d['modules_merged']}; largest cast error: max abs {d['max_cast_abs_error']:.3g}, "
            f"relative Frobenius {d['max_cast_rel_fro_error']:.3g}.",
            "",
            "| module | shape | dtype | k | share of ||dW||^2 removed | cast max abs | cast rel Frobenius |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in self.modules:
            rs = "-" if m["removed_share"] is None else f"{m['removed_share']:.4g}"
            lines.append(f"| {m['name']} | {m['shape'][0]}x{m['shape'][1]} | {m['dtype']} | {m['k'] or '-'} | {rs} | "
                         f"{m['cast_max_abs']:.3g} | {m['cast_rel_fro']:.3g} |")
        return "\n".join(lines) + "\n"


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def merge_lora(
    model: nn.Module,
    projection: str | None = None,
    k: int | None = None,
    *,
    svd_dtype=torch.float32,
    cache: SVDCache | None = None,
    safe: bool = True,
) -> MergeReport:
    """Merge every LoRA adapter of `model` in place; each adapted module becomes an `nn.Linear`.

    projection: None | "column" | "row" | "both" | "either" (merge_math's docstring has the formulas);
    k (required with a projection, 1 <= k <= min(N, K) for every adapted module). `svd_dtype` is also
    the dtype of the merge sum (float32 or float64); a float64 weight always uses float64 for both.
    `safe`: refuse (ValueError naming the module) when a merged weight holds NaN/inf, leaving the
    model as it was. Returns a `MergeReport` (per-module cast error and share of dW removed).
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}: expected one of None, 'column', 'row', 'both', "
                         "'either'")
    if projection is None and k is not None:
        raise ValueError(f"k={k} was given without a projection; k only selects the subspace a projection removes")
    if projection is not None and k is None:
        raise ValueError(f"projection {projection!r} needs k (the number of top singular directions to remove)")
    dtype = check_svd_dtype(svd_dtype)
    cache = DEFAULT_CACHE if cache is None else cache
    mods = adapted_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA-adapted modules to merge")
    if projection is not None:
        for name, m in mods.items():
            check_k(k, m.weight.shape, name)

    report = MergeReport(projection=projection, k=k, dtype=_dtype_name(dtype))
    swapped: list[tuple[str, nn.Module]] = []
    for name, m in mods.items():
        if m.merged:
            m.unmerge()  # contract: idempotent, restores the base weight in fp32
        W = m.weight.detach()
        wide = merge_dtype(W.dtype, dtype)  # float64 weights: float64 basis and sum
        with torch.no_grad():
            U = V = None
            if projection is not None:
                basis = cache.get(name, W, k, wide).to(device=W.device, dtype=wide)
                U, V = basis.U, basis.V
            record = {"name": name, "shape": list(W.shape), "dtype": _dtype_name(W.dtype), "k": k,
                      "compute_dtype": _dtype_name(wide)}
            out = merged_weight(W, m.lora_A.detach(), m.lora_B.detach(), m.scaling, projection=projection,
                                U=U, V=V, dtype=wide, stats=record)
        if safe and not bool(torch.isfinite(out).all()):
            for done, original in reversed(swapped):
                _set_submodule(model, done, original)
            raise ValueError(_non_finite_message(name, m, out))
        report.modules.append(record)
        _set_submodule(model, name, _as_linear(m, out))
        swapped.append((name, m))
    report.dtype = ", ".join(sorted({r["compute_dtype"] for r in report.modules}))
    return report


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _non_finite_message(name: str, m: nn.Module, out: torch.Tensor) -> str:
    bad = int((~torch.isfinite(out)).sum())
    if not bool(torch.isfinite(m.weight).all()):
        why = "the base weight itself is not finite"
    elif not (bool(torch.isfinite(m.lora_A).all()) and bool(torch.isfinite(m.lora_B).all())):
        why = "the adapter holds NaN/inf"
    else:
        why = f"W + dW overflows {str(out.dtype).replace('torch.', '')} (export in a wider --dtype?)"
    return (f"merge refused: the merged weight of {name} has {bad} NaN/inf value(s) ({why}); nothing was "
            "changed or written")


def _as_linear(m: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain nn.Linear holding `weight` and a copy of m's bias, in m's train/eval mode."""
    bias = m.bias
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=m.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    linear.train(m.training)
    return linear
