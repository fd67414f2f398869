"""PEFT adapter files as people write them: target_modules="all-linear", per-module rank_pattern /
alpha_pattern and modules_to_save (a full copy of lm_head), in both directions against `peft` on a
tiny random LlamaForCausalLM (float32 logits compared), plus PEFT's pattern rule replayed against
peft's own function. transformers and peft are test-only references."""
import copy
import json

import pytest
import torch

from helpers.toy_lora import Toy
from lora_core import LoRAConfig, disable_adapters, inject_lora, load_adapter, lora_modules, save_adapter
from lora_core.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from lora_core.config import pattern_key
from lora_core.inject import full_copy_modules

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base_model():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def logits(model):
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_logits(ours, theirs, what):
    err = (ours - theirs).abs()
    # Same fp32 maths in another summation order, 3 layers deep: a few hundred ulps of the logit scale.
    # A wrong rank, scaling or head copy is off by O(1).
    tol = 256 * torch.finfo(torch.float32).eps * theirs.abs().max().item()
    where = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
    assert err.max().item() <= tol, f"{what}: max logit error {err.max().item():.3e} at {where}, tol {tol:.3e}"


def randomize(params, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def peft_ranks(model):
    """'<qualified name>.r' -> rank and '<qualified name>.scaling' -> scale of every PEFT LoRA layer
    (flat, so pytest.approx compares the scales)."""
    flat = {}
    for n, m in model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            name = n.removeprefix("base_model.model.")
            flat[f"{name}.r"], flat[f"{name}.scaling"] = m.r["default"], m.scaling["default"]
    return flat


def our_ranks(model):
    flat = {}
    for n, m in lora_modules(model).items():
        flat[f"{n}.r"], flat[f"{n}.scaling"] = m.r, m.scaling
    return flat


@pytest.mark.parametrize("keys, name", [
    (["q_proj"], "model.layers.0.self_attn.q_proj"),
    (["proj"], "model.layers.0.self_attn.q_proj"),
    (["layers.1.mlp.up_proj", "up_proj"], "model.layers.1.mlp.up_proj"),
    (["up_proj", "layers.1.mlp.up_proj"], "model.layers.1.mlp.up_proj"),
    ([r"layers\.[12]\..*_proj"], "model.layers.2.mlp.down_proj"),
    ([r"layers\.[12]\..*_proj"], "model.layers.0.mlp.down_proj"),
    (["self_attn.*"], "model.layers.0.self_attn.v_proj"),
    (["model.layers.0.self_attn.v_proj"], "model.layers.0.self_attn.v_proj"),
    (["lm_head"], "xlm_head"),
])
def test_pattern_rule_is_peft_rule(keys, name):
    from peft.utils.other import get_pattern_key

    theirs = get_pattern_key(keys, name)  # returns the name itself when no key matches
    assert pattern_key(dict.fromkeys(keys, 1), name) == (theirs if theirs in keys else None), (keys, name)


PEFT_FILE = dict(r=4, lora_alpha=8, target_modules="all-linear",
                 rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
                 alpha_pattern={"down_proj": 5, "layers.2.self_attn.o_proj": 32}, modules_to_save=["lm_head"])


def test_peft_all_linear_patterns_and_head_copy_load_in_ours(base_model, tmp_path):
    theirs = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(task_type="CAUSAL_LM", **PEFT_FILE))
    randomize([p for n, p in theirs.named_parameters() if "lora_" in n or "modules_to_save" in n], seed=2)
    theirs.save_pretrained(str(tmp_path / "ad"))
    theirs.eval()

    ours = copy.deepcopy(base_model)
    cfg = load_adapter(ours, tmp_path / "ad")
    assert cfg.rank_pattern and cfg.alpha_pattern and cfg.modules_to_save == ["lm_head"]
    assert our_ranks(ours) == pytest.approx(peft_ranks(theirs))
    assert {n.rpartition(".")[2] for n in lora_modules(ours)} == set(PROJ), "all-linear must skip lm_head"
    assert list(full_copy_modules(ours)) == ["lm_head"]
    assert not torch.equal(ours.lm_head.weight, base_model.lm_head.weight)
    assert_same_logits(logits(ours), logits(theirs), "peft -> ours")
    with disable_adapters(ours):  # the base model again, with its own head
        assert_same_logits(logits(ours), logits(base_model), "adapters disabled")


def test_all_linear_string_in_the_file(base_model, tmp_path):
    """Some tools write target_modules="all-linear" itself; PEFT expands it when it loads the file."""
    theirs = peft.get_peft_model(copy.deepcopy(base_model),
                                 peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules="all-linear"))
    randomize([p for n, p in theirs.named_parameters() if "lora_" in n], seed=4)
    theirs.save_pretrained(str(tmp_path / "ad"))
    raw = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    raw["target_modules"] = "ALL-LINEAR"
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(raw))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "ad")).eval()
    ours = copy.deepcopy(base_model)
    load_adapter(ours, tmp_path / "ad")
    assert set(our_ranks(ours)) == set(peft_ranks(reloaded))
    assert_same_logits(logits(ours), logits(reloaded), "'all-linear' string -> ours")


@pytest.mark.parametrize("with_config", [True, False], ids=["config", "no-config"])
def test_our_patterns_and_head_copy_load_in_peft(base_model, tmp_path, with_config):
    cfg = LoRAConfig(r=3, alpha=6.0, dropout=0.0, target_modules="all-linear",
                     rank_pattern={"v_proj": 1, r"layers\.0\.mlp\..*": 5},
                     alpha_pattern={"gate_proj": 2.5}, modules_to_save=["lm_head"])
    ours = copy.deepcopy(base_model)
    inject_lora(ours, cfg)
    assert ours.lm_head.weight.requires_grad and ours.lm_head.weight is not base_model.lm_head.weight
    randomize([p for m in lora_modules(ours).values() for p in (m.lora_A, m.lora_B)], seed=1)
    randomize([ours.lm_head.weight], seed=5, scale=0.05)
    save_adapter(ours, tmp_path / "ad", base_model="tiny-llama", config=cfg if with_config else None)
    raw = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert raw["modules_to_save"] == ["lm_head"] and raw["rank_pattern"] and raw["alpha_pattern"]

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "ad")).eval()
    assert peft_ranks(theirs) == pytest.approx(our_ranks(ours))
    got = logits(ours)
    assert (got - logits(base_model)).abs().max() > 1e-2, "the adapter must change the logits"
    assert_same_logits(got, logits(theirs), f"ours -> peft (config given: {with_config})")
    # and back into ours, from our own file
    again = copy.deepcopy(base_model)
    load_adapter(again, tmp_path / "ad")
    assert our_ranks(again) == pytest.approx(our_ranks(ours))
    assert_same_logits(logits(again), got, "ours -> ours")


def test_all_linear_and_head_copy_on_a_tied_model():
    """Our decoder names its head lm_head and ties it to the embeddings: all-linear leaves it out,
    and a full copy unties it without touching the embeddings."""
    model = Toy(tie=True)
    emb = model.model.embed_tokens.weight
    names = inject_lora(model, LoRAConfig(r=2, target_modules="all-linear", modules_to_save=["lm_head"]))
    assert sorted({n.rpartition(".")[2] for n in names}) == sorted(PROJ) and len(names) == 4 * len(PROJ)
    assert model.lm_head.weight is not emb and torch.equal(model.lm_head.weight, emb)
    assert model.lm_head.weight.requires_grad and not emb.requires_grad
    with disable_adapters(model):
        assert model.lm_head.weight is emb
    assert model.lm_head.weight is not emb


def test_rank_pattern_needs_a_fitting_file(base_model, tmp_path):
    """A rank_pattern that no longer matches the tensors is refused by key, as any shape mismatch."""
    ours = copy.deepcopy(base_model)
    cfg = LoRAConfig(r=2, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 4})
    inject_lora(ours, cfg)
    save_adapter(ours, tmp_path / "ad", config=cfg)
    raw = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert raw["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 4}
    raw["rank_pattern"] = {}
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj\.lora_A\.weight has shape \(4, 32\)"):
        load_adapter(copy.deepcopy(base_model), tmp_path / "ad")
    assert (tmp_path / "ad" / WEIGHTS_NAME).is_file()
