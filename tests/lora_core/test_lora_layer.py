"""LoRALinear and LoRAConfig against an fp64 reference: identity at init, forward, merge/unmerge
round trip within the stated rounding bound, init variants (PiSSA / MiLoRA keep the output and put
A, B in the principal / minor singular subspaces), gradients, config validation."""
import math

import pytest
import torch
from torch import nn

from lora_core import LoRAConfig, LoRALinear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def eps(dtype):
    return torch.finfo(dtype).eps


def check_within(actual, expected, bound, what):
    """|actual - expected| <= bound elementwise; the message names the worst element."""
    err = (actual.double() - expected.double()).abs()
    excess = err - bound.double()
    if (excess > 0).any():
        idx = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
        raise AssertionError(f"{what}: max error {err.max().item():.3e}, bound exceeded at {idx}: "
                             f"error {err[idx].item():.3e} > bound {bound[idx].item():.3e}")


def make_layer(n=23, k=17, r=4, dtype=torch.float32, init="default", bias=True, seed=0, **cfg):
    torch.manual_seed(seed)
    base = nn.Linear(k, n, bias=bias).to(dtype)
    ref_w = base.weight.detach().clone()
    ref_b = None if base.bias is None else base.bias.detach().clone()
    layer = LoRALinear.from_linear(base, LoRAConfig(r=r, alpha=8.0, dropout=0.0, init=init,
                                                    target_modules=["x"], **cfg))
    return layer, ref_w, ref_b


def randomize_b(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def reference(x, w, b, a, bm, s):
    """fp64 y = x W^T + b + s (x A^T) B^T."""
    x, w, a, bm = (t.double() for t in (x, w, a, bm))
    y = x @ w.T + s * (x @ a.T) @ bm.T
    return y if b is None else y + b.double()


def matmul_bound(x, w, a, bm, s, dtype, k, r):
    """Componentwise rounding bound of the LoRA forward in `dtype` (fp32 accumulation assumed):
    (K + r + 4) * eps32 * (|x||W|^T + s |x||A|^T |B|^T) for the sums, plus one output rounding."""
    x, w, a, bm = (t.double().abs() for t in (x, w, a, bm))
    mag = x @ w.T + s * (x @ a.T) @ bm.T
    return (k + r + 4) * eps(torch.float32) * mag + eps(dtype) * mag


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", ["default", "gaussian"])
@pytest.mark.parametrize("bias", [True, False])
def test_identity_at_init_is_exact(dtype, init, bias):
    layer, w, b = make_layer(dtype=dtype, init=init, bias=bias)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    x = torch.randn(3, 5, 17).to(dtype)
    for mode in (layer.eval, layer.train):
        mode()
        y = layer(x)
        assert torch.equal(y, nn.functional.linear(x, w, b)), \
            f"{init} init, {dtype}: max diff {(y.float() - nn.functional.linear(x, w, b).float()).abs().max()}"


def test_default_init_distribution():
    layer, _, _ = make_layer(n=64, k=400, r=16)
    bound = 1 / math.sqrt(400)  # Kaiming-uniform with a=sqrt(5) on fan_in K
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.9 * bound
    g, _, _ = make_layer(n=64, k=400, r=16, init="gaussian")
    std = g.lora_A.std().item()
    assert abs(std - 1 / 16) < 0.1 / 16, f"gaussian init std {std}, expected 1/r = {1 / 16}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 17, 1), (23, 5, 3), (31, 123, 8)])
def test_forward_matches_fp64_reference(dtype, shape):
    n, k, r = shape
    layer, w, b = make_layer(n=n, k=k, r=r, dtype=dtype)
    randomize_b(layer)
    x = torch.randn(2, 7, k).to(dtype)
    y = layer(x)
    assert y.shape == (2, 7, n) and y.dtype == dtype
    ref = reference(x, w, b, layer.lora_A, layer.lora_B, layer.scaling)
    bound = matmul_bound(x, w, layer.lora_A, layer.lora_B, layer.scaling, dtype, k, r)
    if b is not None:
        bound = bound + eps(dtype) * b.double().abs()
    check_within(y, ref, bound, f"forward {shape} {dtype}")


def test_delta_weight_and_scaling():
    layer, _, _ = make_layer(r=4)
    randomize_b(layer)
    assert layer.scaling == 8.0 / 4
    d = layer.delta_weight()
    assert d.dtype == torch.float32 and d.shape == (23, 17)
    ref = layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    mag = layer.scaling * layer.lora_B.double().abs() @ layer.lora_A.double().abs()
    check_within(d, ref, 8 * eps(torch.float32) * mag, "delta_weight")
    rs, _, _ = make_layer(r=4, use_rslora=True)
    assert rs.scaling == 8.0 / 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_unmerge_round_trip_within_bound(dtype):
    """Stated bound: |unmerge(merge(W)) - W| <= eps(dtype) * (|W| + |delta|) elementwise (two roundings
    in W's dtype; the fp32 arithmetic between them adds < eps32 relative)."""
    layer, w0, b = make_layer(n=33, k=29, r=5, dtype=dtype)
    randomize_b(layer)
    x = torch.randn(4, 29).to(dtype)
    with torch.no_grad():
        y_adapter = layer(x)
    delta = layer.delta_weight().double()

    layer.merge()
    assert layer.merged
    w_merged = layer.weight.detach().clone()
    check_within(w_merged, w0.double() + delta,
                 eps(dtype) * (w0.double() + delta).abs() + 2 * eps(torch.float32) * (w0.double().abs() + delta.abs()),
                 f"merged weight {dtype}")
    layer.merge()  # idempotent
    assert torch.equal(layer.weight, w_merged)
    with torch.no_grad():
        y_merged = layer(x)
    bound = (29 + 8) * eps(torch.float32) * (x.double().abs() @ (w0.double().abs() + delta.abs()).T) \
        + 2 * eps(dtype) * (x.double().abs() @ (w0.double().abs() + delta.abs()).T + b.double().abs())
    check_within(y_merged, y_adapter.double(), bound, f"merged vs adapter output {dtype}")

    layer.unmerge()
    assert not layer.merged
    restored = layer.weight.detach().clone()
    layer.unmerge()  # idempotent
    assert torch.equal(layer.weight, restored)
    check_within(restored, w0, eps(dtype) * (w0.double().abs() + delta.abs()), f"unmerge round trip {dtype}")


def test_to_linear_matches_merged_layer():
    layer, w0, _ = make_layer(r=3)
    randomize_b(layer)
    lin = layer.to_linear()
    assert type(lin) is nn.Linear and not layer.merged
    assert torch.equal(layer.weight, w0), "to_linear must not change the layer"
    layer.merge()
    assert torch.equal(lin.weight, layer.weight) and torch.equal(lin.bias, layer.bias)
    assert torch.equal(layer.to_linear().weight, layer.weight)


@pytest.mark.parametrize("init", ["pissa", "milora"])
@pytest.mark.parametrize("shape", [(24, 40, 4), (40, 24, 24)])
def test_svd_init_keeps_output_and_uses_the_right_subspace(init, shape):
    n, k, r = shape
    layer, w0, b = make_layer(n=n, k=k, r=r, init=init)
    assert layer.init_method == init
    x = torch.randn(6, k)
    with torch.no_grad():
        y = layer(x)
    ref = x.double() @ w0.double().T + b.double()
    bound = matmul_bound(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, torch.float32, k, r) \
        + eps(torch.float32) * (x.double().abs() @ w0.double().abs().T + b.double().abs())
    check_within(y, ref, bound, f"{init} output at init")

    # The adapter holds exactly the chosen triplets: scaling * B A = U_r S_r V_r^T.
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    sel = slice(len(s) - r, None) if init == "milora" else slice(0, r)
    part = u[:, sel] @ torch.diag(s[sel]) @ vh[sel]
    check_within(layer.delta_weight(), part, 64 * eps(torch.float32) * s[0] * torch.ones_like(part),
                 f"{init} scaling*B@A vs the chosen singular part")
    # A's rows lie in span(V_sel), B's columns in span(U_sel): the leftover after projecting is ~0.
    v_sel, u_sel = vh[sel].T, u[:, sel]  # (K, r), (N, r)
    a, bm = layer.lora_A.double(), layer.lora_B.double()
    a_out = (a - a @ v_sel @ v_sel.T).norm() / a.norm()
    b_out = (bm - u_sel @ u_sel.T @ bm).norm() / bm.norm()
    assert a_out < 1e-5 and b_out < 1e-5, f"{init}: A outside its subspace {a_out:.2e}, B {b_out:.2e}"
    # The residual keeps the other singular values.
    s_res = torch.linalg.svdvals(layer.weight.double())
    rest = s[r:] if init == "pissa" else s[: len(s) - r]
    check_within(s_res[: len(rest)], rest, 64 * eps(torch.float32) * s[0] * torch.ones_like(rest),
                 f"{init} residual singular values")
    # Stored initial factors (used by save_adapter's PEFT conversion) equal the trained-from values.
    assert torch.equal(layer.lora_A_init, layer.lora_A) and torch.equal(layer.lora_B_init, layer.lora_B)


def test_milora_and_pissa_differ_in_overlap():
    """MiLoRA's A starts in W's minor right subspace, PiSSA's in the principal one."""
    pissa, w0, _ = make_layer(n=32, k=48, r=4, init="pissa")
    milora, _, _ = make_layer(n=32, k=48, r=4, init="milora")
    _, _, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    top = vh[:4].T  # (K, 4)
    frac = lambda a: ((a.double() @ top).norm() / a.double().norm()).item() ** 2  # noqa: E731
    assert frac(pissa.lora_A) > 1 - 1e-6 and frac(milora.lora_A) < 1e-6


def test_svd_init_refuses_rank_above_min_dim():
    base = nn.Linear(6, 10)
    with pytest.raises(ValueError, match=r"r=7.*\(10, 6\)"):
        LoRALinear.from_linear(base, LoRAConfig(r=7, init="pissa", target_modules=["x"]))
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1), LoRAConfig(target_modules=["x"]))


def test_gradients_reach_only_the_adapter():
    layer, _, _ = make_layer(r=3)
    randomize_b(layer)
    x = torch.randn(5, 17, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    # Against autograd through the fp64 reference expression.
    a = layer.lora_A.detach().double().requires_grad_()
    bm = layer.lora_B.detach().double().requires_grad_()
    reference(x.detach(), layer.weight, layer.bias, a, bm, layer.scaling).square().sum().backward()
    for got, want, name in ((layer.lora_A.grad, a.grad, "dA"), (layer.lora_B.grad, bm.grad, "dB")):
        check_within(got, want, 1e-4 * want.abs().max() * torch.ones_like(want), name)


def test_merged_or_disabled_layer_is_plain_linear():
    layer, w0, b = make_layer(r=2)
    randomize_b(layer)
    x = torch.randn(3, 17)
    layer.adapters_enabled = False
    assert torch.equal(layer(x), nn.functional.linear(x, w0, b))
    layer.adapters_enabled = True
    assert not torch.equal(layer(x), nn.functional.linear(x, w0, b))


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be"), ({"r": 2.5}, "r must be"), ({"alpha": 0}, "alpha"),
    ({"alpha": float("nan")}, "alpha"), ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
    ({"init": "loftq"}, "init"), ({"target_modules": []}, "target_modules"),
    ({"target_modules": "q_proj("}, "does not compile"), ({"target_modules": ["up_proj", ""]}, "suffix"),
    ({"layers": [-1]}, "layers"), ({"layers": []}, "layers"), ({"layers": range(3, 3)}, "layers"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_config_types_and_scaling():
    with pytest.raises(TypeError, match="target_modules"):
        LoRAConfig(target_modules=5)
    with pytest.raises(TypeError, match="layers"):
        LoRAConfig(layers="0-3")
    c = LoRAConfig(r=16, alpha=16, layers=range(16, 32), target_modules=("up_proj",))
    assert c.scaling == 1.0 and c.target_modules == ["up_proj"]
    assert LoRAConfig(r=16, alpha=16, use_rslora=True).scaling == 4.0
    assert c.matches("model.layers.16.mlp.up_proj") and not c.matches("model.layers.15.mlp.up_proj")
    assert not c.matches("model.layers.16.mlp.up_proj_x") and not c.matches("lm_head")
    rc = LoRAConfig(target_modules=r".*\.(q|v)_proj")
    assert rc.matches("model.layers.0.self_attn.q_proj") and not rc.matches("model.layers.0.self_attn.k_proj")
