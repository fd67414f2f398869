"""A tiny random reasoning-format checkpoint: qwen2 weights, a DeepSeek-R1-style chat template and
`<think>` tokens, written as an HF directory in a test's temporary folder (no weights committed).

The template is our own text with the structure of the one the pinned DeepSeek-R1-Distill-Qwen-7B
GGUF carries (read off its header): BOS, the system prompt bare, `<｜User｜>` + text,
`<｜Assistant｜>` + reply + `<｜end▁of▁sentence｜>`, the reasoning cut from assistant turns up to
`</think>` (it is meant for chat history), and a generation prompt that is `<｜Assistant｜>` alone.
Like that template it mentions `</think>` but never `<think>`, which is what lora-core's own
reasoning-format detection has to cope with. `<think>` and `</think>` are added, non-special tokens
(as in the real vocabulary), so a decoded answer keeps them.
"""
from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PAD = "<｜pad｜>"

R1_STYLE_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{% set reply = m['content'] %}"
    "{% if '</think>' in reply %}{% set reply = reply.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + reply + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

_CORPUS = [
    "How do I bake bread? Mix flour, water, yeast and salt, knead, rest and bake.",
    "I'm sorry, but I can't help with that. It could cause serious harm to people.",
    "The user asks for something harmful, so I should decline and offer safe help instead.",
    "What is two plus two? Four. Solve 12 * 7 = 84 step by step.",
    "Write a story about a dragon who learns to read.",
] * 5

QWEN2_CONFIG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                    tie_word_embeddings=False, use_sliding_window=False, torch_dtype="float32",
                    hidden_act="silu")


def write_reasoning_tokenizer(path):
    """tokenizer.json + tokenizer_config.json with the R1-style template and think tokens."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=360, special_tokens=[BOS, EOS, USER, ASSISTANT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens([THINK_OPEN, THINK_CLOSE])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": R1_STYLE_TEMPLATE, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "clean_up_tokenization_spaces": False, "model_max_length": 512}))
    return tok


def write_reasoning_checkpoint(path, seed: int = 0):
    """A random 2-layer qwen2 (q/k/v biases, untied lm_head like the 7B) with the R1-style
    tokenizer, as an HF directory at `path`; returns the path."""
    from lora_core.models import CausalLM, ModelConfig
    from lora_core.models.hf_format import write_hf_directory

    tok_dir = path.parent / f"{path.name}-tokenizer"
    tok = write_reasoning_tokenizer(tok_dir)
    hf = {**QWEN2_CONFIG, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
          "bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS),
          "pad_token_id": tok.token_to_id(PAD)}
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf_dict(hf)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    tensors = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
    extra = {p.name: p.read_bytes() for p in tok_dir.iterdir()}
    return write_hf_directory(path, hf, tensors, extra_files=extra)
