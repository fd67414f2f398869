"""load_adapter refuses adapters that would load and then produce garbage: NaN/inf tensors (named
by tensor and file), an absurd alpha (scaling named with its module), and says so when the file was
saved for another base model than the one it is loaded into."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.toy_lora import Toy, randomize_adapters
from lora_core import LoRAConfig, inject_lora, load_adapter, lora_modules, save_adapter
from lora_core.adapter_io import CONFIG_NAME, MAX_SCALING, WEIGHTS_NAME


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "ad", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    return tmp_path / "ad", base


def fresh(base):
    m = Toy()
    m.load_state_dict(base)
    return m


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_by_name(saved, value):
    path, base = saved
    tensors = load_file(str(path / WEIGHTS_NAME))
    key = "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"
    tensors[key][3, 1] = value
    save_file(tensors, str(path / WEIGHTS_NAME))
    model = fresh(base)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: tensor {key} holds 1 NaN/inf"):
        load_adapter(model, path)
    assert not lora_modules(model), "a refused load must leave the model as it was"


@pytest.mark.parametrize("field, value", [("lora_alpha", 1e9), ("alpha_pattern", {"down_proj": 1e9})])
def test_absurd_alpha_is_refused(saved, field, value):
    path, base = saved
    raw = json.loads((path / CONFIG_NAME).read_text())
    raw[field] = value
    (path / CONFIG_NAME).write_text(json.dumps(raw))
    model = fresh(base)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: lora_alpha=1e\+09 with r=2 gives "
                                         rf"model\.layers\.\d\.\S+ a scaling of 5e\+08, above {MAX_SCALING:g}"):
        load_adapter(model, path)
    assert not lora_modules(model)
    # the largest scaling allowed still loads
    raw[field] = 2 * MAX_SCALING if field == "lora_alpha" else {"down_proj": 2 * MAX_SCALING}
    (path / CONFIG_NAME).write_text(json.dumps(raw))
    load_adapter(fresh(base), path)


def test_another_base_model_is_named(saved):
    path, base = saved
    with pytest.warns(UserWarning, match=r"saved for base model 'HuggingFaceTB/SmolLM2-135M-Instruct' but is "
                                         r"being loaded into 'Qwen/Qwen2.5-0.5B-Instruct'"):
        load_adapter(fresh(base), path, base_model="Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(ValueError, match="'Qwen/Qwen2.5-0.5B-Instruct'"):
        load_adapter(fresh(base), path, base_model="Qwen/Qwen2.5-0.5B-Instruct", strict_base=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the same model spelt as a local directory, and a caller that does not say: no warning
        load_adapter(fresh(base), path, base_model="/cache/models/smollm2-135m-instruct/")
        load_adapter(fresh(base), path)
