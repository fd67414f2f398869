"""The decoder's lean autograd Functions (RMSNorm, SiLU-mul, RoPE) against autograd of the plain
formulas, and the activation memory they keep (measured with saved-tensor hooks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_core.models.decoder import RMSNorm, rms_norm_reference, silu_mul
from lora_core.models.rope import apply_rotary, rotate_half

# RMSNorm computes in float32 whatever the input (HF's convention), so float64 inputs get float32
# tolerances; bf16: a few bf16 roundings of the result.
TOL = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 2e-2}


def _close(got, want, dtype, what):
    err = (got.double() - want.double()).abs().max().item()
    scale = max(1.0, want.double().abs().max().item())
    assert err <= TOL[dtype] * scale, f"{what} {dtype}: max error {err:.3e} (|max| {scale:.3e})"


def _saved_bytes(fn):
    """Bytes of distinct storages autograd keeps for backward while fn() runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rmsnorm_matches_reference(dtype, weight_grad):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 33, generator=gen, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    norm = RMSNorm(33, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(33, generator=gen, dtype=torch.float64))
    norm.weight.requires_grad_(weight_grad)
    dy = torch.randn(3, 7, 33, generator=gen, dtype=torch.float64).to(dtype)
    leaves = [x, norm.weight] if weight_grad else [x]
    y = norm(x)
    got = torch.autograd.grad(y, leaves, dy)
    want_y = rms_norm_reference(x, norm.weight, 1e-6)
    want = torch.autograd.grad(want_y, leaves, dy)
    assert torch.equal(y, want_y), "the forward must be the reference op for op"
    for g, w, name in zip(got, want, ("dx", "dw")):
        _close(g, w, dtype, f"rmsnorm {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_silu_mul_and_rotary_match_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    g, u = mk(4, 5, 24).requires_grad_(True), mk(4, 5, 24).requires_grad_(True)
    dy = mk(4, 5, 24)
    y = silu_mul(g, u)
    want_y = F.silu(g) * u
    assert torch.equal(y, want_y)
    for a, b, name in zip(torch.autograd.grad(y, (g, u), dy), torch.autograd.grad(want_y, (g, u), dy), ("dg", "du")):
        assert torch.equal(a, b), f"silu_mul {name} {dtype}: max error {(a - b).abs().max():.3e}"

    x = mk(2, 3, 6, 8).requires_grad_(True)
    angles = mk(2, 1, 6, 8)
    cos, sin = angles.cos(), angles.sin()
    dy = mk(2, 3, 6, 8)
    y = apply_rotary(x, cos, sin)
    want_y = x * cos + rotate_half(x) * sin
    assert torch.equal(y, want_y)
    (got,), (want,) = torch.autograd.grad(y, (x,), dy), torch.autograd.grad(want_y, (x,), dy)
    assert torch.equal(got, want), f"rotary dx {dtype}: max error {(got - want).abs().max():.3e}"


def test_saved_activations_are_lean():
    # bf16 (M, D) input: the lean norm keeps x and one float32 per row; autograd's graph of the
    # reference keeps x, float32 h, h^2-related and normalised tensors (measured ~ 5x more).
    M, D, inter = 64, 96, 160
    x = torch.randn(M, D, dtype=torch.bfloat16, requires_grad=True)
    norm = RMSNorm(D, 1e-6).to(torch.bfloat16).requires_grad_(False)
    _, lean = _saved_bytes(lambda: norm(x))
    assert lean <= x.numel() * 2 + M * 4 + D * 2, f"RMSNorm keeps {lean} bytes for a {x.numel() * 2}-byte input"

    g = torch.randn(M, inter, requires_grad=True)
    u = torch.randn(M, inter, requires_grad=True)
    _, kept = _saved_bytes(lambda: silu_mul(g, u))
    assert kept <= 2 * g.numel() * 4, f"silu_mul keeps {kept} bytes, more than its two inputs"

    q = torch.randn(2, 3, 8, 16, requires_grad=True)
    angles = torch.randn(2, 1, 8, 16)
    cos, sin = angles.cos(), angles.sin()
    _, kept = _saved_bytes(lambda: apply_rotary(q, cos, sin))
    assert kept <= cos.numel() * 4 * 2, f"rotary keeps {kept} bytes besides the shared cos/sin tables"


def _mlp_grads(model, ids, seed=5):
    torch.manual_seed(seed)  # dropout seeds come from the global RNG
    params = [p for p in model.parameters() if p.requires_grad]
    out = model.hidden_states(ids)
    return [g.clone() for g in torch.autograd.grad(out.float().pow(2).sum(), params)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("checkpointed", [False, True])
def test_mlp_rebuilds_down_proj_input_bit_identically(monkeypatch, dtype, checkpointed):
    import contextlib

    import lora_core.models.decoder as decoder
    from helpers.tiny_models import tiny_causal_lm
    from lora_core import LoRAConfig, inject_lora
    from lora_core.train.sft.model_prep import enable_gradient_checkpointing

    model = tiny_causal_lm(vocab=40, seed=2).to(dtype).train()
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.2, target_modules=["gate_proj", "down_proj", "q_proj"]))
    if checkpointed:
        enable_gradient_checkpointing(model)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    got = _mlp_grads(model, ids)
    # Reference: the same model storing down_proj's input as usual.
    monkeypatch.setattr(decoder, "_rebuilt_from", lambda *a: contextlib.nullcontext())
    want = _mlp_grads(model, ids)
    for g, w in zip(got, want):
        assert torch.equal(g, w), f"grad {tuple(g.shape)} differs: max {(g - w).abs().max():.3e}"


def test_mlp_keeps_no_copy_of_the_down_proj_input(monkeypatch):
    import lora_core.models.decoder as decoder
    from helpers.tiny_models import tiny_causal_lm
    from lora_core import LoRAConfig, inject_lora

    model = tiny_causal_lm(vocab=40, seed=2).train()
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    mlp = model.model.layers[0].mlp
    kept, replaced = [], []
    real = decoder._rebuilt_from

    def spying(target, rebuild):
        hooks = real(target, rebuild)
        pack = hooks.pack_hook

        def spy(t):
            out = pack(t)
            (replaced if out is not t else kept).append(t)
            return out

        hooks.pack_hook = spy
        return hooks

    monkeypatch.setattr(decoder, "_rebuilt_from", spying)
    x = torch.randn(3, 5, model.config.hidden_size, requires_grad=True)
    mlp(x).sum().backward()
    inter = 3 * 5 * model.config.intermediate_size
    assert [t.numel() for t in replaced] == [inter], f"replaced: {[tuple(t.shape) for t in replaced]}"
    p_storage = replaced[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != p_storage for t in kept), "a view of p was still saved"
    assert x.grad is not None and mlp.down_proj.lora_A.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,keys,masked", [(2, 7, False), (2, 130, True), (7, 600, True)])
def test_single_query_attention_equals_fp64_reference(dtype, kv_heads, keys, masked):
    """The decode step's attention against softmax(q k^T / sqrt(d)) v in float64, and no further
    from it than sdpa is (both round once, to the output dtype)."""
    import torch.nn.functional as F

    from lora_core.models.decoder import single_query_attention

    gen = torch.Generator().manual_seed(keys)
    batch, heads, dim = 3, 14, 64
    q, k, v = (torch.randn(shape, generator=gen).mul(2).to(dtype) for shape in
               [(batch, heads, 1, dim), (batch, kv_heads, keys, dim), (batch, kv_heads, keys, dim)])
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, keys, generator=gen) > 0.3
        mask[..., -1] = True  # every row sees at least its own position
    scale = dim ** -0.5
    group = heads // kv_heads
    scores = q.double().reshape(batch, kv_heads, group, dim) @ k.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(batch, 1, 1, keys), float("-inf"))
    reference = (torch.softmax(scores, -1) @ v.double()).reshape(batch, heads, 1, dim)
    ours = single_query_attention(q, k, v, mask, scale)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    assert ours.dtype == dtype and ours.shape == reference.shape
    # One rounding to the output dtype (an ulp of values up to |v|max), plus the float32 scores'
    # rounding, which the softmax passes on to the output scaled by |v|max.
    score_size = float((q.double().abs().reshape(batch, kv_heads, group, dim)
                        @ k.double().abs().transpose(-1, -2)).max()) * scale
    v_max = float(v.abs().max())
    bound = torch.finfo(dtype).eps * v_max + 4 * torch.finfo(torch.float32).eps * score_size * v_max
    assert float((ours.double() - reference).abs().max()) <= bound
    ours_mean = float((ours.double() - reference).abs().mean())
    sdpa_mean = float((sdpa.double() - reference).abs().mean())
    assert ours_mean <= 1.5 * sdpa_mean + 1e-7, f"mean error {ours_mean:.3g}, sdpa's {sdpa_mean:.3g}"
