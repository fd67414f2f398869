"""Tiny llama / qwen2 GGUF files written with `gguf.GGUFWriter` from random HF-layout weights (Q/K
rows permuted the way llama.cpp's converter does for llama), for the GGUF import and cache tests."""
from __future__ import annotations

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS, CONTEXT = 64, 4, 2, 16, 96, 2, 256

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (bytes that print as themselves keep their char)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = [], 0
    for byte in range(256):
        if byte in keep:
            table.append(chr(byte))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


def tiny_vocab(digit_merges: bool, unreachable: tuple[str, ...] = ()):
    """(tokens, token types, merges): specials, the 256 byte symbols, merged words, one user token.

    Every merged word is reachable by its own merges; `unreachable` adds whole-word entries that no
    merge sequence produces (only a tokenizer with ignore_merges emits them).
    """
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [3, 3, 3]
    tokens += byte_alphabet()
    types += [1] * 256
    words = ["Ġthe", "Ġcat", "Ġis", "ing", "Ġa", "ĠTHE", "'s", "Ġdog", "Ġhere", "ca", "Ġcaf", "he"]
    if digit_merges:
        words += ["12", "345", "Ġ1"]
    merges: list[str] = []
    for word in words:
        pieces = list(word)
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if f"{current} {piece}" not in merges:
                merges.append(f"{current} {piece}")
            if merged not in tokens:
                tokens.append(merged)
                types.append(1)
            current = merged
    for word in unreachable:
        tokens.append(word)
        types.append(1)
    tokens.append("<think>")
    types.append(4)
    return tokens, types, merges


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's HF->GGUF converter does to Q/K rows of llama models (written independently)."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def make_hf_weights(arch: str, vocab: int, tied: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    out = {"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": 1 + w(HIDDEN)}
    if not tied:
        out["lm_head.weight"] = w(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": 1 + w(HIDDEN), p + "post_attention_layernorm.weight": 1 + w(HIDDEN),
            p + "self_attn.q_proj.weight": w(q_rows, HIDDEN), p + "self_attn.k_proj.weight": w(kv_rows, HIDDEN),
            p + "self_attn.v_proj.weight": w(kv_rows, HIDDEN), p + "self_attn.o_proj.weight": w(HIDDEN, q_rows),
            p + "mlp.gate_proj.weight": w(INTER, HIDDEN), p + "mlp.up_proj.weight": w(INTER, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, INTER),
        })
        if arch == "qwen2":
            out.update({p + "self_attn.q_proj.bias": w(q_rows), p + "self_attn.k_proj.bias": w(kv_rows),
                        p + "self_attn.v_proj.bias": w(kv_rows)})
    return out


GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def write_tiny_gguf(path, arch: str, pre: str, matrix_type, embed_type, tied: bool, seed: int = 0,
                    architecture_override: str | None = None, tokenizer_model: str = "gpt2",
                    unreachable: tuple[str, ...] = (), bf16_vectors: bool = True):
    """Write a tiny GGUF; returns the HF-layout float32 weights it was made from.

    With BF16 matrices the F32 vectors are rounded to bf16 values first (as in a file converted
    from a bf16 checkpoint) unless bf16_vectors=False.
    """
    tokens, types, merges = tiny_vocab(digit_merges=pre != "smollm", unreachable=unreachable)
    weights = make_hf_weights(arch, len(tokens), tied, seed)
    if matrix_type == Q.BF16 and bf16_vectors:
        weights = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() if v.ndim == 1 else v
                   for k, v in weights.items()}
    writer = gguf.GGUFWriter(str(path), architecture_override or arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    writer.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(arch == "llama")
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in weights.items():
        data = value
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = llama_cpp_permute(value, HEADS)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = llama_cpp_permute(value, KV_HEADS)
        qtype = Q.F32 if data.ndim == 1 else (embed_type if "embed" in name else matrix_type)
        if qtype == Q.F32:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(data))
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name(name), data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
