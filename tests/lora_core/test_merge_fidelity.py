"""Issue 11 section 5 fidelity of the merge: float64 weights are merged in float64, and the "both"
projection removes exactly what the regulariser's and the overlap analysis's "both" measure.

References are formed literally in float64 from torch.linalg.svd: W + s B A, the projectors
U_k U_k^T / V_k V_k^T, and the paper's ||U_k^T dW V_k||_F^2.
"""
import copy

import pytest
import torch

from lora_core import lora_modules, merged_weight
from lora_core.merge import merge_lora
from lora_core.merge_math import project_update
from lora_core.overlap import analyse_weight
from lora_core.regularizer import dense_overlap
from lora_core.svd_cache import SVDCache
from test_merge import toy

F64 = torch.float64


def reference_bases(W, k):
    U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :k], Vh[:k].T


def test_float64_model_merges_in_float64():
    """A float64 model merged with the default arguments matches the fp64 sum to ~1e-12, not ~1e-5
    (the float32 sum it had before)."""
    model = toy(dtype=F64, seed=7)
    want = {n: m.weight.detach() + m.scaling * (m.lora_B.detach() @ m.lora_A.detach())
            for n, m in lora_modules(model).items()}
    rep = merge_lora(model)
    for n, ref in want.items():
        got = model.get_submodule(n).weight.detach()
        assert got.dtype == F64
        err = float((got - ref).abs().max())
        assert err < 1e-12 * float(ref.abs().max()), f"{n}: max err {err:.3e}"
    assert rep.to_dict()["compute_dtype"] == "float64"
    assert {m["compute_dtype"] for m in rep.modules} == {"float64"}


@pytest.mark.parametrize("projection", ["column", "row", "both", "either"])
def test_float64_projected_merge_uses_a_float64_basis(projection):
    """With the default svd_dtype (float32) a float64 weight still gets a float64 SVD and sum."""
    model = toy(dtype=F64, seed=8)
    k = 4
    before = {n: (m.weight.detach().clone(), m.delta_weight(F64).detach()) for n, m in lora_modules(model).items()}
    merge_lora(model, projection=projection, k=k, cache=SVDCache())
    for n, (W, dW) in before.items():
        U, V = reference_bases(W, k)
        ref = W + project_update(dW, U, V, projection)
        got = model.get_submodule(n).weight.detach()
        err = float((got - ref).abs().max())
        assert err < 1e-12 * float(ref.abs().max()), f"{n} {projection}: max err {err:.3e}"


def test_layer_merge_and_unmerge_of_a_float64_weight_are_float64():
    """LoRALinear.merge goes through merged_weight too: its float64 round trip is exact to fp64 roundoff."""
    g = torch.Generator().manual_seed(9)
    W = torch.randn(24, 16, generator=g, dtype=F64)
    A, B = torch.randn(3, 16, generator=g, dtype=F64), torch.randn(24, 3, generator=g, dtype=F64)
    ref = W + 2.0 * (B @ A)
    got = merged_weight(W, A, B, 2.0)  # default dtype argument: float32
    assert got.dtype == F64 and float((got - ref).abs().max()) < 1e-13 * float(ref.abs().max())
    back = merged_weight(got, A, B, -2.0)
    assert float((back - W).abs().max()) < 1e-13 * float(ref.abs().max())


def test_both_projection_removes_what_the_both_regulariser_penalises():
    """merge "both" takes out U_k U_k^T dW V_k V_k^T, the part the regulariser's "both" term and the
    overlap analysis's energy_both measure, and nothing else; "either" takes out the union."""
    model = toy(dtype=F64, seed=10)
    either = copy.deepcopy(model)  # lora_A is drawn from the global RNG: copy, do not rebuild
    k = 5
    before = {n: (m.weight.detach().clone(), m.delta_weight(F64).detach()) for n, m in lora_modules(model).items()}
    energy_both = {n: analyse_weight(W, k, dW=dW, svd_dtype=F64)["energy"]["both"] for n, (W, dW) in before.items()}
    rep = merge_lora(model, projection="both", k=k, cache=SVDCache())
    for entry in rep.modules:
        n = entry["name"]
        W, dW = before[n]
        U, V = reference_bases(W, k)
        S = torch.linalg.svdvals(W)[:k]
        new_dW = model.get_submodule(n).weight.detach() - W
        scale = float(dW.square().sum())
        # the regulariser's both term (any weighting) vanishes on what is merged ...
        for weighting in ("spectral", "uniform"):
            assert float(dense_overlap(U, S, V, new_dW, "both", weighting)) < 1e-24 * scale * float(S[0]) ** 4
        # ... and only U U^T dW V V^T was removed: the rest of dW is kept, bit for bit up to roundoff
        kept = dW - U @ (U.T @ dW @ V) @ V.T
        assert float((new_dW - kept).abs().max()) < 1e-12 * float(dW.abs().max()), n
        # the share removed is the overlap analysis's "both" energy fraction
        assert entry["removed_share"] == pytest.approx(energy_both[n], abs=1e-12), n
        assert 0 < entry["removed_share"] < 1

    rep_either = merge_lora(either, projection="either", k=k, cache=SVDCache())
    for entry in rep_either.modules:
        n = entry["name"]
        W, dW = before[n]
        U, V = reference_bases(W, k)
        Iu, Iv = torch.eye(W.shape[0], dtype=F64), torch.eye(W.shape[1], dtype=F64)
        kept = (Iu - U @ U.T) @ dW @ (Iv - V @ V.T)
        new_dW = either.get_submodule(n).weight.detach() - W
        assert float((new_dW - kept).abs().max()) < 1e-12 * float(dW.abs().max()), n
        # the union removes at least as much as either side alone, so more than the intersection
        assert entry["removed_share"] > energy_both[n]
