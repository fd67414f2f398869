"""Rotary position embeddings in Hugging Face's layout.

Numerics convention (must match the checkpoints' training code, tested against transformers):
- "rotate_half" (non-interleaved) layout: a head vector is split into two halves [x1 | x2] and
  rotated as [x1*cos - x2*sin | x2*cos + x1*sin], with the frequency table duplicated over the two
  halves. GPT-NeoX and HF Llama use this; Meta's original Llama code rotates interleaved pairs, and
  llama.cpp's GGUF permutes q/k rows to convert between the two (the GGUF importer undoes that).
- Angles are computed in float32 from float32 inverse frequencies, then cos/sin are cast to the
  activation dtype before they multiply q and k (so bf16 runs rotate in bf16 exactly as HF does).
- Llama 3 "llama3" scaling rescales the inverse frequencies once, by wavelength band.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """(head_dim/2,) float32 on CPU, exactly as HF computes them (including llama3 scaling)."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Only "llama3" reaches here (config validation refuses other types).
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, and the band
    # in between is interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Produces (cos, sin) tables for given positions.

    Deliberately not an nn.Module buffer: `model.to(torch.bfloat16)` would cast a float buffer, and
    bf16 inverse frequencies give visibly wrong angles at long positions. The table stays float32.
    """

    def __init__(self, config: ModelConfig):
        self.inv_freq = inverse_frequencies(config)  # (D/2,) float32, CPU
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, 1, T, D) in `dtype`."""
        device = position_ids.device
        inv = self._per_device.get(device)
        if inv is None:
            inv = self._per_device[device] = self.inv_freq.to(device)
        # (B, T, 1) * (D/2,) -> (B, T, D/2), float32 even under autocast.
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_transposed(x: torch.Tensor) -> torch.Tensor:
    """The adjoint of rotate_half: [x1 | x2] -> [x2 | -x1]."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


class _Rotary(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, keeping only cos/sin (shared by every layer) for backward.

    Autograd's graph of the same expression keeps x and rotate_half(x) per call, two more
    (B, H, T, D) tensors for q and for k in every layer. The rotation is linear in x, so
    dx = dy * cos + rotate_half^T(dy * sin): the ops autograd would run, in the same order.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return x * cos + rotate_half(x) * sin

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return dy * cos + _rotate_half_transposed(dy * sin), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, 1, T, D) -> rotated x (B, H, T, D)."""
    if torch.is_grad_enabled() and x.requires_grad and not (cos.requires_grad or sin.requires_grad):
        return _Rotary.apply(x, cos, sin)
    return x * cos + rotate_half(x) * sin
