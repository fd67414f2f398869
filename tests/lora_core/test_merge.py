"""merge_lora and `lora-core merge` / `lora-core overlap` end to end on a tiny HF-format model.

References: the adapter model's own outputs (merged outputs must match to float32 tolerance), the
fp64 projector applied literally, a float32 merge for the bf16 rounding check, and `transformers`
loading the exported directory independently.
"""
import copy
import json

import pytest
import torch
from torch import nn

from lora_core import LoRAConfig, inject_lora, lora_modules, save_adapter
from lora_core.merge import merge_lora
from lora_core.svd_cache import SVDCache

F64 = torch.float64


def toy(dtype=torch.float32, seed=0, bias=True):
    """Two blocks of (up 24x16, down 16x24) adapted with rank 3 and non-zero B."""
    g = torch.Generator().manual_seed(seed)
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList()
    for _ in range(2):
        blk = nn.Module()
        blk.mlp = nn.Module()
        blk.mlp.up_proj = nn.Linear(16, 24, bias=bias)
        blk.mlp.down_proj = nn.Linear(24, 16, bias=bias)
        root.model.layers.append(blk)
    with torch.no_grad():
        for p in root.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    root.to(dtype)
    inject_lora(root, LoRAConfig(r=3, alpha=6.0, dropout=0.0, target_modules=["up_proj", "down_proj"]))
    with torch.no_grad():
        for m in lora_modules(root).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g).to(dtype) * 0.2)
    return root


def forward(root, x):
    for blk in root.model.layers:
        x = blk.mlp.down_proj(torch.tanh(blk.mlp.up_proj(x)))
    return x


def test_merged_outputs_equal_adapter_outputs():
    model = toy()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = forward(model, x)
        rep = merge_lora(model)
        got = forward(model, x)
    assert not lora_modules(model) and all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    # fp32: two layers of K <= 24 dot products, merged vs split sums differ by a few ulps per term
    tol = 64 * torch.finfo(torch.float32).eps * float(ref.abs().max() + 1)
    err = (got - ref).abs()
    assert float(err.max()) <= tol, f"max err {float(err.max()):.3e} at {divmod(int(err.argmax()), 16)}, tol {tol:.3e}"
    d = rep.to_dict()
    assert d["modules_merged"] == 4 and d["max_cast_abs_error"] == 0.0 and d["mean_removed_share"] is None


@pytest.mark.parametrize("projection", ["column", "row", "both", "either"])
def test_projection_removes_subspace_and_keeps_the_rest(projection):
    model = toy(dtype=F64, seed=2)
    k = 5
    before = {n: (m.weight.detach().clone(), m.delta_weight(F64).detach()) for n, m in lora_modules(model).items()}
    rep = merge_lora(model, projection=projection, k=k, svd_dtype=F64, cache=SVDCache())
    for entry in rep.modules:
        name = entry["name"]
        W, dW = before[name]
        new_dW = model.get_submodule(name).weight.detach() - W
        U, S, Vh = torch.linalg.svd(W)
        Uk, Vk = U[:, :k], Vh[:k].T
        Pu, Pv = Uk @ Uk.T, Vk @ Vk.T
        Iu, Iv = torch.eye(W.shape[0], dtype=F64), torch.eye(W.shape[1], dtype=F64)
        scale = float(dW.abs().max())
        # component in the removed subspace ~ 0, component outside it unchanged (fp64 tolerance)
        if projection in ("column", "either"):
            assert float((Uk.T @ new_dW).abs().max()) < 1e-12 * scale * 24, name
        if projection in ("row", "either"):
            assert float((new_dW @ Vk).abs().max()) < 1e-12 * scale * 24, name
        if projection == "both":  # only the block inside both subspaces goes; U^T dW' alone need not be 0
            assert float((Uk.T @ new_dW @ Vk).abs().max()) < 1e-12 * scale * 24, name
            assert float((Uk.T @ new_dW).abs().max()) > 1e-3 * scale, name
        keep = {"column": lambda M: (Iu - Pu) @ M, "row": lambda M: M @ (Iv - Pv),
                "both": lambda M: M - Pu @ M @ Pv,
                "either": lambda M: (Iu - Pu) @ M @ (Iv - Pv)}[projection]
        err = float((keep(new_dW) - keep(dW)).abs().max())
        assert err < 1e-12 * scale * 24, f"{name}: kept component changed by {err:.3e}"
        removed = float((dW - keep(dW)).square().sum() / dW.square().sum())
        assert abs(entry["removed_share"] - removed) < 1e-12, (name, entry["removed_share"], removed)
        assert 0 < entry["removed_share"] < 1


def test_bf16_merge_via_float32_beats_naive_bf16_add():
    model = toy(dtype=torch.bfloat16, seed=3)
    mods = lora_modules(model)
    exact, naive = {}, {}
    with torch.no_grad():
        for n, m in mods.items():
            exact[n] = m.weight.float() + m.scaling * (m.lora_B.float() @ m.lora_A.float())  # fp32 reference
            naive[n] = m.weight + m.scaling * (m.lora_B @ m.lora_A)  # all in bf16
    rep = merge_lora(model)
    tot_ours = tot_naive = 0.0
    for entry in rep.modules:
        n = entry["name"]
        ours = model.get_submodule(n).weight.float()
        tot_ours += float((ours - exact[n]).square().sum())
        tot_naive += float((naive[n].float() - exact[n]).square().sum())
        # one rounding to bf16: at most half an ulp (2^-8 relative) of each element
        half_ulp = 2.0 ** -8 * exact[n].abs()
        assert bool(((ours - exact[n]).abs() <= half_ulp + 1e-30).all()), n
        assert entry["cast_max_abs"] == pytest.approx(float((ours - exact[n]).abs().max()), rel=1e-6)
        assert entry["dtype"] == "bfloat16"
    assert tot_ours < tot_naive, f"fp32 merge error {tot_ours ** .5:.3e} not below naive bf16 {tot_naive ** .5:.3e}"


def test_bad_inputs_are_named_and_leave_the_model_unchanged():
    model = toy()
    with pytest.raises(ValueError, match="unknown projection 'left'"):
        merge_lora(model, projection="left", k=2)
    with pytest.raises(ValueError, match="projection 'column' needs k"):
        merge_lora(model, projection="column")
    with pytest.raises(ValueError, match="without a projection"):
        merge_lora(model, k=3)
    with pytest.raises(ValueError,
                       match=r"k=17 is out of range for model\.layers\.0\.mlp\.up_proj of shape \(24, 16\)"):
        merge_lora(model, projection="row", k=17)
    assert len(lora_modules(model)) == 4  # nothing was merged by the refused calls
    with pytest.raises(ValueError, match="no LoRA-adapted modules"):
        merge_lora(nn.Linear(2, 2))


def test_every_merge_path_writes_the_same_weight():
    from lora_core import merge_adapters, merged_weight

    module_model = toy(torch.bfloat16, seed=4)
    layer_model, export_model = copy.deepcopy(module_model), copy.deepcopy(module_model)
    mods = lora_modules(layer_model)
    want = {n: merged_weight(m.weight, m.lora_A, m.lora_B, m.scaling) for n, m in mods.items()}
    merge_adapters(layer_model)
    merge_lora(export_model)
    for n, m in lora_modules(module_model).items():
        assert torch.equal(m.to_linear().weight, want[n]), n
        assert torch.equal(layer_model.get_submodule(n).weight, want[n]), n
        assert torch.equal(export_model.get_submodule(n).weight, want[n]), n


def test_merged_weight_unmerge_bound_and_stats():
    from lora_core import merged_weight

    g = torch.Generator().manual_seed(6)
    W = (torch.randn(24, 16, generator=g) * 0.3).to(torch.bfloat16)
    A, B = torch.randn(3, 16, generator=g), torch.randn(24, 3, generator=g) * 0.2
    stats = {}
    merged = merged_weight(W, A, B, 2.0, stats=stats)
    assert merged.dtype == torch.bfloat16 and stats["removed_share"] is None and stats["cast_max_abs"] > 0
    back = merged_weight(merged, A, B, -2.0)
    delta = 2.0 * (B @ A)
    bound = torch.finfo(torch.bfloat16).eps * (W.float().abs() + delta.abs())
    assert bool(((back.float() - W.float()).abs() <= bound).all())
    U = torch.linalg.svd(W.double())[0][:, :4]
    stats = {}
    merged_weight(W.double(), A, B, 2.0, projection="column", U=U, dtype=F64, stats=stats)
    delta = 2.0 * (B.double() @ A.double())
    removed = float((U @ (U.T @ delta)).square().sum() / delta.square().sum())
    assert stats["removed_share"] == pytest.approx(removed, abs=1e-12) and stats["cast_max_abs"] == 0.0
    with pytest.raises(ValueError, match="unknown projection 'left'"):
        merged_weight(W, A, B, 2.0, projection="left")


# ---- CLI end to end on a tiny HF-format directory -------------------------------------------------

def make_hf_dir(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lora_core.models import CausalLM, ModelConfig
    from lora_core.models.hf_format import write_hf_directory

    words = ["<s>", "</s>", "<pad>", "hello", "world", "how", "are", "you", "the", "a", "bomb", "no", "."]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="the"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
          "intermediate_size": 48, "vocab_size": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": True, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1,
          "hidden_act": "silu", "torch_dtype": "float32"}
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf_dict(hf)).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    tensors = {n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"}
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    extra = {"tokenizer.json": tok.to_str(),
             "tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                                  "chat_template": template}),
             "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}),
             "generation_config.json": json.dumps({"bos_token_id": 0, "eos_token_id": 1})}
    return write_hf_directory(path, hf, tensors, extra_files=extra)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lora_core.models import load_model

    root = tmp_path_factory.mktemp("merge_cli")
    base = make_hf_dir(root / "base")
    model, _ = load_model(base, dtype=torch.float32)
    inject_lora(model, LoRAConfig(r=2, alpha=4.0, dropout=0.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    save_adapter(model, root / "adapter", base_model=str(base))
    ids = torch.tensor([[0, 3, 4, 5, 6, 7, 11, 12]])
    with torch.no_grad():
        logits = model(ids)
    return root, base, ids, logits


def test_cli_merge_matches_adapter_logits_and_loads_in_transformers(tiny):
    from lora_core.models import load_model
    from lora_core.train.cli import main

    root, base, ids, ref = tiny
    out = root / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(root / "adapter"), "--out", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json", "merge_report.json", "merge_report.md"):
        assert (out / name).is_file(), name
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    merged, tok = load_model(out, dtype=torch.float32)
    assert tok.has_chat_template
    with torch.no_grad():
        got = merged(ids)
    tol = 64 * torch.finfo(torch.float32).eps * float(ref.abs().max() + 1)
    err = (got - ref).abs()
    assert float(err.max()) <= tol, (f"ours: max err {float(err.max()):.3e} "
                                     f"at {tuple(int(i) for i in (err == err.max()).nonzero()[0])}")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(ids).logits
    err = (hf_logits - ref).abs()
    assert float(err.max()) <= 1e-4 * float(ref.abs().max() + 1), f"transformers: max err {float(err.max()):.3e}"


def test_cli_merge_project_and_bad_inputs(tiny, capsys):
    from lora_core.train.cli import main

    root, base, _, _ = tiny
    out = root / "projected"
    assert main(["merge", "--model", str(base), "--adapter", str(root / "adapter"), "--out", str(out),
                 "--project", "both", "--k", "4", "--dtype", "bfloat16"]) == 0
    rep = json.loads((out / "merge_report.json").read_text())
    assert rep["projection"] == "both" and 0 < rep["mean_removed_share"] < 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # "either" (the union of the two subspaces) is offered too and removes more than "both" (their intersection)
    assert main(["merge", "--model", str(base), "--adapter", str(root / "adapter"), "--out", str(root / "either"),
                 "--project", "either", "--k", "4"]) == 0
    either = json.loads((root / "either" / "merge_report.json").read_text())
    assert either["projection"] == "either" and rep["mean_removed_share"] < either["mean_removed_share"] < 1
    # k larger than the smallest adapted weight (k_proj / v_proj: 16 x 32) -> refused, nothing written
    bad = root / "bad"
    assert main(["merge", "--model", str(base), "--adapter", str(root / "adapter"), "--out", str(bad),
                 "--project", "column", "--k", "17"]) == 2
    err = capsys.readouterr().err
    assert "k=17 is out of range for model.layers.0.self_attn.k_proj" in err, err
    assert not bad.exists() and not list(root.glob(".bad*"))
    assert main(["merge", "--model", str(base), "--adapter", str(root / "adapter"), "--out", str(bad),
                 "--project", "row"]) == 2
    assert "needs --k" in capsys.readouterr().err
    assert main(["merge", "--model", str(base), "--adapter", str(root / "nope"), "--out", str(bad)]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_overlap_adapter_and_tuned(tiny, capsys):
    from lora_core.train.cli import main

    root, base, _, _ = tiny
    bad = root / "overlap_bad"
    assert main(["overlap", "--model", str(base), "--tuned", str(root / "missing.safetensors"), "--k", "4",
                 "--out", str(bad)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["overlap", "--model", str(base), "--adapter", str(root / "adapter"), "--k", "0",
                 "--out", str(bad)]) == 2
    assert "--k must be >= 1" in capsys.readouterr().err and not bad.exists()
    out = root / "overlap"
    assert main(["overlap", "--model", str(base), "--adapter", str(root / "adapter"), "--k", "8",
                 "--out", str(out), "--svd-cache", str(root / "svd.safetensors")]) == 0
    data = json.loads((out / "overlap.json").read_text())
    assert data["source"] == "lora" and len(data["records"]) == 14  # 2 layers x 7 projections
    assert (out / "overlap.png").read_bytes()[:4] == b"\x89PNG" and "By module type" in (out / "overlap.md").read_text()
    assert (root / "svd.safetensors").is_file()
    # the merged checkpoint as a "full fine-tuning" result: same dW, so the same energy fractions
    merged = root / "merged_for_overlap"
    assert main(["merge", "--model", str(base), "--adapter", str(root / "adapter"), "--out", str(merged)]) == 0
    out2 = root / "overlap_full"
    assert main(["overlap", "--model", str(base), "--tuned", str(merged), "--k", "8", "--out", str(out2)]) == 0
    full = {r["name"]: r for r in json.loads((out2 / "overlap.json").read_text())["records"]}
    for r in data["records"]:
        # dW recovered from fp32 weights: W + dW rounded once, so ~eps32 * |W| / |dW| relative error
        assert abs(full[r["name"]]["energy"]["column"] - r["energy"]["column"]) < 1e-4, r["name"]
