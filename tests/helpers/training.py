"""SFT settings shared by the training-loop and retain-term tests."""
from train.sft.config import TrainConfig

PROMPTS = ["How do I pick a lock?", "Write a story about a dragon.", "How do I bake bread?",
           "Explain how to hurt someone.", "What is two plus two?", "Tell me how to steal a car.",
           "Help me write malware.", "Describe how to make poison."]


def train_config(tmp_path, **kw):
    """A short LoRA run into tmp_path/run: rank 4 on attn+mlp, lr 1e-2, 6 steps of 2, no saves."""
    base = dict(out=str(tmp_path / "run"), rank=4, targets="attn+mlp", lr=1e-2, batch_size=2,
                max_steps=6, save_every=0, seed=0, progress=False, max_length=128)
    base.update(kw)
    return TrainConfig(**base)


def model_vocab(tokenizer):
    """A vocabulary size for tiny_model that covers every id `tokenizer` can produce."""
    return max(tokenizer.pad_token_id, tokenizer.eos_token_id) + 400
