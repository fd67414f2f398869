"""A key/value cache for incremental decoding.

Keys and values are written into pre-allocated (B, Hkv, capacity, D) buffers, so a decoding step
costs one slice write per layer instead of a concatenation that copies the whole history. The cache
also keeps the key padding mask (B, capacity), so callers only pass the mask of the new tokens.
When the capacity is exceeded the buffers grow (doubling), which keeps long unplanned runs correct.

SlotKVCache is what generate() decodes with: one row (slot) per sequence, every buffer allocated
once at its final size, each slot at its own length, so a sequence that finishes hands its slot to
a waiting prompt while the others go on (continuous batching).
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

    def stored(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values `layer` holds so far, (B, Hkv, length, D) each."""
        if self._k[layer] is None:
            raise ValueError(f"layer {layer} holds nothing yet")
        return self._k[layer][:, :, : self.length], self._v[layer][:, :, : self.length]


class SlotKVCache:
    """Buffers (S, Hkv, capacity, D) per layer for S slots, each holding one sequence at its own
    length: the sequence's tokens sit at positions 0..length-1 of its row, with no padding. The
    buffers' dtype may be wider than the model's (generate keeps float32 on a CPU).

    `fill` moves freshly prefilled prompts (from a KVCache, left-padded) into free slots, dropping
    their padding. A decode step (`begin_step`, the layers through `layer_views()`, `advance`)
    writes each row's new token at that row's length and attends over the first `visible`
    positions of every row, the key mask hiding what a row does not hold. `release` empties a
    slot (length 0), and `keep` drops slots for good when no prompt is left to fill them.
    """

    def __init__(self, num_layers: int, slots: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if min(num_layers, slots, num_kv_heads, head_dim, capacity) <= 0:
            raise ValueError(
                f"cache sizes must be positive, got layers={num_layers} slots={slots} "
                f"kv_heads={num_kv_heads} head_dim={head_dim} capacity={capacity}"
            )
        shape = (slots, num_kv_heads, capacity, head_dim)
        self.num_layers, self.capacity = num_layers, capacity
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_mask = torch.zeros(slots, capacity, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # next write position per slot
        self.rows = torch.arange(slots, device=device)
        # Eager steps attend over the positions any slot holds (attending over a whole 128-slot
        # buffer doubled the attention's time at batch 16); a compiled step needs the fixed full
        # shape and sets this to None.
        self.visible: int | None = None

    @property
    def slots(self) -> int:
        return self.key_mask.shape[0]

    def fill(self, slots: list[int], prefilled: KVCache) -> list[int]:
        """Copy row j of `prefilled` into slot slots[j], its real tokens only (those its key mask
        marks: padding may sit anywhere, e.g. between a shared prefix and a prompt's own tokens).
        -> the number of tokens each slot now holds."""
        width = prefilled.length
        mask = prefilled.key_mask[:, :width]  # (n, width)
        if len(slots) != mask.shape[0]:
            raise ValueError(f"{len(slots)} slots for {mask.shape[0]} prefilled prompts")
        positions = [row.nonzero().squeeze(-1) for row in mask]  # each row's real tokens, in order
        lengths = [len(p) for p in positions]
        if max(lengths) >= self.capacity:
            raise ValueError(f"a prompt of {max(lengths)} tokens leaves no room in a capacity of {self.capacity}")
        for layer in range(self.num_layers):
            keys, values = prefilled.stored(layer)  # (n, Hkv, width, D)
            for row, (slot, where) in enumerate(zip(slots, positions)):
                self.keys[layer][slot, :, : len(where)] = keys[row].index_select(1, where)  # cast to the cache's dtype
                self.values[layer][slot, :, : len(where)] = values[row].index_select(1, where)
        for slot, n in zip(slots, lengths):
            self.key_mask[slot] = False
            self.key_mask[slot, :n] = True
            self.lengths[slot] = n
        return lengths

    def release(self, slot: int) -> None:
        """The slot's sequence is finished: it holds nothing from now on."""
        self.key_mask[slot] = False
        self.lengths[slot] = 0

    def keep(self, slots: list[int]) -> None:
        """Keep only these slots, renumbered 0..len-1 in the given order (a smaller batch)."""
        index = torch.tensor(slots, dtype=torch.long, device=self.key_mask.device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.key_mask = self.key_mask.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self.rows = torch.arange(len(slots), device=self.key_mask.device)

    def begin_step(self, fixed_shape: bool) -> torch.Tensor:
        """Before a decode step: each row's new token goes to its length, and the row may see it.

        -> the key mask (S, 1, 1, L) the step attends with: L = capacity when `fixed_shape`, else
        the positions the longest row holds after this step.
        """
        longest = int(self.lengths.max())
        if longest >= self.capacity:
            raise ValueError(f"slot cache full: a row holds {longest} positions, capacity {self.capacity}")
        self.key_mask[self.rows, self.lengths] = True
        self.visible = None if fixed_shape else longest + 1
        return self.key_mask[:, None, None, : self.capacity if fixed_shape else longest + 1]

    def advance(self, live: torch.Tensor) -> None:
        """After a decode step: rows that are still generating (live, (S,) bool) grew by one."""
        self.lengths += live.to(self.lengths.dtype)

    def layer_views(self) -> list["LayerCacheView"]:
        return [LayerCacheView(self, k, v) for k, v in zip(self.keys, self.values)]


class LayerCacheView:
    """One layer's buffers in decode mode: `update` writes each row's new key and value at that
    row's length and returns the buffers. It ignores the layer index the decoder passes, on
    purpose: a compiled layer step that read it was specialised on it and recompiled once per layer."""

    __slots__ = ("cache", "keys", "values")

    def __init__(self, cache: SlotKVCache, keys: torch.Tensor, values: torch.Tensor):
        self.cache, self.keys, self.values = cache, keys, values

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        self.keys[cache.rows, :, cache.lengths] = k[:, :, 0].to(self.keys.dtype)  # k (S, Hkv, 1, D)
        self.values[cache.rows, :, cache.lengths] = v[:, :, 0].to(self.values.dtype)
        visible = cache.visible
        if visible is None:
            return self.keys, self.values  # (S, Hkv, capacity, D)
        return self.keys[:, :, :visible], self.values[:, :, :visible]  # (S, Hkv, visible, D)
