"""Overlap analysis: LoRA path vs dense path vs literal fp64 formulas, random baselines, writers.

References: the energy fractions and angles computed literally from a formed dW and a full fp64 SVD
of W; the random baseline from the exact distribution of a Gaussian update's energy fraction.
"""
import json

import pytest
import torch
from torch import nn

from lora_core.config import LoRAConfig
from lora_core.layer import LoRALinear
from lora_core.overlap import analyse_adapter, analyse_update, analyse_weight
from lora_core.overlap_report import markdown, write_all
from lora_core.svd_cache import SVDCache

F64 = torch.float64


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_lora_path_equals_dense_path_and_literal_formulas():
    W, B, A, s, k = rand(23, 14, seed=0), rand(23, 3, seed=1), rand(3, 14, seed=2), 1.7, 5
    lo = analyse_weight(W, k, B=B, A=A, scaling=s, svd_dtype=F64, name="model.layers.7.mlp.up_proj")
    dW = s * B @ A
    de = analyse_weight(W, k, dW=dW, svd_dtype=F64, name="model.layers.7.mlp.up_proj")
    assert lo["layer"] == 7 and lo["module_type"] == "up_proj" and lo["rank"] == 3
    for key, v in lo["paper"].items():
        assert abs(v - de["paper"][key]) <= 1e-11 * abs(v), f"paper[{key}]: lora {v} vs dense {de['paper'][key]}"
    U, S, Vh = torch.linalg.svd(W)
    Uk, Vk = U[:, :k], Vh[:k].T
    total = float(dW.square().sum())
    literal = {"column": float((Uk.T @ dW).square().sum()) / total,
               "row": float((dW @ Vk).square().sum()) / total,
               "both": float((Uk.T @ dW @ Vk).square().sum()) / total}
    for side, ref in literal.items():
        for rec, label in ((lo, "lora"), (de, "dense")):
            assert abs(rec["energy"][side] - ref) < 1e-12, f"{label} energy[{side}] {rec['energy'][side]} vs {ref}"
    assert lo["baseline"] == {"column": k / 23, "row": k / 14, "both": k * k / (23 * 14)}
    # principal angles: cosines = singular values of U_k^T Ud for dW's 3 left singular vectors
    Ud, Sd, Vdh = torch.linalg.svd(dW)
    ref_cos = torch.linalg.svdvals(Uk.T @ Ud[:, :3])
    ref_cos_r = torch.linalg.svdvals(Vk.T @ Vdh[:3].T)
    for rec in (lo, de):
        assert rec["angles"]["m"] == 3
        assert torch.allclose(torch.tensor(rec["angles"]["left_cosines"], dtype=F64), ref_cos, atol=1e-12)
        assert torch.allclose(torch.tensor(rec["angles"]["right_cosines"], dtype=F64), ref_cos_r, atol=1e-12)
        sr = float(Sd.square().sum() / Sd[0] ** 2)
        assert abs(rec["stable_rank"] - sr) < 1e-11 * sr, (rec["stable_rank"], sr)


def test_update_inside_and_outside_the_subspace():
    W = rand(30, 20, seed=3)
    U, S, Vh = torch.linalg.svd(W)
    M = rand(4, 4, seed=4)
    inside = U[:, :4] @ M @ Vh[:4]  # lives in W's top-4 left and right subspaces
    outside = U[:, 6:10] @ M @ Vh[6:10]
    r_in = analyse_weight(W, 6, dW=inside, svd_dtype=F64)
    r_out = analyse_weight(W, 6, dW=outside, svd_dtype=F64)
    for side in ("column", "row", "both"):
        assert abs(r_in["energy"][side] - 1) < 1e-12 and r_out["energy"][side] < 1e-24, side
    assert min(r_in["angles"]["left_cosines"]) > 1 - 1e-12 and max(r_out["angles"]["left_cosines"]) < 1e-12


@pytest.mark.parametrize("side,dim", [("column", 0), ("row", 1)])
def test_random_update_energy_matches_baseline(side, dim):
    # For a Gaussian dW (N, K), ||U_k^T dW||^2 / ||dW||^2 ~ Beta(kK/2, (N-k)K/2) whatever W is:
    # mean p = k/N, sd = sqrt(p (1 - p) / (N K / 2 + 1)). Row side likewise with k/K.
    N, K, k = 160, 120, 16
    W = rand(N, K, seed=5)
    p = k / (N if dim == 0 else K)
    sd = (p * (1 - p) / (N * K / 2 + 1)) ** 0.5
    for seed in range(6, 10):
        rec = analyse_weight(W, k, dW=rand(N, K, seed=seed), svd_dtype=F64)
        assert rec["baseline"][side] == p
        z = (rec["energy"][side] - p) / sd
        assert abs(z) < 5, f"seed {seed}: {side} energy {rec['energy'][side]:.5f} vs baseline {p:.5f} ({z:.1f} sd)"


def make_model(dtype=F64):
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList()
    g = torch.Generator().manual_seed(11)
    for i in range(3):
        blk = nn.Module()
        blk.mlp = nn.Module()
        for name, (N, K) in (("up_proj", (24, 16)), ("down_proj", (16, 24))):
            lin = nn.Linear(K, N, bias=False, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(N, K, generator=g, dtype=dtype))
            mod = LoRALinear.from_linear(lin, LoRAConfig(r=2, dropout=0.0))
            with torch.no_grad():
                mod.lora_B.copy_(torch.randn(N, 2, generator=g, dtype=dtype)
                                 * (0 if (i, name) == (2, "down_proj") else 1))
            setattr(blk.mlp, name, mod)
        root.model.layers.append(blk)
    return root


def test_analyse_adapter_and_update_and_writers(tmp_path):
    model = make_model()
    cache = SVDCache()
    rep = analyse_adapter(model, 20, svd_dtype=F64, cache=cache, progress=False)
    assert len(rep.records) == 6
    assert {r["k"] for r in rep.records} == {16}  # capped by min(N, K) = 16 per module
    s = rep.summary()
    assert s["zero_updates"] == ["model.layers.2.mlp.down_proj"]
    assert set(s["by_layer"]) == {"0", "1", "2"} and s["by_module_type"]["down_proj"]["modules"] == 2
    # the full fine-tuning path on the same updates must give the same numbers
    base = {f"{n}.weight": m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    tuned = {f"{n}.weight": m.weight.detach() + m.delta_weight(F64)
             for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    full = analyse_update(base, tuned, 20, svd_dtype=F64, cache=cache, progress=False)
    assert [x["name"] for x in full.skipped] == ["model.layers.2.mlp.down_proj"]
    by_name = {r["name"]: r for r in full.records}
    for r in rep.records:
        if r["zero_update"]:
            continue
        for side in ("column", "row", "both"):
            assert abs(r["energy"][side] - by_name[r["name"]]["energy"][side]) < 1e-12, (r["name"], side)
    paths = write_all(rep, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["k"] == 20 and len(data["records"]) == 6
    md = paths["markdown"].read_text()
    assert "| up_proj | 3 |" in md and "By layer" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "full fine-tuning" in markdown(full)


def test_bad_inputs_are_named():
    W = rand(8, 5, seed=0)
    with pytest.raises(ValueError, match=r"k=6 is out of range for w of shape \(8, 5\)"):
        analyse_weight(W, 6, dW=W, name="w")
    with pytest.raises(ValueError, match="either B and A"):
        analyse_weight(W, 2, dW=W, B=W[:, :1], A=W[:1])
    with pytest.raises(ValueError, match=r"B \(8, 2\) and A \(3, 5\)"):
        analyse_weight(W, 2, B=W[:, :2], A=rand(3, 5, seed=1))
    with pytest.raises(ValueError, match="update shape"):
        analyse_weight(W, 2, dW=W.T)
    base = {"model.layers.0.mlp.up_proj.weight": W}
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj.weight' is missing from the tuned"):
        analyse_update(base, {}, 2)
    with pytest.raises(ValueError, match="differ"):
        analyse_update(base, {"model.layers.0.mlp.up_proj.weight": W.T}, 2)
    with pytest.raises(ValueError, match="no LoRA-adapted modules"):
        analyse_adapter(nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="svd dtype"):
        analyse_weight(W, 2, dW=W, svd_dtype="bfloat16")
