"""A key/value cache for incremental decoding.

Keys and values are written into pre-allocated (B, Hkv, capacity, D) buffers, so a decoding step
costs one slice write per layer instead of a concatenation that copies the whole history. The cache
also keeps the key padding mask (B, capacity), so callers only pass the mask of the new tokens.
When the capacity is exceeded the buffers grow (doubling), which keeps long unplanned runs correct.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, capacity: int = 0):
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.num_layers = num_layers
        self.capacity = max(int(capacity), 0)
        self.length = 0  # tokens already stored (same for every layer)
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self.key_mask: torch.Tensor | None = None  # (B, capacity) bool, True = real token

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity, 16)
        for i in range(self.num_layers):
            for store in (self._k, self._v):
                old = store[i]
                if old is None:
                    continue
                fresh = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
                fresh[:, :, : self.length] = old[:, :, : self.length]
                store[i] = fresh
        if self.key_mask is not None:
            fresh_mask = self.key_mask.new_zeros(self.key_mask.shape[0], new_cap)
            fresh_mask[:, : self.length] = self.key_mask[:, : self.length]
            self.key_mask = fresh_mask
        self.capacity = new_cap

    def append_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Record the padding mask (B, T) of the tokens about to be added; returns (B, length+T)."""
        batch, steps = mask.shape
        end = self.length + steps
        if end > self.capacity:
            self._grow(end)
        if self.key_mask is None:
            self.key_mask = torch.zeros(batch, self.capacity, dtype=torch.bool, device=mask.device)
        elif self.key_mask.shape[0] != batch:
            raise ValueError(f"batch size {batch} differs from the cache's {self.key_mask.shape[0]}")
        self.key_mask[:, self.length:end] = mask.to(torch.bool)
        return self.key_mask[:, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) for `layer` at the current length; return the full history."""
        steps = k.shape[2]
        end = self.length + steps
        if end > self.capacity:
            self._grow(end)
        if self._k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self._k[layer] = k.new_zeros(shape)
            self._v[layer] = v.new_zeros(shape)
        k_store, v_store = self._k[layer], self._v[layer]
        if k_store.shape[0] != k.shape[0] or k_store.dtype != k.dtype:
            raise ValueError(
                f"layer {layer}: keys {tuple(k.shape)} {k.dtype} do not fit the cache "
                f"{tuple(k_store.shape)} {k_store.dtype}"
            )
        k_store[:, :, self.length:end] = k
        v_store[:, :, self.length:end] = v
        return k_store[:, :, :end], v_store[:, :, :end]

    def advance(self, steps: int) -> None:
        """Called once per forward, after every layer stored its `steps` new positions."""
        self.length += steps
