"""LoRALinear: a frozen nn.Linear plus a trainable low-rank update, y = x W^T + b + s (x A^T) B^T.

The base keeps its original parameter names (`weight`, `bias`) so a base checkpoint loads into an
adapted model without key remapping, and the adapter lives beside it as `lora_A` (r, K) and
`lora_B` (N, r), PEFT's names. The forward goes through `kernels.lora_linear` (fused Triton on
GPU, addmm path on CPU); merged or disabled adapters use a plain `F.linear`.

merge()/unmerge() use `merge_math.merged_weight` (a float32 sum, float64 for float64 weights; one
cast back), the arithmetic every merge path shares; unmerge recomputes the delta from A and B
instead of storing a copy of W, so it restores W within two roundings in W's dtype:
|W_restored - W| <= eps(dtype) * (|W| + |delta|) elementwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_core import kernels
from .config import LoRAConfig
from .init import init_default_, init_gaussian_, svd_init
from . import merge_math


class LoRALinear(nn.Module):
    """nn.Linear(K -> N) with a frozen base and a rank-r adapter; build with `from_linear`."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float,
                 dropout_p: float = 0.0, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRALinear rank r must be >= 1, got {r}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"LoRALinear dropout_p must be in [0, 1), got {dropout_p}")
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.scaling = float(scaling)
        self.dropout_p = float(dropout_p)
        self.merged = False
        self.adapters_enabled = True
        self.init_method = "default"
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kw))  # (r, K)
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **kw))  # (N, r)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig) -> "LoRALinear":
        """Wrap `linear` (its parameters are reused, not copied) and initialise the adapter.

        For "pissa"/"milora" the base weight becomes the SVD residual, stored in a new Parameter so a
        weight tied elsewhere (e.g. lm_head and embed_tokens) is left untouched.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        if not isinstance(config, LoRAConfig):
            raise TypeError(f"LoRALinear.from_linear expects a LoRAConfig, got {type(config).__name__}")
        w = linear.weight
        if not w.is_floating_point():
            raise TypeError(f"LoRALinear needs a floating-point weight, got {w.dtype}")
        n, k = w.shape
        if config.init in ("pissa", "milora") and config.r > min(n, k):
            raise ValueError(f"init={config.init!r} needs r <= min(N, K); got r={config.r} for weight "
                             f"of shape {(n, k)}")
        # Build on the meta device so no throwaway base weight is allocated, then attach the real one.
        module = cls(k, n, config.r, config.scaling, config.dropout, bias=linear.bias is not None,
                     device="meta", dtype=w.dtype)
        module.weight = linear.weight
        module.weight.requires_grad_(False)
        if linear.bias is not None:
            module.bias = linear.bias
            module.bias.requires_grad_(False)
        module.lora_A = nn.Parameter(torch.empty(config.r, k, device=w.device, dtype=w.dtype))
        module.lora_B = nn.Parameter(torch.empty(n, config.r, device=w.device, dtype=w.dtype))
        module.reset_lora_parameters(config.init)
        # Inherit train/eval mode: a new module defaults to train, which would switch on LoRA dropout
        # inside a model that is in eval mode.
        module.train(linear.training)
        return module

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """(Re)initialise A and B; for SVD inits the base weight becomes the residual."""
        if self.merged:
            raise ValueError("reset_lora_parameters on a merged LoRALinear: unmerge() first")
        if init == "default":
            init_default_(self.lora_A, self.lora_B)
        elif init == "gaussian":
            init_gaussian_(self.lora_A, self.lora_B)
        elif init in ("pissa", "milora"):
            if self.init_method in ("pissa", "milora"):
                raise ValueError(f"the base weight already holds a {self.init_method} residual")
            a, b, residual = svd_init(self.weight, self.r, self.scaling, minor=init == "milora")
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
            self.weight = nn.Parameter(residual, requires_grad=False)
            # The initial factors let save_adapter express the trained adapter against the original
            # W (PEFT's PiSSA conversion); r (N + K) values, the size of the adapter itself.
            self.register_buffer("lora_A_init", a.clone(), persistent=False)
            self.register_buffer("lora_B_init", b.clone(), persistent=False)
        else:
            raise ValueError(f"unknown LoRA init {init!r}")
        self.init_method = init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapters_enabled:
            return F.linear(x, self.weight, self.bias)
        return kernels.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                                   self.dropout_p, training=self.training)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling * B @ A, shape (N, K), computed in `dtype`."""
        return merge_math.delta_weight(self.lora_A, self.lora_B, self.scaling, dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight` (float32 add, one cast back). No-op when already merged."""
        if self.merged:
            return
        self.weight.copy_(merge_math.merged_weight(self.weight, self.lora_A, self.lora_B, self.scaling))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from `weight` again. No-op when not merged.

        A and B must not have changed since merge(): the delta is recomputed, not stored.
        """
        if not self.merged:
            return
        # -scaling negates the delta exactly, so this removes bit for bit what merge() added.
        self.weight.copy_(merge_math.merged_weight(self.weight, self.lora_A, self.lora_B, -self.scaling))
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new nn.Linear holding W + scaling * B @ A (float32 add, one cast); self is unchanged."""
        w = self.weight
        if not self.merged:
            w = merge_math.merged_weight(w, self.lora_A, self.lora_B, self.scaling)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(w)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, scaling={self.scaling:g}, "
                f"dropout_p={self.dropout_p:g}, init={self.init_method}, merged={self.merged}")
