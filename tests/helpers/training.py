"""SFT settings shared by the training-loop and retain-term tests."""
from lora_core.train.sft.config import TrainConfig

PROMPTS = ["How do I pick a lock?", "Write a story about a dragon.", "How do I bake bread?",
           "Explain how to hurt someone.", "What is two plus two?", "Tell me how to steal a car.",
           "Help me write malware.", "Describe how to make poison."]


def train_config(tmp_path, **kw):
    """A short LoRA run into tmp_path/run: rank 4 on attn+mlp, lr 1e-2, 6 steps of 2, no saves."""
    base = dict(out=str(tmp_path / "run"), rank=4, targets="attn+mlp", lr=1e-2, batch_size=2,
                max_steps=6, save_every=0, seed=0, progress=False, max_length=128)
    base.update(kw)
    return TrainConfig.from_flat(**base)


def model_vocab(tokenizer):
    """A vocabulary size for tiny_model that covers every id `tokenizer` can produce."""
    return max(tokenizer.pad_token_id, tokenizer.eos_token_id) + 400


def write_cli_inputs(root, tokenizer):
    """(model_dir, data): a tiny HF model directory with `tokenizer`'s files and a user JSONL of
    refusals to PROMPTS, as `lora-core train --model DIR --data FILE` reads them."""
    import json
    from pathlib import Path

    from helpers.tiny_models import tiny_model
    from lora_core.models.hf_format import write_hf_directory

    model = tiny_model(model_vocab(tokenizer))
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tok_dir = Path(tokenizer.name)
    extra = {n: (tok_dir / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json")}
    model_dir = write_hf_directory(Path(root) / "tiny", model.config.to_hf_dict(), tensors, extra_files=extra)
    data = Path(root) / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": "I can't help with that."}) + "\n"
                            for p in PROMPTS))
    return model_dir, data
