"""Bad checkpoints and configs are refused with messages that name the tensor, file or option.

Checkpoints here are written with `safetensors` directly from a random CausalLM of ours (the
parity tests cover HF-written files), then damaged in one specific way each.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lora_core.models import CausalLM, ModelConfig, load_model
from lora_core.models.hf_loader import load_weights

CONFIG = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=48, vocab_size=64, tie_word_embeddings=False)


def _write(path, config=CONFIG, mutate=None, tied=False):
    cfg = dict(config, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf_dict(cfg))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight")
    if mutate:
        mutate(state)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(path / "model.safetensors"))
    return path, model


def test_good_checkpoint_round_trips(tmp_path):
    path, model = _write(tmp_path / "ok")
    loaded = load_weights(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_tied_checkpoint_without_lm_head(tmp_path):
    path, model = _write(tmp_path / "tied", tied=True)
    loaded = load_weights(path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))


def test_missing_tensor(tmp_path):
    path, _ = _write(tmp_path / "m", mutate=lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_weights(path)


def test_untied_checkpoint_needs_lm_head(tmp_path):
    path, _ = _write(tmp_path / "m", mutate=lambda s: s.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'lm_head\.weight'"):
        load_weights(path)


def test_unexpected_tensor(tmp_path):
    path, _ = _write(tmp_path / "u", mutate=lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'.*"):
        load_weights(path)


def test_wrong_shape(tmp_path):
    def bad(state):
        state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)

    path, _ = _write(tmp_path / "s", mutate=bad)
    with pytest.raises(ValueError, match=r"k_proj\.weight' has shape \(8, 32\), expected \(16, 32\)"):
        load_weights(path)


def test_corrupt_header(tmp_path):
    path, _ = _write(tmp_path / "c")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:20] = b"not json!!!!"
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header"):
        load_weights(path)


def test_header_length_beyond_file(tmp_path):
    path, _ = _write(tmp_path / "h")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[:8] = struct.pack("<Q", 10 ** 9)
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        load_weights(path)


def test_truncated_file(tmp_path):
    path, _ = _write(tmp_path / "t")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated file: tensor '.+'"):
        load_weights(path)


def test_sharded_index(tmp_path):
    path, model = _write(tmp_path / "sh")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (path / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(path / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_weights(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_weights(path)


def test_no_pickle_checkpoints(tmp_path):
    path, _ = _write(tmp_path / "p")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        load_weights(path)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="mistral"), "model_type 'mistral'"),
    (dict(model_type="gemma2"), "model_type 'gemma2'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope scaling type 'dynamic'"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
])
def test_unsupported_config(tmp_path, change, message):
    path, _ = _write(tmp_path / "cfg")
    (path / "config.json").write_text(json.dumps(dict(CONFIG, **change)))
    with pytest.raises(ValueError, match=message):
        load_weights(path)


def test_unknown_source_lists_registry(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        load_model("no-such-model-name")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_model(tmp_path / "missing.gguf")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_weights(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_by_name(tmp_path, bad):
    def poison(state):
        state["model.layers.1.post_attention_layernorm.weight"][3] = bad
    path, _ = _write(tmp_path / "m", mutate=poison)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.post_attention_layernorm\.weight'.*NaN or inf") as info:
        load_weights(path)
    assert str(path / "model.safetensors") in str(info.value)


def test_overflow_in_the_requested_dtype_is_named(tmp_path):
    # 1e5 is finite in float32 but beyond float16's range (65504): the load dtype makes it inf.
    path, _ = _write(tmp_path / "m", mutate=lambda s: s["model.norm.weight"].__setitem__(0, 1e5))
    load_weights(path)  # fine in the stored float32
    with pytest.raises(ValueError, match=r"'model\.norm\.weight'.*overflows torch\.float16"):
        load_weights(path, dtype=torch.float16)
