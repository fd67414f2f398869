"""Initialisations of the LoRA factors A (r, K) and B (N, r).

"default" and "gaussian" start from B = 0, so the adapted layer equals the base layer exactly.
"pissa" and "milora" move r singular triplets of W into A and B and leave the residual in W, so
the layer's output is unchanged up to rounding: PiSSA takes the principal (largest) triplets,
MiLoRA the minor (smallest) ones, which starts learning away from W's principal subspace
(PAPER.md: an initialisation that lowers overlap by construction).
"""
from __future__ import annotations

import math

import torch

# Below this many elements the SVD runs in float64: cheap there, and it keeps the residual of
# the tiny test layers exact to float32 rounding. Larger matrices use float32 (LAPACK cost).
_FLOAT64_SVD_MAX_ELEMENTS = 1 << 20


@torch.no_grad()
def init_default_(lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """A ~ Kaiming-uniform(a=sqrt(5)) (bound 1/sqrt(K), as nn.Linear), B = 0."""
    torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    torch.nn.init.zeros_(lora_b)


@torch.no_grad()
def init_gaussian_(lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """A ~ N(0, (1/r)^2), B = 0 (PEFT's "gaussian")."""
    torch.nn.init.normal_(lora_a, std=1.0 / lora_a.shape[0])
    torch.nn.init.zeros_(lora_b)


@torch.no_grad()
def svd_init(weight: torch.Tensor, r: int, scaling: float, minor: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA (minor=False) or MiLoRA (minor=True) factors of `weight` (N, K).

    With W = U S V^T and the chosen r triplets (U_r, S_r, V_r):
      A = sqrt(S_r / scaling) V_r^T   (r, K)
      B = U_r sqrt(S_r / scaling)     (N, r)
    so scaling * B @ A = U_r S_r V_r^T, and the residual W - scaling * B @ A holds the other triplets.
    Returns (A, B, residual) in weight's dtype; the residual is computed in float32 or float64 from the
    *rounded* A and B, so base(residual) + adapter reproduces W up to one rounding of the residual.
    """
    n, k = weight.shape
    if not 1 <= r <= min(n, k):
        raise ValueError(f"SVD init needs 1 <= r <= min(N, K); got r={r} for a weight of shape {tuple(weight.shape)}")
    work = torch.float64 if n * k <= _FLOAT64_SVD_MAX_ELEMENTS else torch.float32
    w = weight.to(work)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (N, m), (m,), (m, K); s descending
    sel = slice(s.shape[0] - r, None) if minor else slice(0, r)
    root = torch.sqrt(s[sel] / scaling)  # (r,)
    lora_a = (root[:, None] * vh[sel]).to(weight.dtype)  # (r, K)
    lora_b = (u[:, sel] * root[None, :]).to(weight.dtype)  # (N, r)
    residual = w - scaling * (lora_b.to(work) @ lora_a.to(work))
    return lora_a, lora_b, residual.to(weight.dtype)
