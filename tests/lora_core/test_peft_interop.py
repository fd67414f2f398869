"""Adapter files interoperate with PEFT: ours load into transformers + peft, PEFT's load into ours,
with the same logits (float32) on a tiny random LlamaForCausalLM. transformers and peft are used
here as independent references only; the library never imports them."""
import copy
import json

import pytest
import torch

from lora_core import LoRAConfig, inject_lora, load_adapter, lora_modules, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base_model():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def input_ids():
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(7))


def logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def assert_same_logits(ours, theirs, what):
    err = (ours - theirs).abs()
    # Same fp32 maths, different summation order per matmul, 4 layers deep: a few hundred ulps of the
    # logit scale at most; a wrong scaling, transpose or key would be off by O(1).
    tol = 256 * torch.finfo(torch.float32).eps * theirs.abs().max().item()
    where = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
    assert err.max().item() <= tol, f"{what}: max logit error {err.max().item():.3e} at {where}, tol {tol:.3e}"


def randomize(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("config", [
    LoRAConfig(r=4, alpha=8.0, dropout=0.05),  # all seven projections
    LoRAConfig(r=1, alpha=16.0, target_modules=["up_proj"], layers=range(1, 3)),  # the flagship shape
    LoRAConfig(r=3, alpha=5.0, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"], layers=[0, 3]),
    LoRAConfig(r=2, target_modules=r"model\.layers\.0\.self_attn\.k_proj|model\.layers\.2\.mlp\.gate_proj"),
], ids=["all-linear", "up-layers", "rslora", "regex"])
def test_our_adapter_loads_in_peft(base_model, tmp_path, config):
    ours = copy.deepcopy(base_model)
    inject_lora(ours, config)
    mods = lora_modules(ours)
    randomize([p for m in mods.values() for p in (m.lora_A, m.lora_B)], seed=1)
    save_adapter(ours, tmp_path / "ad", base_model="tiny-llama", config=config)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "ad")).eval()
    peft_lora = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                 if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert peft_lora == set(mods), f"PEFT adapted {sorted(peft_lora ^ set(mods))} differently"
    ref = logits(base_model)
    got = logits(ours)
    assert (got - ref).abs().max() > 1e-3, "the adapter must change the logits for this test to mean anything"
    assert_same_logits(got, logits(theirs), f"ours -> peft ({config})")


@pytest.mark.parametrize("peft_kwargs", [
    dict(r=4, lora_alpha=16,
         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    dict(r=2, lora_alpha=8, use_rslora=True, target_modules=["up_proj"], layers_to_transform=[1, 2],
         layers_pattern="layers"),
    dict(r=2, lora_alpha=4, target_modules=["down_proj"], layers_to_transform=3),
], ids=["all-linear", "rslora-layers", "single-layer"])
def test_peft_adapter_loads_in_ours(base_model, tmp_path, peft_kwargs):
    lcfg = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.1, **peft_kwargs)
    theirs = peft.get_peft_model(copy.deepcopy(base_model), lcfg)
    randomize([p for n, p in theirs.named_parameters() if "lora_" in n], seed=2)
    theirs.save_pretrained(str(tmp_path / "ad"))
    theirs.eval()

    ours = copy.deepcopy(base_model)
    cfg = load_adapter(ours, tmp_path / "ad")
    assert cfg.r == peft_kwargs["r"] and cfg.use_rslora == peft_kwargs.get("use_rslora", False)
    peft_lora = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                 if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(lora_modules(ours)) == peft_lora
    assert_same_logits(logits(ours), logits(theirs), f"peft -> ours ({peft_kwargs})")


def test_pissa_adapter_converted_for_peft(base_model, tmp_path):
    """Our PiSSA adapter, saved as PEFT's rank-2r conversion, gives our logits on the original base."""
    ours = copy.deepcopy(base_model)
    cfg = LoRAConfig(r=2, dropout=0.0, target_modules=["o_proj", "up_proj"], init="pissa")
    inject_lora(ours, cfg)
    randomize([m.lora_B for m in lora_modules(ours).values()], seed=3)
    with pytest.warns(UserWarning, match="rank-4"):
        save_adapter(ours, tmp_path / "ad", config=cfg)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["r"] == 4
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "ad")).eval()
    assert_same_logits(logits(ours), logits(theirs), "pissa -> peft")
