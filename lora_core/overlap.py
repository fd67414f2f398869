"""How much an update dW lies in the principal subspace of the frozen weight W it is added to.

The paper's explanation of why LoRA keeps reasoning intact: its low-rank update overlaps less with
W's top singular directions than a full fine-tuning update does. This module measures that, per
weight and per model, for a LoRA adapter (dW = s B A) or for full fine-tuning (dW = W_tuned - W_base):

- the paper's quantities: column / row / both sides x spectral / uniform weighting x raw / normalised
  (see `regularizer.lowrank_overlap`, which computes them for LoRA without forming dW);
- the energy fraction of dW inside W's top-k left subspace (||U_k^T dW||^2 / ||dW||^2), right
  subspace, and both, next to the fraction a random (rotation-invariant) update would have:
  k/N, k/K and k^2/(N K);
- principal angles (as cosines) between dW's top-m singular directions (m = min(rank dW, k)) and W's
  top-k subspace; a random m-dimensional direction set has mean cos^2 of about k/N;
- dW's stable rank ||dW||_F^2 / ||dW||_2^2 and its size relative to W.

LoRA updates are decomposed through thin QRs of B and A^T and an r x r SVD (never N x K); dense
updates use products with U_k / V_k and a top-m SVD of dW (exact for small matrices, randomised with
a measured residual for large ones, as for W). Every record says which method gave its numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lora_core._adapted import adapted_modules, layer_index, module_type
from lora_core.common.progress import progress as progress_bar
from lora_core.regularizer import SIDES, WEIGHTINGS, dense_overlap, lowrank_overlap
from lora_core.svd_cache import DEFAULT_CACHE, SpectralBasis, SVDCache, check_k, check_svd_dtype, top_k_svd


def _paper_key(side: str, weighting: str, normalize: bool) -> str:
    return f"{side}/{weighting}" + ("/normalized" if normalize else "")


def _lowrank_svd(B: torch.Tensor, A: torch.Tensor, scaling: float):
    """Thin SVD of s B A (B (N, r), A (r, K)) via QR of B and A^T: returns U (N, r), S (r,), V (K, r)."""
    Qb, Rb = torch.linalg.qr(B)  # (N, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.T)  # (K, r), (r, r)
    Uc, S, Vch = torch.linalg.svd(scaling * (Rb @ Ra.T))  # r x r core
    return Qb @ Uc, S, Qa @ Vch.T


def _numeric_rank(S: torch.Tensor, shape) -> int:
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    tol = float(S[0]) * max(shape) * torch.finfo(S.dtype).eps
    return int((S > tol).sum())


def analyse_weight(
    W: torch.Tensor,
    k: int,
    *,
    B: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    scaling: float = 1.0,
    dW: torch.Tensor | None = None,
    basis: SpectralBasis | None = None,
    svd_dtype=torch.float32,
    name: str = "weight",
) -> dict:
    """Overlap of one update with one weight W (N, K); give either (B, A, scaling) or dW.

    k is checked strictly (1 <= k <= min(N, K)); `basis` may be a precomputed top-k (or larger)
    decomposition of W. Returns a JSON-ready dict; fractions are None for an all-zero update.
    """
    dtype = check_svd_dtype(svd_dtype)
    if W.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D, got shape {tuple(W.shape)}")
    N, K = W.shape
    k = check_k(k, W.shape, name)
    lora = B is not None or A is not None
    if lora == (dW is not None):
        raise ValueError(f"{name}: give either B and A (a LoRA update) or dW (a dense update), not both/neither")
    if lora:
        if B is None or A is None:
            raise ValueError(f"{name}: a LoRA update needs both B and A")
        if B.dim() != 2 or A.dim() != 2 or B.shape[0] != N or A.shape[1] != K or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"{name}: LoRA shapes B {tuple(B.shape)} and A {tuple(A.shape)} do not fit weight {tuple(W.shape)}"
            )
    elif tuple(dW.shape) != (N, K):
        raise ValueError(f"{name}: update shape {tuple(dW.shape)} differs from weight shape {tuple(W.shape)}")

    if basis is None:
        basis = top_k_svd(W, k, dtype=dtype, name=name)
    basis = basis.top(k).to(device=W.device, dtype=dtype)
    U, S, V = basis.U, basis.S, basis.V

    record: dict = {"name": name, "layer": layer_index(name), "module_type": module_type(name),
                    "shape": [N, K], "k": k, "update": "lora" if lora else "dense"}
    with torch.no_grad():
        paper = {}
        if lora:
            Bd, Ad = B.detach().to(dtype), A.detach().to(dtype)
            s = float(scaling)
            dw_energy = s * s * float(((Bd.T @ Bd) * (Ad @ Ad.T)).sum())
            Ud, Sd, Vd = _lowrank_svd(Bd, Ad, s)
            record.update(rank=int(A.shape[0]), scaling=s, update_svd="exact (QR + r x r SVD)")
            term = lambda side, wt, nz: lowrank_overlap(U, S, V, Bd, Ad, s, side, wt, nz, eps=0.0)  # noqa: E731
        else:
            D = dW.detach().to(dtype)
            dw_energy = float(D.square().sum())
            m_req = min(k, N, K)
            ud = top_k_svd(D, m_req, dtype=dtype, name=f"{name} (update)") if dw_energy > 0 else None
            Ud, Sd, Vd = (ud.U, ud.S, ud.V) if ud is not None else (U[:, :0], S[:0], V[:, :0])
            record.update(rank=None, scaling=None,
                          update_svd=(f"{ud.method} (rel residual {ud.rel_residual:.2e})" if ud else "none"))
            term = lambda side, wt, nz: dense_overlap(U, S, V, D, side, wt, nz, eps=0.0)  # noqa: E731

        zero = dw_energy == 0.0
        record["zero_update"] = zero
        record["svd"] = {"method": basis.method, "rel_residual": basis.rel_residual,
                         "dtype": str(dtype).replace("torch.", "")}
        record["w_fro"] = float(W.detach().to(dtype).norm())
        record["dw_fro"] = dw_energy ** 0.5
        record["relative_update"] = record["dw_fro"] / record["w_fro"] if record["w_fro"] > 0 else None
        for side in SIDES:
            for wt in WEIGHTINGS:
                for nz in (False, True):
                    # eps = 0: an analysis reports the exact ratio; the all-zero update is handled apart
                    paper[_paper_key(side, wt, nz)] = None if (zero and nz) else float(term(side, wt, nz))
        record["paper"] = paper
        baseline = {"column": k / N, "row": k / K, "both": k * k / (N * K)}
        record["baseline"] = baseline
        energy = {side: paper[_paper_key(side, "uniform", True)] for side in SIDES}
        record["energy"] = energy
        record["ratio"] = {s_: (None if energy[s_] is None else energy[s_] / baseline[s_]) for s_ in SIDES}

        m = min(_numeric_rank(Sd, (N, K)), k)
        if zero or m == 0:
            record.update(stable_rank=None, dw_spectral=0.0, angles=None)
        else:
            top = float(Sd[0])
            record["dw_spectral"] = top
            record["stable_rank"] = dw_energy / (top * top)
            left = torch.linalg.svdvals(U.T @ Ud[:, :m]).clamp(0.0, 1.0)  # (m,)
            right = torch.linalg.svdvals(V.T @ Vd[:, :m]).clamp(0.0, 1.0)
            record["angles"] = {
                "m": m,
                "left_cosines": [float(c) for c in left],
                "right_cosines": [float(c) for c in right],
                "left_mean_cos2": float(left.square().mean()),
                "right_mean_cos2": float(right.square().mean()),
                "left_baseline_cos2": k / N,
                "right_baseline_cos2": k / K,
            }
    return record


@dataclass
class OverlapReport:
    """Per-module overlap records of one adapter or one fine-tuning run, with summaries."""

    k: int
    source: str  # "lora" | "full"
    svd_dtype: str
    records: list[dict]
    skipped: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """Means of the energy fractions, baselines and ratios per layer, per module type, overall."""
        live = [r for r in self.records if not r["zero_update"]]

        def agg(rows):
            out = {"modules": len(rows)}
            for side in SIDES:
                if rows:
                    out[f"energy_{side}"] = sum(r["energy"][side] for r in rows) / len(rows)
                    out[f"baseline_{side}"] = sum(r["baseline"][side] for r in rows) / len(rows)
                    out[f"ratio_{side}"] = sum(r["ratio"][side] for r in rows) / len(rows)
            angled = [r for r in rows if r["angles"]]
            if angled:
                out["left_mean_cos2"] = sum(r["angles"]["left_mean_cos2"] for r in angled) / len(angled)
            with_sr = [r for r in rows if r["stable_rank"] is not None]
            if with_sr:
                out["stable_rank"] = sum(r["stable_rank"] for r in with_sr) / len(with_sr)
            return out

        layers = sorted({r["layer"] for r in live if r["layer"] is not None})
        types = sorted({r["module_type"] for r in live})
        return {
            "overall": agg(live),
            "by_layer": {str(L): agg([r for r in live if r["layer"] == L]) for L in layers},
            "by_module_type": {t: agg([r for r in live if r["module_type"] == t]) for t in types},
            "zero_updates": [r["name"] for r in self.records if r["zero_update"]],
        }

    def to_dict(self) -> dict:
        return {"k": self.k, "source": self.source, "svd_dtype": self.svd_dtype,
                "summary": self.summary(), "records": self.records, "skipped": self.skipped}


def _progress(items, desc, progress):
    return progress_bar(items, desc=desc, enabled=progress)


def _check_k_request(k):
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def analyse_adapter(
    model: nn.Module,
    k: int,
    *,
    svd_dtype=torch.float32,
    cache: SVDCache | None = None,
    progress: bool | None = None,
) -> OverlapReport:
    """Overlap of every LoRA-adapted module's dW = s B A with its frozen weight.

    Each module uses k capped by its own min(N, K) (recorded per record as "k").
    """
    _check_k_request(k)
    dtype = check_svd_dtype(svd_dtype)
    cache = DEFAULT_CACHE if cache is None else cache
    mods = adapted_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA-adapted modules to analyse")
    records = []
    for name, m in _progress(list(mods.items()), "overlap", progress):
        if getattr(m, "merged", False):
            raise ValueError(f"{name}: adapter is merged into the weight; unmerge before analysing")
        W = m.weight
        k_mod = min(k, *W.shape)
        basis = cache.get(name, W, k_mod, dtype)
        records.append(analyse_weight(W, k_mod, B=m.lora_B, A=m.lora_A, scaling=m.scaling,
                                      basis=basis, svd_dtype=dtype, name=name))
    return OverlapReport(k=k, source="lora", svd_dtype=str(dtype).replace("torch.", ""), records=records)


def default_update_names(state: dict) -> list[str]:
    """2-D '.weight' tensors inside the layer stack (the projections; not embeddings or lm_head)."""
    return sorted(n for n, t in state.items()
                  if n.endswith(".weight") and getattr(t, "dim", lambda: 0)() == 2 and layer_index(n) is not None)


def analyse_update(
    base_state: dict,
    tuned_state: dict,
    k: int,
    names: list[str] | None = None,
    *,
    svd_dtype=torch.float32,
    cache: SVDCache | None = None,
    progress: bool | None = None,
) -> OverlapReport:
    """Overlap of full fine-tuning updates dW = tuned - base for the given weight keys.

    `names` are state-dict keys (".weight" may be omitted); default: every 2-D weight in the layer
    stack. Keys missing from either state or with differing shapes are refused by name; weights with
    an exactly zero update (frozen during tuning) are listed in `skipped`.
    """
    _check_k_request(k)
    dtype = check_svd_dtype(svd_dtype)
    cache = DEFAULT_CACHE if cache is None else cache
    if names is None:
        names = default_update_names(base_state)
    else:
        names = [n if n.endswith(".weight") else n + ".weight" for n in names]
    if not names:
        raise ValueError("no weights to analyse: no 2-D '.layers.<i>.' weights found in the base state")
    for n in names:
        for label, st in (("base", base_state), ("tuned", tuned_state)):
            if n not in st:
                raise ValueError(f"weight {n!r} is missing from the {label} checkpoint")
        if tuple(base_state[n].shape) != tuple(tuned_state[n].shape) or base_state[n].dim() != 2:
            raise ValueError(f"weight {n!r}: base shape {tuple(base_state[n].shape)} and tuned shape "
                             f"{tuple(tuned_state[n].shape)} differ or are not 2-D")
    records, skipped = [], []
    for n in _progress(names, "overlap", progress):
        W = base_state[n]
        dW = tuned_state[n].to(dtype) - W.to(dtype)
        module = n[: -len(".weight")]
        if not bool(dW.any()):
            skipped.append({"name": module, "reason": "zero update"})
            continue
        k_mod = min(k, *W.shape)
        basis = cache.get(module, W, k_mod, dtype)
        records.append(analyse_weight(W, k_mod, dW=dW, basis=basis, svd_dtype=dtype, name=module))
    return OverlapReport(k=k, source="full", svd_dtype=str(dtype).replace("torch.", ""),
                         records=records, skipped=skipped)
