"""The 7B's import path on a small file of the same kind: qwen2 with Q4_K and Q6_K matrices (the
7B's quantisations) and F32 vectors, streamed to bfloat16, against transformers' GGUF loader.

K-quant blocks are written as random bytes with small, finite scales (the gguf package cannot
quantise to K types), so every nibble and 6-bit scale pattern occurs. Checks: every imported
tensor is transformers' float32 dequantisation rounded to bfloat16, bit for bit; our decoder's
logits on the bf16 directory are within bf16 tolerance of transformers' float32 ones; the result
does not depend on the row-block size (blocks are what keep memory flat), and no dequantisation
call ever sees more rows than one block.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from helpers.tiny_gguf import tiny_vocab
from safetensors.torch import load_file

import lora_core.models.gguf_stream as gguf_stream
from lora_core.models.gguf_import import convert_gguf

pytestmark = pytest.mark.usefixtures("single_thread")

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 256, 4, 2, 512, 2
HEAD_DIM = HIDDEN // HEADS


def _k_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random K-quant data for a (rows, cols) matrix with finite, small block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (f16) lead the block
        data[..., 0:2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
        data[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    else:  # Q6_K: d (f16) ends the block
        data[..., size - 2:size] = np.frombuffer(np.float16(0.0005).tobytes(), np.uint8)
    return data.reshape(rows, -1)


def write_k_quant_qwen2(path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab(digit_merges=True)
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("deepseek-r1-qwen")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def matrix(name, rows, cols, qtype):
        writer.add_tensor(name, _k_blocks(rng, rows, cols, qtype), raw_dtype=qtype)

    def vector(name, n, around=0.0):
        writer.add_tensor(name, (around + 0.05 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", vocab, HIDDEN, Q.Q4_K)
    matrix("output.weight", vocab, HIDDEN, Q.Q6_K)
    vector("output_norm.weight", HIDDEN, 1.0)
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", HIDDEN, 1.0)
        vector(p + "ffn_norm.weight", HIDDEN, 1.0)
        matrix(p + "attn_q.weight", HIDDEN, HIDDEN, Q.Q4_K)
        matrix(p + "attn_k.weight", kv, HIDDEN, Q.Q4_K)
        matrix(p + "attn_v.weight", kv, HIDDEN, Q.Q6_K)
        matrix(p + "attn_output.weight", HIDDEN, HIDDEN, Q.Q4_K)
        vector(p + "attn_q.bias", HIDDEN)
        vector(p + "attn_k.bias", kv)
        vector(p + "attn_v.bias", kv)
        matrix(p + "ffn_gate.weight", INTER, HIDDEN, Q.Q4_K)
        matrix(p + "ffn_up.weight", INTER, HIDDEN, Q.Q4_K)
        matrix(p + "ffn_down.weight", HIDDEN, INTER, Q.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def k_quant_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("kq")
    write_k_quant_qwen2(root / "kq.gguf")
    return root / "kq.gguf"


def test_bf16_import_matches_transformers(k_quant_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from lora_core.models.loading import load_model

    out = convert_gguf(k_quant_file, tmp_path / "hf", dtype="bfloat16", progress=False)
    ours = load_file(str(out / "model.safetensors"))
    reference = AutoModelForCausalLM.from_pretrained(str(k_quant_file.parent), gguf_file=k_quant_file.name,
                                                     dtype=torch.float32)
    ref_state = reference.state_dict()
    assert set(ours) == set(ref_state)
    for key, ref in ref_state.items():
        assert ours[key].dtype == torch.bfloat16
        mismatch = int((ours[key] != ref.to(torch.bfloat16)).sum())
        assert mismatch == 0, f"{key}: {mismatch} values are not transformers' fp32 rounded to bf16"

    # Compute: on the same (bf16-valued) weights, our decoder in float32 equals transformers'.
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    model32, tokenizer = load_model(out, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("the cat is here 12345 café")])
    with torch.no_grad():
        expected = reference(ids).logits
        got32 = model32(ids)
    scale = float(expected.abs().max())
    err = float((got32 - expected).abs().max())
    assert scale > 1.0 and err <= 1e-5 * scale, f"fp32: max |ours - transformers| {err:.3g} (logits up to {scale:.3g})"

    # And as a user runs it, in bf16: bf16 activations through random weights drift by a few
    # percent of the logits' spread (measured 4.6 of std 10.9), never by the spread itself, and
    # the greedy choice stays.
    model16, _ = load_model(out)
    assert model16.dtype == torch.bfloat16
    with torch.no_grad():
        got16 = model16(ids).float()
    err16 = float((got16 - expected).abs().max())
    assert err16 <= 0.6 * float(expected.std()), f"bf16: max error {err16:.3g}, logit std {float(expected.std()):.3g}"
    assert torch.equal(got16.argmax(-1), expected.argmax(-1))


def test_row_blocks_keep_memory_flat_and_do_not_change_the_result(k_quant_file, tmp_path, monkeypatch):
    whole = convert_gguf(k_quant_file, tmp_path / "one-block", dtype="bfloat16", progress=False)
    rows_seen = []
    real = gguf.quants.dequantize

    def recording(data, qtype):
        rows_seen.append(data.shape[0])
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", recording)
    monkeypatch.setattr(gguf_stream, "_BLOCK_BYTES_F32", 4 * HIDDEN * 7)  # 7 rows of 256 at a time
    blocked = convert_gguf(k_quant_file, tmp_path / "blocks", dtype="bfloat16", progress=False)
    assert max(rows_seen) <= 7
    assert (blocked / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_the_streamed_file_is_what_safetensors_writes(k_quant_file, tmp_path):
    from safetensors.torch import save_file

    out = convert_gguf(k_quant_file, tmp_path / "hf", dtype="bfloat16", progress=False)
    tensors = load_file(str(out / "model.safetensors"))
    save_file(tensors, str(tmp_path / "again.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "again.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_too_little_memory_is_refused_with_the_estimate(k_quant_file, tmp_path, monkeypatch):
    import lora_core.models.host_memory as host_memory

    monkeypatch.setattr(host_memory, "available_bytes", lambda: 1000)
    with pytest.raises(ValueError, match=r"importing kq.gguf needs about .* GB of memory \(estimate\), only 0.0 GB"):
        convert_gguf(k_quant_file, tmp_path / "hf", dtype="bfloat16", progress=False)
    assert not (tmp_path / "hf").exists()
