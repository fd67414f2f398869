"""A key/value cache for incremental decoding.

Keys and values are written into pre-allocated (B, Hkv, capacity, D) buffers, so a decoding step
costs one slice write per layer instead of a concatenation that copies the whole history. The cache
also keeps the key padding mask (B, capacity), so callers only pass the mask of the new tokens.
When the capacity is exceeded the buffers grow (doubling), which keeps long unplanned runs correct.

StaticKVCache is the fixed-shape variant generate() decodes with: every buffer is allocated once at
its final size, and a decode step writes its token at a slot held in a tensor and attends over the
whole (masked) buffer, so every step has the same shapes and one compiled graph serves them all.
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


class StaticKVCache:
    """Buffers (B, Hkv, capacity, D) per layer and a key mask (B, capacity), allocated once.

    Prefill uses the KVCache protocol CausalLM.hidden_states speaks (append_mask, update, advance),
    so the prompt goes through the model's own masking code in one pass. Decoding then goes
    through `layer_views()`: each view writes one position at `slot` (a (1,) long tensor the caller
    fills: a tensor, not an int, so a compiled step is not specialised on the step number) and
    returns the full buffers; slots past the current one are zeros, masked out by `key_mask`.
    Every row writes the same slot: rows are left-padded to one width, so step t lands at width + t.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if min(num_layers, batch, num_kv_heads, head_dim, capacity) <= 0:
            raise ValueError(
                f"cache sizes must be positive, got layers={num_layers} batch={batch} "
                f"kv_heads={num_kv_heads} head_dim={head_dim} capacity={capacity}"
            )
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.num_layers, self.capacity, self.batch = num_layers, capacity, batch
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.length = 0
        # Decode views return the first `visible` positions, or the whole buffer when None. Eager
        # steps attend over the filled part only (attending over all of a 128-slot buffer doubled
        # sdpa's time at batch 16); a compiled step needs the fixed full shape.
        self.visible: int | None = None

    def _check_room(self, steps: int) -> int:
        end = self.length + steps
        if end > self.capacity:
            raise ValueError(f"static cache full: {self.length} + {steps} positions > capacity {self.capacity}")
        return end

    def append_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape[0] != self.batch:
            raise ValueError(f"batch size {mask.shape[0]} differs from the cache's {self.batch}")
        end = self._check_room(mask.shape[1])
        self.key_mask[:, self.length:end] = mask.to(torch.bool)
        return self.key_mask[:, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill: store k, v (B, Hkv, T, D) at the current length; return the history so far."""
        end = self._check_room(k.shape[2])
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def begin_step(self, fixed_shape: bool) -> torch.Tensor:
        """Before a decode step: the new token goes to slot `length`, and every row may see it.

        -> the key mask (B, 1, 1, L) the step attends with: L = capacity when `fixed_shape`, else
        the positions filled so far.
        """
        end = self._check_room(1)
        self.slot.fill_(self.length)
        self.key_mask[:, self.length] = True
        self.visible = None if fixed_shape else end
        return self.key_mask[:, None, None, : self.capacity if fixed_shape else end]

    def layer_views(self) -> list["LayerCacheView"]:
        return [LayerCacheView(self, k, v) for k, v in zip(self.keys, self.values)]


class LayerCacheView:
    """One layer's buffers in decode mode: `update` writes the new position at `slot` and returns
    the whole buffers. It ignores the layer index the decoder passes, on purpose: a compiled layer
    step that read it was specialised on it and recompiled once per layer."""

    __slots__ = ("cache", "keys", "values")

    def __init__(self, cache: StaticKVCache, keys: torch.Tensor, values: torch.Tensor):
        self.cache, self.keys, self.values = cache, keys, values

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.cache.slot, k)
        self.values.index_copy_(2, self.cache.slot, v)
        visible = self.cache.visible
        if visible is None:
            return self.keys, self.values  # (B, Hkv, capacity, D)
        return self.keys[:, :, :visible], self.values[:, :, :visible]  # (B, Hkv, visible, D)
