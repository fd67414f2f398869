"""inject_lora and its utilities on a toy model with HF Llama module names: selection by suffix,
layer range and regex, refusals with useful messages, freezing, adapter_state_dict, disabling."""
import copy

import pytest
import torch
from torch import nn

from helpers.toy_lora import D, F, L, Toy, ids, randomize_adapters
from lora_core import (LoRAConfig, adapter_state_dict, disable_adapters, inject_lora,
                       load_adapter_state_dict, lora_modules, merge_adapters, unmerge_adapters)

@pytest.fixture
def toy():
    torch.manual_seed(0)
    return Toy()


def test_inject_by_suffix_keeps_output_and_freezes(toy):
    x = ids()
    with torch.no_grad():
        before = toy(x)
    names = inject_lora(toy, LoRAConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"]))
    assert names == [f"model.layers.{i}.{p}" for i in range(L)
                     for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
    assert list(lora_modules(toy)) == names
    assert type(toy.model.layers[0].self_attn.k_proj) is nn.Linear
    assert not any(m.training for m in lora_modules(toy).values()), "new modules must inherit eval mode"
    with torch.no_grad():
        assert torch.equal(toy(x), before), "default init must give exactly the base output"
    trainable = {n for n, p in toy.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    # Base checkpoint keys are unchanged: the adapted model's state dict has them, plus adapters.
    base_keys = set(Toy().state_dict())
    keys = set(toy.state_dict())
    assert base_keys <= keys and {k for k in keys - base_keys if ".lora_" not in k} == set()


def test_inject_by_layer_range_and_list(toy):
    names = inject_lora(toy, LoRAConfig(r=1, target_modules=["up_proj"], layers=range(1, 3)))
    assert names == ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"]
    other = Toy()
    assert inject_lora(other, LoRAConfig(target_modules=["o_proj", "down_proj"], layers=[3, 0])) == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
        "model.layers.3.self_attn.o_proj", "model.layers.3.mlp.down_proj"]


def test_inject_by_regex(toy):
    names = inject_lora(toy, LoRAConfig(target_modules=r"model\.layers\.[02]\.self_attn\.(q|v)_proj|lm_head"))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj", "lm_head"]
    # The regex must match the whole name (fullmatch), not a substring.
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        inject_lora(Toy(), LoRAConfig(target_modules=r"q_proj"))


def test_no_match_error_lists_linear_names(toy):
    with pytest.raises(ValueError) as err:
        inject_lora(toy, LoRAConfig(target_modules=["query", "value"]))
    msg = str(err.value)
    assert "['query', 'value']" in msg
    assert "model.layers.{0-3}.self_attn.q_proj" in msg and "model.layers.{0-3}.mlp.down_proj" in msg
    assert "lm_head" in msg and msg.count("q_proj") == 1, msg
    assert not lora_modules(toy)


def test_partial_typo_and_missing_layers_are_refused(toy):
    with pytest.raises(ValueError, match=r"\['upproj'\] match no"):
        inject_lora(toy, LoRAConfig(target_modules=["q_proj", "upproj"]))
    with pytest.raises(ValueError, match=r"layers \[4, 5\].*layer indices: 0-3"):
        inject_lora(toy, LoRAConfig(target_modules=["up_proj"], layers=range(2, 6)))
    assert not lora_modules(toy), "a refused config must leave the model untouched"


def test_refusals(toy):
    inject_lora(toy, LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(toy, LoRAConfig(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"r <= min\(N, K\).*q_proj.*\(16, 16\).*r=17"):
        inject_lora(Toy(), LoRAConfig(r=17, target_modules=["q_proj"], init="milora"))
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(nn.Sequential(nn.ReLU()), LoRAConfig())
    with pytest.raises(TypeError, match="LoRAConfig"):
        inject_lora(Toy(), {"r": 8})


def test_pissa_on_tied_head_leaves_embedding_alone(toy):
    emb = toy.model.embed_tokens.weight.detach().clone()
    x = ids()
    with torch.no_grad():
        before = toy(x)
    inject_lora(toy, LoRAConfig(r=4, target_modules=["lm_head", "up_proj"], init="pissa"))
    assert torch.equal(toy.model.embed_tokens.weight, emb)
    assert not torch.equal(toy.lm_head.weight, emb)  # now the residual
    with torch.no_grad():
        after = toy(x)
    err = (after - before).abs().max().item()
    assert err < 1e-4 * before.abs().max().item(), f"PiSSA changed the output at init: max error {err:.3e}"


def test_adapter_state_dict_and_reload(toy):
    inject_lora(toy, LoRAConfig(r=3, target_modules=["k_proj", "down_proj"], layers=[1]))
    randomize_adapters(toy)
    sd = adapter_state_dict(toy)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "model.layers.1.self_attn.k_proj.lora_A": (3, D), "model.layers.1.self_attn.k_proj.lora_B": (D, 3),
        "model.layers.1.mlp.down_proj.lora_A": (3, F), "model.layers.1.mlp.down_proj.lora_B": (D, 3)}
    assert all(not v.requires_grad for v in sd.values())
    other = Toy()
    other.load_state_dict(toy.state_dict(), strict=False)
    inject_lora(other, LoRAConfig(r=3, target_modules=["k_proj", "down_proj"], layers=[1]))
    load_adapter_state_dict(other, {k: v.clone() for k, v in sd.items()})
    x = ids()
    with torch.no_grad():
        assert torch.equal(other(x), toy(x))
    bad = dict(sd)
    bad["model.layers.1.mlp.down_proj.lora_A"] = torch.zeros(3, D)
    with pytest.raises(ValueError, match=r"down_proj.lora_A has shape \(3, 16\).*\(3, 24\)"):
        load_adapter_state_dict(other, bad)
    with pytest.raises(ValueError, match="missing keys.*k_proj.lora_B"):
        load_adapter_state_dict(other, {k: v for k, v in sd.items() if "k_proj.lora_B" not in k})


def test_gradients_only_reach_lora_parameters(toy):
    inject_lora(toy, LoRAConfig(r=2, target_modules=["q_proj", "up_proj", "down_proj"], dropout=0.1))
    randomize_adapters(toy)
    toy.train()
    toy(ids()).logsumexp(-1).sum().backward()
    for name, p in toy.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"frozen parameter {name} received a gradient"


def test_disable_adapters_restores_even_on_error(toy):
    base = copy.deepcopy(toy)
    inject_lora(toy, LoRAConfig(r=2, target_modules=["v_proj", "gate_proj"]))
    randomize_adapters(toy)
    x = ids()
    with torch.no_grad():
        adapted, ref = toy(x), base(x)
        assert not torch.equal(adapted, ref)
        with disable_adapters(toy):
            assert torch.equal(toy(x), ref)
        assert torch.equal(toy(x), adapted)
        with pytest.raises(RuntimeError, match="boom"):
            with disable_adapters(toy):
                raise RuntimeError("boom")
        assert all(m.adapters_enabled for m in lora_modules(toy).values())
        merge_adapters(toy)
        with pytest.raises(ValueError, match="merged"):
            with disable_adapters(toy):
                pass
        unmerge_adapters(toy)
        assert all(not m.merged for m in lora_modules(toy).values())


def test_merge_all_matches_adapter_output(toy):
    inject_lora(toy, LoRAConfig(r=4))
    randomize_adapters(toy)
    x = ids()
    with torch.no_grad():
        y = toy(x)
        merge_adapters(toy)
        ym = toy(x)
    err = (ym - y).abs().max().item()
    assert err < 1e-5 * y.abs().max().item(), f"merged logits differ from adapter logits by {err:.3e}"


def test_layer_index_is_the_one_rule():
    from lora_core import layer_index
    from lora_core._adapted import layer_index as adapted_layer_index

    assert adapted_layer_index is layer_index
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("model.layers.3.layers.7.q_proj") == 3  # the first block index wins
    assert layer_index("model.layers.2.mlp.up_proj.weight") == 2
    assert layer_index("lm_head") is None and layer_index("model.layers.x.q_proj") is None
    # Names starting at the stack (PEFT's convention) need the leading "." their callers add.
    assert layer_index("layers.4.q_proj") is None and layer_index(".layers.4.q_proj") == 4


def test_select_targets_regex_errors_name_targets_layers_and_model(toy):
    from lora_core import select_targets

    regex = r"model\.layers\.[02]\.self_attn\.q_proj"
    with pytest.raises(ValueError) as err:
        select_targets(toy, LoRAConfig(target_modules=regex, layers=[1]))
    msg = str(err.value)
    assert "matches no nn.Linear" in msg and repr(regex) in msg and "layers=[1]" in msg, msg
    assert "4 layers (indices 0-3)" in msg and "model.layers.{0-3}.self_attn.q_proj" in msg, msg
    with pytest.raises(ValueError, match=r"layers \[3\] have no module matching target_modules=.*indices: 0-3"):
        select_targets(toy, LoRAConfig(target_modules=regex, layers=[0, 3]))
    pairs = select_targets(toy, LoRAConfig(target_modules=regex, layers=[2]))
    assert [n for n, _ in pairs] == ["model.layers.2.self_attn.q_proj"]
    assert pairs[0][1] is toy.model.layers[2].self_attn.q_proj
    assert not lora_modules(toy), "select_targets must not change the model"


def test_select_targets_refuses_rank_above_layer_size(toy):
    from lora_core import select_targets

    for targets in (["up_proj"], r"model\.layers\.1\.mlp\.up_proj"):
        with pytest.raises(ValueError, match=r"rank 17 is larger than layer model\.layers\.\d\.mlp\.up_proj "
                                             r"\(24x16\) allows"):
            select_targets(toy, LoRAConfig(r=17, target_modules=targets))
    assert len(select_targets(toy, LoRAConfig(r=16, target_modules=["up_proj"]))) == L
    # Adapter files (strict=False) may carry such a rank, as PEFT allows; SVD inits never can.
    assert len(select_targets(toy, LoRAConfig(r=17, target_modules=["up_proj"]), strict=False)) == L
    with pytest.raises(ValueError, match="rank 17 is larger than layer"):
        select_targets(toy, LoRAConfig(r=17, target_modules=["up_proj"], init="pissa"), strict=False)
