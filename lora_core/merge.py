"""Merge LoRA adapters into their base weights, optionally removing dW's principal-subspace part.

Every adapted module becomes a plain `nn.Linear` whose weight is cast(W + dW'), with the sum done in
float32 (or float64) and cast back to the weight's dtype once: adding a bf16 dW to a bf16 W rounds
dW first and the sum again, so a merged bf16 model drifts further from the float32 result than one
rounding of the exact sum does (tested).

Projection (the paper's post-hoc alternative to the regulariser; exact form inferred), with U_k, V_k
the top-k singular vectors of the frozen W:
    column: dW' = (I - U_k U_k^T) dW
    row:    dW' = dW (I - V_k V_k^T)
    both:   dW' = (I - U_k U_k^T) dW (I - V_k V_k^T)
The report gives, per module, the share of ||dW||_F^2 removed (||dW - dW'||^2 / ||dW||^2; the
projections are orthogonal so this equals 1 - ||dW'||^2 / ||dW||^2) and the rounding error of the
final cast: max |W32 - cast(W32)| and ||W32 - cast(W32)||_F / ||W32||_F.

All inputs are checked before any module is touched, so a refused call leaves the model unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lora_core._adapted import adapted_modules
from lora_core.svd_cache import DEFAULT_CACHE, SVDCache, check_k, check_svd_dtype

PROJECTIONS = (None, "column", "row", "both")


def project_update(dW: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None, projection: str | None):
    """dW with its component in span(U) (column), span(V) (row) or both removed; (N, K) in, (N, K) out."""
    if projection is None:
        return dW
    if projection == "column":
        return dW - U @ (U.T @ dW)
    if projection == "row":
        return dW - (dW @ V) @ V.T
    if projection == "both":
        left = dW - U @ (U.T @ dW)  # (I - U U^T) dW
        return left - (left @ V) @ V.T
    raise ValueError(f"unknown projection {projection!r}: expected one of None, 'column', 'row', 'both'")


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
) -> MergeReport:
    """Merge every LoRA adapter of `model` in place; each adapted module becomes an `nn.Linear`.

    projection: None | "column" | "row" | "both"; k (required with a projection, 1 <= k <= min(N, K)
    for every adapted module). `svd_dtype` is also the dtype of the merge sum (float32 or float64).
    Returns a `MergeReport` (per-module cast error and share of dW removed).
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}: expected one of None, 'column', 'row', 'both'")
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

    report = MergeReport(projection=projection, k=k, dtype=str(dtype).replace("torch.", ""))
    for name, m in mods.items():
        if getattr(m, "merged", False):
            m.unmerge()  # contract: idempotent, restores the base weight in fp32
        W = m.weight.detach()
        with torch.no_grad():
            if hasattr(m, "delta_weight"):
                dW = m.delta_weight(dtype=dtype)
            else:
                dW = float(m.scaling) * (m.lora_B.detach().to(dtype) @ m.lora_A.detach().to(dtype))
            dW = dW.to(device=W.device, dtype=dtype)
            removed = None
            if projection is not None:
                basis = cache.get(name, W, k, dtype).to(device=W.device, dtype=dtype)
                new_dW = project_update(dW, basis.U, basis.V, projection)
                total = float(dW.square().sum())
                removed = float((dW - new_dW).square().sum()) / total if total > 0 else 0.0
                dW = new_dW
            merged = W.to(dtype) + dW  # (N, K) exact-ish sum in the wide dtype
            out = merged.to(W.dtype)  # the one rounding
            err = merged - out.to(dtype)
            ref = float(merged.norm())
            report.modules.append({
                "name": name,
                "shape": list(W.shape),
                "dtype": str(W.dtype).replace("torch.", ""),
                "k": k,
                "removed_share": removed,
                "cast_max_abs": float(err.abs().max()) if err.numel() else 0.0,
                "cast_rel_fro": float(err.norm()) / ref if ref > 0 else 0.0,
            })
        bias = getattr(m, "bias", None)
        linear = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(out, requires_grad=m.weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        linear.train(m.training)
        _set_submodule(model, name, linear)
    return report
