"""save_adapter / load_adapter on a toy Llama-named model: round trips (suffixes + layers, regex
fallback, rsLoRA, PiSSA conversion), the PEFT config fields, and every refusal (shape mismatch,
missing / extra keys, corrupt file, unsupported options) leaving nothing half-written."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.toy_lora import D, F, Toy, ids, randomize_adapters
from lora_core import LoRAConfig, inject_lora, load_adapter, lora_modules, save_adapter
from lora_core.adapter_io import CONFIG_NAME, WEIGHTS_NAME


def fresh_copy(model_state):
    torch.manual_seed(123)  # different init; the base weights come from the state dict
    m = Toy()
    m.load_state_dict(model_state)
    return m


def adapted(config, seed=0):
    torch.manual_seed(seed)
    model = Toy()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, config)
    randomize_adapters(model, seed + 1)
    return model, base_state


def assert_same_logits(a, b, what):
    with torch.no_grad():
        ya, yb = a(ids()), b(ids())
    err = (ya - yb).abs()
    tol = 64 * torch.finfo(torch.float32).eps * yb.abs().max().item()
    assert err.max().item() <= tol, f"{what}: max logit error {err.max().item():.3e} at " \
        f"{tuple(int(i) for i in torch.nonzero(err == err.max())[0])}, tolerance {tol:.3e}"


def test_round_trip_suffixes_and_layers(tmp_path):
    cfg = LoRAConfig(r=3, alpha=6.0, dropout=0.1, target_modules=["up_proj", "q_proj"], layers=range(1, 3))
    model, base = adapted(cfg)
    out = save_adapter(model, tmp_path / "ad", base_model="toy/base", config=cfg)
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["ad"], "no temp directory may be left behind"
    raw = json.loads((out / CONFIG_NAME).read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["bias"] == "none"
    assert (raw["r"], raw["lora_alpha"], raw["lora_dropout"]) == (3, 6.0, 0.1)
    assert raw["target_modules"] == ["q_proj", "up_proj"] and raw["layers_to_transform"] == [1, 2]
    assert raw["base_model_name_or_path"] == "toy/base" and raw["use_rslora"] is False
    tensors = load_file(str(out / WEIGHTS_NAME))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        f"base_model.model.model.layers.{i}.{p}.lora_{ab}.weight": shape
        for i in (1, 2) for p, n in (("self_attn.q_proj", D), ("mlp.up_proj", F))
        for ab, shape in (("A", (3, D)), ("B", (n, 3)))}

    other = fresh_copy(base)
    loaded = load_adapter(other, out)
    assert loaded == LoRAConfig(r=3, alpha=6.0, dropout=0.1, target_modules=["q_proj", "up_proj"], layers=[1, 2])
    assert list(lora_modules(other)) == list(lora_modules(model))
    assert_same_logits(other, model, "reloaded adapter")


def test_irregular_selection_falls_back_to_exact_regex(tmp_path):
    cfg = LoRAConfig(r=2, target_modules=r"model\.layers\.0\.self_attn\.q_proj|model\.layers\.2\.mlp\.down_proj")
    model, base = adapted(cfg)
    save_adapter(model, tmp_path / "ad")
    raw = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert isinstance(raw["target_modules"], str) and raw["layers_to_transform"] is None
    other = fresh_copy(base)
    load_adapter(other, tmp_path / "ad")
    assert list(lora_modules(other)) == ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    assert_same_logits(other, model, "regex adapter")


def test_rslora_scaling_survives(tmp_path):
    cfg = LoRAConfig(r=4, alpha=3.0, use_rslora=True, target_modules=["v_proj"])
    model, base = adapted(cfg)
    save_adapter(model, tmp_path / "ad", config=cfg)
    other = fresh_copy(base)
    got = load_adapter(other, tmp_path / "ad")
    assert got.use_rslora and got.scaling == 1.5
    assert_same_logits(other, model, "rsLoRA adapter")
    # Without the config the same scaling is written as plain alpha = scaling * r.
    save_adapter(model, tmp_path / "plain")
    raw = json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())
    assert raw["use_rslora"] is False and raw["lora_alpha"] == 6.0


@pytest.mark.parametrize("init", ["pissa", "milora"])
def test_svd_init_adapter_is_saved_against_the_original_base(tmp_path, init):
    cfg = LoRAConfig(r=2, dropout=0.0, target_modules=["up_proj", "o_proj"], init=init)
    model, base = adapted(cfg)  # randomize_adapters moves B away from its initial value ("training")
    with pytest.warns(UserWarning, match="ORIGINAL base weights"):
        save_adapter(model, tmp_path / "ad", config=cfg)
    raw = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert raw["r"] == 4 and raw["lora_alpha"] == 32.0 and raw["init_lora_weights"] is True
    other = fresh_copy(base)  # the original, un-residualised weights
    load_adapter(other, tmp_path / "ad")
    assert_same_logits(other, model, f"{init} adapter converted to plain LoRA")


def test_existing_directory_keeps_other_files(tmp_path):
    model, _ = adapted(LoRAConfig(r=2, target_modules=["k_proj"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    save_adapter(model, run)
    save_adapter(model, run)  # overwrite in place
    assert sorted(os.listdir(run)) == [CONFIG_NAME, WEIGHTS_NAME, "metrics.jsonl"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        save_adapter(model, tmp_path / "file")


@pytest.fixture
def saved(tmp_path):
    model, base = adapted(LoRAConfig(r=2, target_modules=["q_proj", "down_proj"]))
    save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad", base


def test_shape_mismatch_is_refused_and_model_untouched(saved):
    path, base = saved
    tensors = load_file(str(path / WEIGHTS_NAME))
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key] = torch.zeros(D + 1, 2)
    save_file(tensors, str(path / WEIGHTS_NAME))
    other = fresh_copy(base)
    with pytest.raises(ValueError, match=rf"{key} has shape \(17, 2\), the model expects \(16, 2\)"):
        load_adapter(other, path)
    assert not lora_modules(other), "a refused load must not leave LoRA modules behind"


def test_missing_and_extra_keys_are_named(saved):
    path, base = saved
    tensors = load_file(str(path / WEIGHTS_NAME))
    del tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"]
    del tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"]
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, D)
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] = torch.zeros(D, 2)
    save_file(tensors, str(path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing from the file \['base_model\.model\.model\.layers\.3\.self_attn"
                                         r"\.q_proj'\].*no matching adapted module.*layers\.0\.self_attn\.k_proj"):
        load_adapter(fresh_copy(base), path)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(3)
    save_file(tensors, str(path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"unexpected keys.*lm_head\.weight"):
        load_adapter(fresh_copy(base), path)


def test_half_a_module_missing(saved):
    path, base = saved
    tensors = load_file(str(path / WEIGHTS_NAME))
    del tensors["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"]
    save_file(tensors, str(path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.down_proj\.lora_B\.weight is missing"):
        load_adapter(fresh_copy(base), path)


def test_corrupt_and_missing_files(saved, tmp_path):
    path, base = saved
    (path / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: not a readable safetensors file"):
        load_adapter(fresh_copy(base), path)
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        load_adapter(fresh_copy(base), tmp_path / "nope")
    (path / CONFIG_NAME).write_text("{")
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: not valid JSON"):
        load_adapter(fresh_copy(base), path)
    (path / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(fresh_copy(base), path)


@pytest.mark.parametrize("field, value", [("use_dora", True), ("peft_type", "IA3"), ("bias", "all"),
                                          ("exclude_modules", ["q_proj"]), ("init_lora_weights", "pissa"),
                                          ("fan_in_fan_out", True), ("layers_pattern", "h"),
                                          ("rank_pattern", {"q_proj": 0}), ("r", 0)])
def test_unsupported_config_options(saved, field, value):
    path, base = saved
    raw = json.loads((path / CONFIG_NAME).read_text())
    raw[field] = value
    (path / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=field):
        load_adapter(fresh_copy(base), path)


def test_load_into_model_with_other_rank_is_refused(saved):
    path, base = saved
    other = fresh_copy(base)
    inject_lora(other, LoRAConfig(r=5, target_modules=["q_proj", "down_proj"]))
    with pytest.raises(ValueError, match=r"r=2 but the model's LoRA modules have r=\[5\]"):
        load_adapter(other, path)


def test_load_into_already_injected_model(saved):
    path, base = saved
    ref = fresh_copy(base)
    load_adapter(ref, path)
    other = fresh_copy(base)
    inject_lora(other, LoRAConfig(r=2, alpha=1.0, target_modules=["q_proj", "down_proj"]))
    load_adapter(other, path)  # alpha comes from the file
    assert_same_logits(other, ref, "load into an injected model")


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import lora_core.adapter_io as aio

    model, _ = adapted(LoRAConfig(r=2, target_modules=["k_proj"]))

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(aio, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == [], "a failed save must leave no directory behind"
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, run)
    assert list(run.iterdir()) == [], "a failed save must leave no partial file behind"
