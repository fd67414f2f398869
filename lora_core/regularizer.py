"""The paper's orthogonality regulariser, computed from small products only.

For a frozen weight W (N, K) with top-k singular triplets U (N, k), S (k,), V (K, k) and a LoRA
update dW = s B A (B (N, r), A (r, K)):

    column: R = ||S U^T dW||_F^2       = s^2 tr((S P) G_A (S P)^T),   P = U^T B (k, r), G_A = A A^T (r, r)
    row:    R = ||dW V S||_F^2         = s^2 tr(G_B (Q S) (Q S)^T),    Q = A V (r, k),   G_B = B^T B (r, r)
    both:   R = ||S U^T dW V S||_F^2   = s^2 ||(S P)(Q S)||_F^2        (k, k)

"both" is the part of dW inside W's left AND right top-k subspaces (U U^T dW V V^T, weighted), the
same component that `merge_lora(projection="both")` removes and that the overlap analysis reports
as energy "both"; the union (left OR right) is the merge's "either" and has no term here.

Which s. The paper writes R on dW = B A, with LoRA's alpha/r left out, and that is the default of
`OrthogonalityRegularizer` (s = 1): beta then means what it means in the paper, whatever alpha and
r are. `scaled_update=True` uses s = alpha/r, i.e. R of the update actually added to W; that is
exactly (alpha/r)^2 times the paper's term, so the same loss needs beta_paper = beta_scaled * (alpha/r)^2
(the old default was the scaled form: an old beta carries over multiplied by (alpha/r)^2). It is kept because it
measures the real update
(what `lora_core.overlap` reports) and so does not change meaning when alpha/r does. With
`normalize=True` the two agree up to eps, since s^2 cancels in R / ||dW||^2. `lowrank_overlap`
itself always takes s explicitly.

"uniform" weighting drops S (all weights 1). `normalize=True` divides S by ||S||_2 (spectral
weighting only: uniform weights stay 1 so that uniform+normalize is exactly the fraction of dW's
energy inside the subspace, in [0, 1]; a random dW has about k/N of it on the column side) and
divides R by ||dW||_F^2 + eps, with ||dW||_F^2 = s^2 tr(G_B G_A). Nothing of size N x K is ever
formed, so a step costs O((N + K) r k) and gradients reach A and B through ordinary autograd.

The one-off SVDs are cached (`svd_cache.DEFAULT_CACHE`; `SVDCache.save/load` for disk), so the overlap
analysis and merges in the same process reuse them; their measured cost is in bench/RESULTS.md.

Each module uses its own k = min(k, N, K) (the authors' code let the first small matrix overwrite the
global k; here a per-module cap is computed and recorded in `self.k_per_module`). Pass
`cap_k=False` to refuse a k larger than some module instead of capping it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lora_core._adapted import adapted_modules
from lora_core.common.progress import progress as progress_bar
from lora_core.svd_cache import DEFAULT_CACHE, SpectralBasis, SVDCache, check_k, check_svd_dtype

SIDES = ("column", "row", "both")
WEIGHTINGS = ("spectral", "uniform")


def check_side_weighting(side: str, weighting: str) -> None:
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}: expected one of {', '.join(SIDES)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: expected one of {', '.join(WEIGHTINGS)}")


def lowrank_overlap(
    U: torch.Tensor | None,
    S: torch.Tensor,
    V: torch.Tensor | None,
    B: torch.Tensor,
    A: torch.Tensor,
    scaling: float,
    side: str = "column",
    weighting: str = "spectral",
    normalize: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The paper's overlap term of dW = scaling * B @ A against (U, S, V), without forming dW.

    U (N, k) is needed for side column/both, V (K, k) for row/both; S (k,) always (for its length and,
    with spectral weighting, its values). B (N, r), A (r, K). Returns a 0-dim tensor. Leading batch
    dimensions are allowed on every argument (G modules of one shape at once -> shape (G,)).
    """
    check_side_weighting(side, weighting)
    if weighting == "uniform":
        w = torch.ones_like(S)
    elif normalize:
        w = S / S.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(S.dtype).tiny)
    else:
        w = S
    s2 = float(scaling) ** 2
    dims = (-2, -1)
    if side == "column":
        SP = w[..., :, None] * (U.mT @ B)  # (..., k, r)
        G_A = A @ A.mT  # (..., r, r)
        R = s2 * ((SP @ G_A) * SP).sum(dims)
    elif side == "row":
        QS = (A @ V) * w[..., None, :]  # (..., r, k)
        G_B = B.mT @ B  # (..., r, r)
        R = s2 * ((G_B @ QS) * QS).sum(dims)
    else:
        SP = w[..., :, None] * (U.mT @ B)  # (..., k, r)
        QS = (A @ V) * w[..., None, :]  # (..., r, k)
        R = s2 * (SP @ QS).square().sum(dims)
    if normalize:
        # ||s B A||_F^2 = s^2 tr(B^T B A A^T); both Grams are symmetric so the trace is an elementwise sum.
        energy = s2 * ((B.mT @ B) * (A @ A.mT)).sum(dims)
        R = R / (energy + eps)
    return R


def dense_overlap(
    U: torch.Tensor | None,
    S: torch.Tensor,
    V: torch.Tensor | None,
    dW: torch.Tensor,
    side: str = "column",
    weighting: str = "spectral",
    normalize: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The same quantity for an explicit update dW (N, K), e.g. full fine-tuning's W_tuned - W_base.

    Costs O(N K k): one product with U or V, never an SVD of dW.
    """
    check_side_weighting(side, weighting)
    if weighting == "uniform":
        w = torch.ones_like(S)
    elif normalize:
        w = S / S.norm().clamp_min(torch.finfo(S.dtype).tiny)
    else:
        w = S
    if side == "column":
        R = (w[:, None] * (U.T @ dW)).square().sum()  # (k, K)
    elif side == "row":
        R = ((dW @ V) * w[None, :]).square().sum()  # (N, k)
    else:
        R = (w[:, None] * (U.T @ dW @ V) * w[None, :]).square().sum()  # (k, k)
    if normalize:
        R = R / (dW.square().sum() + eps)
    return R


@dataclass
class _Entry:
    name: str
    module: nn.Module
    k: int
    basis: SpectralBasis  # on CPU in the SVD dtype


class OrthogonalityRegularizer:
    """Sum over the adapted modules of the overlap term between dW = s B A and W's top-k subspace.

    Usage: `reg = OrthogonalityRegularizer(model, k=64); loss = sft_loss + beta * reg()`.
    Each term is the paper's, on dW = B A; `scaled_update=True` puts LoRA's alpha/r into dW, which
    multiplies every raw term by (alpha/r)^2 (see the module docstring for when that is wanted).
    The bases are computed (or fetched from `cache`) once, here; `reg()` only does small products.
    `modules` restricts to a subset of qualified names. The frozen `weight` of each module is
    decomposed as it is (for PiSSA/MiLoRA that is the residual weight).
    """

    def __init__(
        self,
        model: nn.Module,
        k: int,
        side: str = "column",
        weighting: str = "spectral",
        normalize: bool = False,
        eps: float = 1e-8,
        *,
        svd_dtype=torch.float32,
        cache: SVDCache | None = None,
        cap_k: bool = True,
        modules: list[str] | None = None,
        progress: bool | None = None,
        scaled_update: bool = False,
    ):
        check_side_weighting(side, weighting)
        if not isinstance(scaled_update, bool):
            raise ValueError(f"scaled_update must be True or False, got {scaled_update!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.side, self.weighting, self.normalize, self.eps = side, weighting, bool(normalize), float(eps)
        self.k = k
        self.scaled_update = scaled_update
        self.svd_dtype = check_svd_dtype(svd_dtype)
        cache = DEFAULT_CACHE if cache is None else cache
        found = adapted_modules(model)
        if modules is not None:
            missing = [n for n in modules if n not in found]
            if missing:
                raise ValueError(f"modules not adapted with LoRA in this model: {missing}")
            found = {n: found[n] for n in modules}
        if not found:
            raise ValueError("the model has no LoRA-adapted modules: inject LoRA before building the regulariser")
        self.entries: list[_Entry] = []
        for name, module in progress_bar(list(found.items()), desc="top-k SVD", enabled=progress):
            if getattr(module, "merged", False):
                raise ValueError(f"{name}: adapter is merged into the weight; unmerge before regularising")
            W = module.weight
            k_mod = min(k, *W.shape) if cap_k else check_k(k, W.shape, name)
            basis = cache.get(name, W, k_mod, self.svd_dtype)
            self.entries.append(_Entry(name, module, k_mod, basis))
        self.k_per_module = {e.name: e.k for e in self.entries}
        self._placed: dict[tuple, list] = {}

    def _compute_dtype(self) -> torch.dtype:
        # float64 adapters stay float64 (tests, analysis); anything narrower is computed in float32,
        # since bf16 Grams of small adapters lose the term's low bits.
        return torch.float64 if self.entries[0].module.lora_A.dtype == torch.float64 else torch.float32

    def _placed_bases(self, device, dtype) -> list[SpectralBasis]:
        key = ("single", str(device), dtype)
        if key not in self._placed:
            self._placed[key] = [e.basis.to(device=device, dtype=dtype) for e in self.entries]
        return self._placed[key]

    def _groups(self, device, dtype) -> list[tuple[list[_Entry], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Entries of equal (N, K, r, k, scaling) with their bases stacked: (G, N, k), (G, k), (G, K, k)."""
        key = ("grouped", str(device), dtype)
        if key not in self._placed:
            by_key: dict[tuple, list[_Entry]] = {}
            for e in self.entries:
                m = e.module
                by_key.setdefault((tuple(m.weight.shape), m.lora_A.shape[0], e.k, self._scale(m)), []).append(e)
            groups = []
            for entries in by_key.values():
                U = torch.stack([e.basis.U for e in entries]).to(device=device, dtype=dtype)
                S = torch.stack([e.basis.S for e in entries]).to(device=device, dtype=dtype)
                V = torch.stack([e.basis.V for e in entries]).to(device=device, dtype=dtype)
                groups.append((entries, U, S, V))
            self._placed[key] = groups
        return self._placed[key]

    def _scale(self, module: nn.Module) -> float:
        """s in dW = s B A: 1 for the paper's form, LoRA's alpha/r when scaled_update is set."""
        return float(module.scaling) if self.scaled_update else 1.0

    def terms(self) -> dict[str, torch.Tensor]:
        """Per-module terms (0-dim tensors with autograd graphs); `reg()` is their sum, batched."""
        out = {}
        first = self.entries[0].module.lora_A
        dtype = self._compute_dtype()
        for e, b in zip(self.entries, self._placed_bases(first.device, dtype)):
            A = e.module.lora_A.to(dtype)
            B = e.module.lora_B.to(dtype)
            out[e.name] = lowrank_overlap(
                b.U, b.S, b.V, B, A, self._scale(e.module), self.side, self.weighting, self.normalize, self.eps
            )
        return out

    def reg(self) -> torch.Tensor:
        """Summed term over the adapted modules (0-dim tensor; differentiable in every lora_A/lora_B).

        Modules of one shape are evaluated together with batched matmuls (a model has a handful of
        distinct shapes, e.g. 4 for SmolLM2's 7 projections x 30 layers), so the per-step cost is a
        few dozen small kernels instead of ~20 per module.
        """
        first = self.entries[0].module.lora_A
        dtype = self._compute_dtype()
        total = []
        for entries, U, S, V in self._groups(first.device, dtype):
            A = torch.stack([e.module.lora_A for e in entries]).to(dtype)  # (G, r, K)
            B = torch.stack([e.module.lora_B for e in entries]).to(dtype)  # (G, N, r)
            scaling = self._scale(entries[0].module)  # one value per group: it is part of the key
            total.append(lowrank_overlap(U, S, V, B, A, scaling, self.side, self.weighting,
                                         self.normalize, self.eps).sum())
        return torch.stack(total).sum()

    __call__ = reg

    def __repr__(self) -> str:
        return (
            f"OrthogonalityRegularizer(modules={len(self.entries)}, k={self.k}, side={self.side!r}, "
            f"weighting={self.weighting!r}, normalize={self.normalize}, scaled_update={self.scaled_update})"
        )
