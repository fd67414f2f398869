"""A minimal Llama / Qwen2 decoder whose module names and state-dict keys are those of HF.

`model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.mlp.{gate,up,
down}_proj`, `model.layers.{i}.{input,post_attention}_layernorm`, `model.norm`, `lm_head`: keeping
HF's names means LoRA targets, PEFT adapter keys and safetensors checkpoints line up with no
renaming table.

Numerics conventions (each tested against transformers on the same weights):
- RMSNorm in HF's cast order: normalise in float32, cast back to the input dtype, *then* multiply
  by the weight in the weight's dtype (T5/Llama style; Gemma differs and is not supported).
- RoPE in the rotate_half (non-interleaved) layout, see rope.py.
- Attention: scaled_dot_product_attention with scale head_dim**-0.5 and a boolean mask that is
  (causal) AND (key is not padding). Every query may also see its own position: a padded query row
  would otherwise have no key at all, sdpa returns NaN for it, and 0 * NaN leaks into real rows
  through the value product. Padded rows' outputs are meaningless and never read.
- GQA: key/value heads are shared by groups of query heads through sdpa's `enable_gqa`, so k/v are
  never copied num_kv_groups times.
- A decode step on CPU (one query per row, no autograd) runs `single_query_attention` instead of
  sdpa: the same softmax in float32, written as two batched matmuls. CPU sdpa's flash kernel is
  slow for one query (bf16, batch 16: 8 times slower at 100 keys, 19 at 600; figures in
  bench/RESULTS.md); its result is the same to the output dtype's rounding.
- Positions come from the padding mask (cumulative count of real tokens - 1), so a left-padded
  prompt gets the same positions as the unpadded one.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import KVCache
from .rope import RotaryEmbedding, apply_rotary, rotate_half

# torch.compile'd forms of the elementwise ops, used on the training (grad) path once
# compile_elementwise() succeeded; empty = the eager autograd Functions below.
_COMPILED: dict[str, object] = {}


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm, op for op (the numerics convention of the module docstring)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    # HF order: cast back first, then scale by the weight.
    return weight * h.to(dtype)


class _RMSNormFn(torch.autograd.Function):
    """rms_norm_reference with a lean backward: keeps x and rstd (one float per row) only.

    Autograd's graph of the reference keeps x in float32, h^2, the normalised float32 h and
    its cast: for a bf16 (M, D) input that is five more (M, D) tensors per norm, two norms per
    layer. With n = cast(h * rstd), y = w * n:
        dw = sum_rows dy * n;  dn = dy * w;  dh = rstd * dn - h * rstd^3 * mean(dn * h)
    with dn upcast to float32 first (the backward of the cast), dx = dh in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        h = x.to(torch.float32)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        h = x.to(torch.float32)
        dx = dw = None
        if ctx.needs_input_grad[1]:
            n = (h * rstd).to(x.dtype)
            dw = (dy * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dn = (dy * weight).to(torch.float32)
            dot = (dn * h).mean(-1, keepdim=True)  # (..., 1)
            dx = (dn * rstd).sub_(h * (rstd.pow(3) * dot)).to(x.dtype)
        return dx, dw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            compiled = _COMPILED.get("rms_norm")
            if compiled is not None:
                return compiled(x, self.weight, self.eps)
            return _RMSNormFn.apply(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


class _SiluMul(torch.autograd.Function):
    """silu(g) * u keeping g and u only; silu(g) is recomputed in backward (one cheap pass)
    instead of kept: an (M, intermediate) tensor per layer, the largest activation there is.
    The backward runs the ops autograd would (mul, aten silu_backward), so results are equal."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg = du = None
        if ctx.needs_input_grad[1]:
            du = dy * F.silu(g)
        if ctx.needs_input_grad[0]:
            dg = torch.ops.aten.silu_backward(dy * u, g)
        return dg, du


def _silu_mul_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        compiled = _COMPILED.get("silu_mul")
        return compiled(g, u) if compiled is not None else _SiluMul.apply(g, u)
    return _silu_mul_reference(g, u)


def _rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    compiled = _COMPILED.get("rotary")
    if compiled is not None and torch.is_grad_enabled() and x.requires_grad:
        return compiled(x, cos, sin)
    return apply_rotary(x, cos, sin)


def compile_elementwise(config: ModelConfig, dtype: torch.dtype, device="cpu") -> float:
    """torch.compile RMSNorm, SiLU-mul and RoPE for training; returns the seconds it took.

    Why these and not the block: the LoRA linears draw their dropout mask with host-side
    control flow (kernels/dropout.py), a graph break per projection, while these three are
    pure elementwise chains that inductor fuses into one loop each, forward and backward.
    Each gets severalfold faster, for seconds of compiling on a cold cache, so it pays from a few
    dozen steps on (figures in bench/RESULTS.md).

    Compiles with dynamic shapes and runs one forward and backward of each on small tensors of
    `dtype`, so failures (no C++ compiler, an unsupported platform) surface here, not in the
    middle of training. On failure nothing is switched on and RuntimeError names the cause.
    """
    import time

    start = time.perf_counter()
    kw = {"dtype": dtype, "device": device}
    d, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    samples = {
        "rms_norm": (torch.randn(2, 3, d, **kw, requires_grad=True), torch.ones(d, **kw), config.rms_norm_eps),
        "silu_mul": (torch.randn(2, 3, inter, **kw, requires_grad=True),
                     torch.randn(2, 3, inter, **kw, requires_grad=True)),
        "rotary": (torch.randn(2, config.num_attention_heads, 3, hd, **kw, requires_grad=True),
                   torch.randn(2, 1, 3, hd, **kw), torch.randn(2, 1, 3, hd, **kw)),
    }
    try:
        candidates = {name: torch.compile(fn, dynamic=True) for name, fn in
                      (("rms_norm", rms_norm_reference), ("silu_mul", _silu_mul_reference),
                       ("rotary", _rotary_reference))}
        for name, fn in candidates.items():
            fn(*samples[name]).sum().backward()
    except Exception as error:  # any compiler/toolchain failure means: stay eager
        raise RuntimeError(f"torch.compile failed ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else 'no message'})") from error
    _COMPILED.update(candidates)
    return time.perf_counter() - start


def disable_compiled_elementwise() -> None:
    """Back to the eager autograd Functions (compile_elementwise undone)."""
    _COMPILED.clear()


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for one query per row: q (B, H, 1, D), k and v (B, Hkv, L, D),
    mask (B, 1, 1, L) bool (True = may attend) or None -> (B, H, 1, D) in q's dtype.

    The query heads of each key/value group are stacked as the rows of one matmul (GQA without
    copying k/v); scores, softmax and the value product run in float32, as sdpa accumulates.
    """
    batch, heads, _, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim).float()  # (B, Hkv, G, D)
    scores = torch.matmul(grouped, k.float().transpose(-1, -2)).mul_(scale)  # (B, Hkv, G, L)
    if mask is not None:
        scores = scores.masked_fill_(~mask.reshape(batch, 1, 1, keys), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())  # (B, Hkv, G, D)
    return out.reshape(batch, heads, 1, dim).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=config.o_bias)

    def forward(self, x, cos, sin, attn_mask, is_causal: bool, kv_cache: KVCache | None):
        batch, steps, _ = x.shape
        fused = self.__dict__.get("fused_qkv")  # set by packed_linear.packed_linears for generation
        if fused is not None:
            kv_width = self.num_kv_heads * self.head_dim
            q, k, v = fused(x).split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q = _rotary(q, cos, sin)
        k = _rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, L, D)
        if steps == 1 and x.device.type == "cpu" and not torch.is_grad_enabled():
            out = single_query_attention(q, k, v, attn_mask, self.scale)
            return self.o_proj(out.transpose(1, 2).reshape(batch, steps, self.num_heads * self.head_dim))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, steps, self.num_heads * self.head_dim)
        return self.o_proj(out)


class _Rebuild(NamedTuple):
    """What is stored instead of a view of the rebuilt tensor: its geometry only."""
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int


def _rebuilt_from(target: torch.Tensor, rebuild):
    """Saved-tensor hooks under which autograd stores no copy of `target` (nor of its views):
    rebuild() makes it again, in the same layout, when the backward unpacks it."""
    storage = target.untyped_storage().data_ptr()

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() == storage and t.device == target.device:
            return _Rebuild(t.shape, t.stride(), t.storage_offset())
        return t

    def unpack(saved):
        if not isinstance(saved, _Rebuild):
            return saved
        with torch.no_grad():
            fresh = rebuild().contiguous()  # the layout silu_mul returned
        return fresh.as_strided(saved.shape, saved.stride, saved.offset)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.__dict__.get("fused_gate_up")  # set by packed_linear.packed_linears for generation
        if fused is not None:
            g, u = fused(x).chunk(2, dim=-1)  # (B, T, I) each
        else:
            g, u = self.gate_proj(x), self.up_proj(x)  # (B, T, I)
        p = silu_mul(g, u)
        if not (torch.is_grad_enabled() and p.requires_grad) or _COMPILED:
            return self.down_proj(p)
        # down_proj keeps its input p for its own backward (dA needs it), while silu_mul already
        # keeps g and u: p is rebuilt from them instead (one elementwise pass in backward, the
        # ops of _SiluMul.forward, so bit-identical), an (M, I) activation less per layer. Not
        # with --compile, whose fused kernel need not round exactly as the eager recompute.
        with _rebuilt_from(p, lambda: F.silu(g) * u):
            return self.down_proj(p)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, is_causal, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """HF's `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head.weight with the embeddings when the config says so (re-run after assign=True loads)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_kv_cache(self, capacity: int = 0) -> KVCache:
        return KVCache(self.config.num_hidden_layers, capacity)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final-norm hidden states (B, T, D), i.e. everything before lm_head.

        attention_mask: (B, T) for the new tokens, or (B, past+T) covering the cache too (HF style);
        1 = token, 0 = padding. kv_cache: new tokens are appended to it.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        batch, steps = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        new_mask = None
        if attention_mask is not None:
            if (attention_mask.dim() != 2 or attention_mask.shape[0] != batch
                    or attention_mask.shape[1] not in (steps, past + steps)):
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                    f"{tuple(input_ids.shape)} with {past} cached positions"
                )
            new_mask = attention_mask[:, attention_mask.shape[1] - steps:].to(torch.bool)

        if kv_cache is not None:
            if new_mask is None:
                new_mask = torch.ones(batch, steps, dtype=torch.bool, device=input_ids.device)
            key_mask = kv_cache.append_mask(new_mask)  # (B, past+T)
        else:
            key_mask = new_mask  # (B, T) or None
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None  # no padding anywhere: let sdpa take its causal fast path

        if position_ids is None:
            if key_mask is not None:
                position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + steps, device=input_ids.device).expand(batch, steps)
        elif position_ids.shape != (batch, steps):
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids {tuple(input_ids.shape)}")

        attn_mask, is_causal = _attention_mask(key_mask, past, steps, input_ids.device)
        h = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.rotary(position_ids, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, attn_mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(steps)
        return self.model.norm(h)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None) -> torch.Tensor:
        """-> logits (B, T, V) in the model dtype."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, kv_cache))


def _attention_mask(key_mask, past: int, steps: int, device) -> tuple[torch.Tensor | None, bool]:
    """Boolean (B, 1, T, L) mask (True = may attend), or None with is_causal when it is purely causal."""
    total = past + steps
    if key_mask is None:
        if steps == 1:
            return None, False  # one new query sees the whole history
        if past == 0:
            return None, True
    q_pos = torch.arange(past, total, device=device).unsqueeze(1)  # (T, 1)
    k_pos = torch.arange(total, device=device).unsqueeze(0)  # (1, L)
    allowed = k_pos <= q_pos  # (T, L) causal
    if key_mask is None:
        return allowed, False
    allowed = allowed.unsqueeze(0) & key_mask.unsqueeze(1)  # (B, T, L)
    allowed = allowed | (k_pos == q_pos)  # own position: no empty rows, no NaN
    return allowed.unsqueeze(1), False
