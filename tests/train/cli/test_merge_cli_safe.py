"""`lora-core merge` checks the merged weights before it writes anything: an adapter whose merge
overflows the export dtype is one line naming the module, with no output folder; `--unsafe` skips
the check. An adapter saved for another base model is named with both names."""
import json

import pytest
import torch

from helpers.tiny_models import HF_CONFIG, tiny_causal_lm
from helpers.tokenizers import make_tokenizer_dir

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    from lora_core import LoRAConfig, inject_lora, lora_modules, save_adapter
    from lora_core.models import load_model
    from lora_core.models.hf_format import write_hf_directory

    root = tmp_path_factory.mktemp("merge_safe")
    tok, _ = make_tokenizer_dir(root / "tok")
    hf = {**HF_CONFIG, "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "tie_word_embeddings": True,
          "torch_dtype": "float32"}
    tensors = {n: t.contiguous() for n, t in tiny_causal_lm(vocab=512).state_dict().items() if n != "lm_head.weight"}
    extra = {p.name: p.read_bytes() for p in tok.iterdir()}
    base = write_hf_directory(root / "base", hf, tensors, extra_files=extra)
    model, _ = load_model(base, dtype=torch.float32)
    inject_lora(model, LoRAConfig(r=2, alpha=4.0, dropout=0.0, target_modules=["up_proj"]))
    with torch.no_grad():  # finite everywhere, but s * B @ A = 2 * 2 * 300 * 100 = 120000 > float16's 65504
        for m in lora_modules(model).values():
            m.lora_A.fill_(100.0)
            m.lora_B.fill_(300.0)
    save_adapter(model, root / "adapter", base_model=str(base))
    return root, base


def test_overflowing_merge_writes_nothing(base_and_adapter, capsys):
    from lora_core.train.cli import main

    root, base = base_and_adapter
    out = root / "merged16"
    args = ["merge", "--model", str(base), "--adapter", str(root / "adapter"), "--out", str(out), "--dtype", "float16"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "merged weight of model.layers.0.mlp.up_proj has" in err and "overflows float16" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(root.glob(".merged16*"))
    assert main(args + ["--unsafe"]) == 0  # the check, not something else, stopped the first run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16"
    # in float32 the same merge is finite and goes through with the check on
    assert main(["merge", "--model", str(base), "--adapter", str(root / "adapter"), "--out", str(root / "m32")]) == 0


def test_adapter_for_another_model_is_named(base_and_adapter, tmp_path):
    import shutil

    from lora_core.train.cli import main

    root, base = base_and_adapter
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    raw = json.loads((adapter / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    (adapter / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match=rf"saved for base model 'Qwen/Qwen2.5-0.5B-Instruct' but is being "
                                         rf"loaded into '{base}'"):
        assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
