"""OrthogonalityRegularizer and the top-k SVD cache against direct fp64 computations that form dW.

Reference: dW = B A (the paper's form, the default) or s B A (`scaled_update=True`) formed
explicitly, W's SVD from torch.linalg.svd in float64, and the paper's definitions applied literally
(||S U^T dW||_F^2 etc.). Values and gradients w.r.t. A and B must agree to ~1e-10 relative (float64;
the small-product path reorders sums only). Every test module has s = alpha / r != 1, so a term
that applies the scaling where it should not (or omits it) is off by s^2.
"""
import itertools

import pytest
import torch
from torch import nn

from lora_core.config import LoRAConfig
from lora_core.layer import LoRALinear
from lora_core.regularizer import OrthogonalityRegularizer, dense_overlap, lowrank_overlap
from lora_core.svd_cache import SVDCache, top_k_svd

# (N, K, r): caps of k=6 differ per module: 6, 6, 5, 3; two up_proj share a shape so reg()'s batched
# per-shape path evaluates a group of 2
SHAPES = {"model.layers.0.mlp.up_proj": (12, 20, 3), "model.layers.1.mlp.up_proj": (12, 20, 3),
          "model.layers.0.mlp.down_proj": (30, 7, 2),
          "model.layers.1.self_attn.q_proj": (5, 5, 4), "model.layers.1.self_attn.k_proj": (40, 3, 2)}


def make_model(dtype=torch.float64, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    root = nn.Module()
    for name, (N, K, r) in shapes.items():
        lin = nn.Linear(K, N, bias=False, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(N, K, generator=g, dtype=dtype))
        mod = LoRALinear.from_linear(lin, LoRAConfig(r=r, alpha=2.0 * r + 1, dropout=0.0))
        with torch.no_grad():  # B = 0 at init would make every term zero: use a non-trivial adapter
            mod.lora_A.copy_(torch.randn(r, K, generator=g, dtype=dtype))
            mod.lora_B.copy_(torch.randn(N, r, generator=g, dtype=dtype))
        parent = root
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], mod)
    return root


def direct_term(W, A, B, s, k, side, weighting, normalize, eps):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, S, V = U[:, :k], S[:k], Vh[:k].T
    if weighting == "uniform":
        S = torch.ones_like(S)
    elif normalize:
        S = S / S.norm()
    Sd = torch.diag(S)
    dW = s * B @ A  # formed on purpose: this is the reference
    if side == "column":
        R = (Sd @ U.T @ dW).square().sum()
    elif side == "row":
        R = (dW @ V @ Sd).square().sum()
    else:
        R = (Sd @ U.T @ dW @ V @ Sd).square().sum()
    if normalize:
        R = R / (dW.square().sum() + eps)
    return R


@pytest.mark.parametrize("side,weighting,normalize,scaled",
                         list(itertools.product(["column", "row", "both"], ["spectral", "uniform"], [False, True],
                                                [False, True])))
def test_regularizer_matches_direct_values_and_grads(side, weighting, normalize, scaled):
    k, eps = 6, 1e-8
    model = make_model()
    reg = OrthogonalityRegularizer(model, k, side, weighting, normalize, eps, svd_dtype=torch.float64,
                                   cache=SVDCache(), scaled_update=scaled)
    assert reg.k_per_module == {n: min(k, N, K) for n, (N, K, _) in SHAPES.items()}
    value = reg.reg()
    value.backward()
    mods = dict((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))
    ref_total = 0.0
    ref_grads = {}
    for name, m in mods.items():
        A = m.lora_A.detach().clone().requires_grad_(True)
        B = m.lora_B.detach().clone().requires_grad_(True)
        N, K, _ = SHAPES[name]
        s = m.scaling if scaled else 1.0
        R = direct_term(m.weight.detach(), A, B, s, min(k, N, K), side, weighting, normalize, eps)
        R.backward()
        ref_total = ref_total + R.detach()
        ref_grads[name] = (A.grad, B.grad)
        # per-module term too, so a wrong module cannot hide in the sum
        term = reg.terms()[name].detach()
        assert torch.allclose(term, R.detach(), rtol=1e-10, atol=0), f"{name}: {term} vs {R}"
    rel = abs(float(value.detach()) - float(ref_total)) / abs(float(ref_total))
    assert rel < 1e-10, f"total {float(value.detach())} vs direct {float(ref_total)} (rel {rel:.2e})"
    for name, m in mods.items():
        for label, got, ref in (("A", m.lora_A.grad, ref_grads[name][0]), ("B", m.lora_B.grad, ref_grads[name][1])):
            err = (got - ref).abs()
            scale = ref.abs().max()
            # normalised terms are O(1) functions of O(1) entries; where the exact gradient is 0 (k = N
            # on the 5x5 module makes the column fraction identically 1) only roundoff is left: a
            # floor of ~500 ulps of float64.
            floor = 1e-13 if normalize else 0.0
            assert float(err.max()) <= 1e-10 * float(scale) + floor, (
                f"{name} grad {label}: max err {float(err.max()):.3e} at {divmod(int(err.argmax()), got.shape[1])}, "
                f"scale {float(scale):.3e}")


@pytest.mark.parametrize("side", ["column", "row", "both"])
def test_default_is_the_papers_formula_on_BA(side):
    """Issue 11: by default R is the paper's ||S U^T (B A)||_F^2 (etc.), without LoRA's alpha/r, so
    beta means what it means in the paper; scaled_update=True is exactly s^2 times it."""
    k = 6
    model = make_model(seed=3)
    default = OrthogonalityRegularizer(model, k, side, svd_dtype=torch.float64, cache=SVDCache())
    scaled = OrthogonalityRegularizer(model, k, side, svd_dtype=torch.float64, cache=SVDCache(), scaled_update=True)
    assert not default.scaled_update and "scaled_update=False" in repr(default)
    terms = {n: t.detach() for n, t in default.terms().items()}
    scaled_terms = {n: t.detach() for n, t in scaled.terms().items()}
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        N, K, _ = SHAPES[name]
        W, A, B = m.weight.detach(), m.lora_A.detach(), m.lora_B.detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        kk = min(k, N, K)
        Sd, U, V = torch.diag(S[:kk]), U[:, :kk], Vh[:kk].T
        dW = B @ A  # the paper's update: no alpha / r
        paper = {"column": Sd @ U.T @ dW, "row": dW @ V @ Sd, "both": Sd @ U.T @ dW @ V @ Sd}[side].square().sum()
        assert m.scaling != 1.0
        assert float(terms[name]) == pytest.approx(float(paper), rel=1e-10), name
        assert float(scaled_terms[name]) == pytest.approx(m.scaling ** 2 * float(paper), rel=1e-10), name


def test_uniform_normalized_is_energy_fraction_and_bounded():
    model = make_model(seed=3)
    for side in ("column", "row", "both"):
        for wt in ("spectral", "uniform"):
            terms = OrthogonalityRegularizer(model, 4, side, wt, normalize=True, svd_dtype=torch.float64,
                                             cache=SVDCache()).terms()
            for name, t in terms.items():
                assert 0.0 <= float(t.detach()) <= 1.0 + 1e-12, f"{side}/{wt} {name}: {float(t)} outside [0, 1]"
    # full-rank k on a square module: uniform column energy fraction is exactly 1
    model = make_model(shapes={"model.layers.0.mlp.up_proj": (5, 5, 2)})
    t = OrthogonalityRegularizer(model, 5, "column", "uniform", True, eps=0.0, svd_dtype=torch.float64,
                                 cache=SVDCache()).reg().detach()
    assert abs(float(t) - 1.0) < 1e-12, float(t)


def test_dense_overlap_equals_lowrank_overlap():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(17, 11, generator=g, dtype=torch.float64)
    A = torch.randn(3, 11, generator=g, dtype=torch.float64)
    B = torch.randn(17, 3, generator=g, dtype=torch.float64)
    b = top_k_svd(W, 5, dtype=torch.float64)
    for side, wt, nz in itertools.product(["column", "row", "both"], ["spectral", "uniform"], [False, True]):
        lo = lowrank_overlap(b.U, b.S, b.V, B, A, 0.7, side, wt, nz)
        de = dense_overlap(b.U, b.S, b.V, 0.7 * B @ A, side, wt, nz)
        assert torch.allclose(lo, de, rtol=1e-11, atol=0), f"{side}/{wt}/{nz}: {float(lo)} vs {float(de)}"


def test_float32_adapter_uses_float32_and_matches_fp64_reference():
    model = make_model(dtype=torch.float32, seed=5)
    reg = OrthogonalityRegularizer(model, 6, cache=SVDCache())
    got = float(reg.reg().detach())
    ref = 0.0
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            N, K, _ = SHAPES[name]
            ref += float(direct_term(m.weight.double(), m.lora_A.detach().double(), m.lora_B.detach().double(), 1.0,
                                     min(6, N, K), "column", "spectral", False, 1e-8))
    # float32 SVD + products of O(10) terms: a few hundred ulps of float32 at most
    assert abs(got - ref) / ref < 1e-4, f"{got} vs fp64 {ref}"


def test_bad_inputs_are_named():
    model = make_model()
    with pytest.raises(ValueError, match="side 'left'"):
        OrthogonalityRegularizer(model, 4, side="left")
    with pytest.raises(ValueError, match="weighting 'spectal'"):
        OrthogonalityRegularizer(model, 4, weighting="spectal")
    with pytest.raises(ValueError, match="k must be a positive int"):
        OrthogonalityRegularizer(model, 0)
    with pytest.raises(ValueError, match=r"k=6 is out of range for model\.layers\.1\.self_attn\.q_proj"):
        OrthogonalityRegularizer(model, 6, cap_k=False, cache=SVDCache())
    with pytest.raises(ValueError, match="no LoRA-adapted modules"):
        OrthogonalityRegularizer(nn.Linear(3, 3), 1)


def test_svd_cache_randomized_path_error_and_reuse(tmp_path):
    g = torch.Generator().manual_seed(2)
    # decaying spectrum: 300 x 200 with singular values 0.9^i, so the top 10 are well separated
    Q1, _ = torch.linalg.qr(torch.randn(300, 200, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    s = 0.9 ** torch.arange(200, dtype=torch.float64)
    W = (Q1 * s) @ Q2.T
    cache = SVDCache(exact_max_dim=64, oversample=10, niter=4)
    b = cache.get("w", W, 10, torch.float64)
    assert b.method == "randomized"
    rel_sv = float(((b.S - s[:10]).abs() / s[:10]).max())
    # The stated error must bound the true one. With W^T u_i = s_i v_i exact (svd_lowrank), the
    # residual r_i = ||W v_i - s_i u_i|| bounds the singular value error by r_i / sqrt(2) (Hermitian
    # dilation) and the subspace's sin angle by ||[r_1..r_10]|| / gap (Davis-Kahan).
    assert 0 < b.rel_residual < 1e-3, b.rel_residual
    assert rel_sv <= b.rel_residual / 2 ** 0.5, (rel_sv, b.rel_residual)
    cosines = torch.linalg.svdvals(Q1[:, :10].T @ b.U)
    sin_max = float((1 - cosines.min() ** 2).clamp_min(0).sqrt())
    gap = float(s[9] - s[10])
    assert sin_max <= 10 ** 0.5 * b.rel_residual * float(s[0]) / gap, (sin_max, b.rel_residual, gap)
    assert cache.get("w", W, 4, torch.float64).k == 4 and cache.hits == 1 and cache.misses == 1
    W2 = W.clone()
    W2[0, 0] += 1e-3  # a changed weight must not be served the old basis
    cache.get("w", W2, 4, torch.float64)
    assert cache.misses == 2
    path = cache.save(tmp_path / "svd.safetensors")
    fresh = SVDCache()
    assert fresh.load(path) == 2
    again = fresh.get("w", W, 10, torch.float64)
    assert fresh.misses == 0 and torch.equal(again.U, b.U)
    with pytest.raises(ValueError, match=r"k=201 is out of range for w of shape \(300, 200\)"):
        cache.get("w", W, 201, torch.float64)
    with pytest.raises(ValueError, match="svd dtype"):
        cache.get("w", W, 2, torch.float16)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        fresh.load(tmp_path / "missing.safetensors")
