"""The merge arithmetic on plain tensors: W' = cast(W + P(s B A)), summed wide, rounded once.

Every merge path uses this one function: `LoRALinear.merge` / `unmerge` / `to_linear` (so also
`merge_adapters`) and `merge_lora`, which only adds the module swap and the optional projection.
Summing in float32 (or float64) and casting back once matters: adding a bf16 dW to a bf16 W rounds
dW first and the sum again, so the merged model drifts further from the exact sum than one rounding
of it does. The sum is never narrower than W itself: a float64 weight is merged in float64 whatever
`dtype` asks for (a float32 sum would put ~1e-8 relative error into an fp64 model). Unmerge is the same call with -s;
since -(s x) is exact in floating point, it subtracts
bit for bit the delta merge added, and W comes back within two roundings in W's dtype.

Projection (the paper's post-hoc alternative to the regulariser; exact form inferred), with U_k, V_k
the top-k singular vectors of the frozen W:
    column: dW' = (I - U_k U_k^T) dW
    row:    dW' = dW (I - V_k V_k^T)
    both:   dW' = dW - U_k U_k^T dW V_k V_k^T        (the part in the left AND the right subspace)
    either: dW' = (I - U_k U_k^T) dW (I - V_k V_k^T)  (the part in the left OR the right subspace)

"both" removes exactly the component the regulariser's side "both" penalises (||S U_k^T dW V_k S||)
and the overlap analysis's energy "both" measures, so each of column / row / both zeroes the
regulariser term of the same side with the least change to dW; its removed share is that energy
fraction. "either" is the strongest removal (the union: it zeroes the column, row and both terms at
once) and has no regulariser side of its own.

Kept free of module imports so the layer can use it without a cycle through lora_core.merge.
"""
from __future__ import annotations

import torch

PROJECTIONS = (None, "column", "row", "both", "either")


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scale * B @ A, shape (N, K), computed in `dtype`; A is (r, K), B is (N, r)."""
    return scale * (lora_b.to(dtype) @ lora_a.to(dtype))


def merge_dtype(weight_dtype: torch.dtype, dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a merge computes in: `dtype`, or W's own when that is wider (float64 stays float64)."""
    return torch.promote_types(weight_dtype, dtype)


def project_update(dW: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None, projection: str | None):
    """dW without its component in span(U) (column), span(V) (row), both at once (both: U U^T dW V V^T)
    or either (the union); (N, K) in, (N, K) out."""
    if projection is None:
        return dW
    if projection == "column":
        return dW - U @ (U.T @ dW)
    if projection == "row":
        return dW - (dW @ V) @ V.T
    if projection == "both":
        return dW - U @ ((U.T @ dW @ V) @ V.T)  # the k x k core keeps this O(N K k)
    if projection == "either":
        left = dW - U @ (U.T @ dW)  # (I - U U^T) dW
        return left - (left @ V) @ V.T
    raise ValueError(f"unknown projection {projection!r}: expected one of None, 'column', 'row', 'both', 'either'")


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                  projection: str | None = None, U: torch.Tensor | None = None, V: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32, stats: dict | None = None) -> torch.Tensor:
    """cast(W + dW') in W's dtype, with dW = scale * B @ A and dW' its projection (dW without one).

    The sum is done in the wider of `dtype` (float32 or float64) and W's dtype, and rounded to W's
    dtype once. U (N, k) / V (K, k)
    are the orthonormal bases the projection removes. When `stats` is a dict it receives the numbers
    merge_lora reports for this weight, measured on the tensors actually written: "removed_share"
    (||dW - dW'||^2 / ||dW||^2, None without a projection), "cast_max_abs" and "cast_rel_fro" (the
    error of the final cast, max |S - cast(S)| and ||S - cast(S)||_F / ||S||_F for the wide sum S).
    """
    dtype = merge_dtype(weight.dtype, dtype)
    dW = delta_weight(lora_a, lora_b, scale, dtype).to(weight.device)
    update = project_update(dW, U, V, projection)
    wide = weight.to(dtype) + update
    out = wide.to(weight.dtype)  # the one rounding
    if stats is not None:
        stats.update(_removed_share(dW, update, projection), **_cast_error(wide, out))
    return out


def _removed_share(dW: torch.Tensor, update: torch.Tensor, projection: str | None) -> dict:
    if projection is None:
        return {"removed_share": None}
    total = float(dW.square().sum())
    return {"removed_share": float((dW - update).square().sum()) / total if total > 0 else 0.0}


def _cast_error(wide: torch.Tensor, out: torch.Tensor) -> dict:
    err = wide - out.to(wide.dtype)
    ref = float(wide.norm())
    return {"cast_max_abs": float(err.abs().max()) if err.numel() else 0.0,
            "cast_rel_fro": float(err.norm()) / ref if ref > 0 else 0.0}
