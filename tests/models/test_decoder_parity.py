"""Our decoder against transformers on the same weights (tiny random llama / qwen2 configs).

Each case saves a random HF model with save_pretrained(safe_serialization=True), loads it with our
hf_loader, and compares logits in float32. Tolerance: both sides run the same float32 ops in a
slightly different order (sdpa kernels, GQA grouping), so the differences are rounding noise:
measured max 2.4e-7 on logits of magnitude <= 1 (a few float32 ulps). We allow atol = rtol = 2e-6
(~16 ulps at magnitude 1, room for other BLAS builds), far below any real bug (a wrong RoPE
layout, norm order or mask gives errors > 1e-2).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lora_core.models import CausalLM, ModelConfig, causal_lm_loss  # noqa: E402
from lora_core.models.hf_loader import load_weights  # noqa: E402

ATOL = RTOL = 2e-6

BASE = dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, vocab_size=97,
            max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}

CASES = {
    # name: (model_type, extra config)
    "llama-mha-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-gqa3-tied": ("llama", dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-gqa3-rope-llama3": ("llama", dict(num_attention_heads=6, num_key_value_heads=2, rope_theta=500000.0,
                                             rope_scaling=LLAMA3_SCALING)),
    "llama-attention-bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                           head_dim=16)),
    "qwen2-gqa3-untied": ("qwen2", dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2-mha-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
}


def _hf_model(model_type: str, extra: dict):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
    config = cls[0](**BASE, **extra, attn_implementation="eager")
    torch.manual_seed(0)
    model = cls[1](config).eval()
    with torch.no_grad():
        # HF initialises biases and norms to 0/1; randomise them so they are actually checked.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


_PAIRS: dict = {}


pytestmark = pytest.mark.usefixtures("single_thread")


def _pair(name, tmp_path_factory):
    """(name, HF model, our model loaded from HF's saved files), built once per module."""
    if name not in _PAIRS:
        model_type, extra = CASES[name]
        hf = _hf_model(model_type, extra)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path, safe_serialization=True)
        _PAIRS[name] = (name, hf, load_weights(path, dtype=torch.float32).eval())
    return _PAIRS[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


def _assert_close(actual, expected, what, atol=ATOL, rtol=RTOL):
    err = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    worst = int((err - bound).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    assert bool((err <= bound).all()), (
        f"{what}: max abs error {err.max().item():.3e} at {where} (tolerance {atol:g} + {rtol:g}*|ref|)"
    )
    return err.max().item()


def _inputs(vocab, batch=3, steps=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, steps), generator=g)
    mask = torch.ones(batch, steps, dtype=torch.long)
    mask[1, :4] = 0  # left padding of 4 and 7 tokens
    mask[2, :7] = 0
    return ids, mask


def test_config_round_trip(pair):
    name, hf, ours = pair
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    assert config == ours.config
    # transformers itself reads our written config back to the same architecture.
    back = type(hf.config).from_dict(config.to_hf_dict())
    assert (back.num_key_value_heads, back.tie_word_embeddings) == (hf.config.num_key_value_heads,
                                                                    hf.config.tie_word_embeddings)


def test_state_dict_keys_match_hf(pair):
    name, hf, ours = pair
    assert set(ours.state_dict()) == set(hf.state_dict()) - {k for k in hf.state_dict() if "rotary" in k}
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_logits_match_without_padding(pair):
    name, hf, ours = pair
    ids, _ = _inputs(ours.config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        actual = ours(ids)
    _assert_close(actual, expected, f"{name} logits")


def test_logits_match_with_left_padding(pair):
    name, hf, ours = pair
    ids, mask = _inputs(ours.config.vocab_size)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        actual = ours(ids, attention_mask=mask)
        # Left padding must not change a row's real-token logits at all.
        alone = ours(ids[2:, 7:])
    real = mask.bool()
    _assert_close(actual[real], expected[real], f"{name} padded logits")
    _assert_close(actual[2, 7:], alone[0], f"{name} padded vs unpadded row")
    assert torch.isfinite(actual).all(), "padded rows produced non-finite values"


def test_kv_cache_incremental_equals_full_forward(pair):
    name, hf, ours = pair
    ids, mask = _inputs(ours.config.vocab_size)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = ours.new_kv_cache(capacity=4)  # small on purpose: exercises the growth path
        pieces = [ours(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache)]
        for t in range(6, ids.shape[1]):
            pieces.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache))
    incremental = torch.cat(pieces, dim=1)
    real = mask.bool()
    _assert_close(incremental[real], full[real], f"{name} cached vs full logits")


@pytest.mark.parametrize("name", ["llama-gqa3-tied", "qwen2-gqa3-untied"])
def test_chunked_loss_and_gradients_match_naive(name, tmp_path_factory):
    name, hf, ours = _pair(name, tmp_path_factory)
    ids, mask = _inputs(ours.config.vocab_size, batch=3, steps=9)
    labels = ids.clone()
    labels[0, 2:5] = -100
    model = ours.double()
    try:
        loss = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=5)
        grads = torch.autograd.grad(loss, [model.lm_head.weight, model.model.layers[0].self_attn.q_proj.weight])
        logits = model(ids, attention_mask=mask)[:, :-1]
        target = labels[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        naive = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                  ignore_index=-100)
        naive_grads = torch.autograd.grad(naive, [model.lm_head.weight,
                                                  model.model.layers[0].self_attn.q_proj.weight])
    finally:
        ours.float()
    # float32 CE per chunk vs float64 naive: float32 rounding of the logits bounds the difference.
    _assert_close(loss.double(), naive, f"{name} loss", atol=1e-5, rtol=1e-5)
    for g, ng, what in zip(grads, naive_grads, ("lm_head grad", "q_proj grad")):
        _assert_close(g, ng, f"{name} {what}", atol=1e-6, rtol=1e-4)


def test_hf_loss_matches(tmp_path_factory):
    """Our chunked loss equals transformers' own loss on the same batch (no padding)."""
    name, hf, ours = _pair("qwen2-gqa3-untied", tmp_path_factory)
    ids, _ = _inputs(ours.config.vocab_size, batch=3, steps=10)
    with torch.no_grad():
        expected = hf(input_ids=ids, labels=ids).loss
        actual = causal_lm_loss(ours, ids, ids)
    _assert_close(actual, expected, f"{name} loss vs HF")


def test_bfloat16_forward_close_to_hf_bfloat16(tmp_path_factory):
    name, hf, ours = _pair("llama-gqa3-tied", tmp_path_factory)
    ids, _ = _inputs(ours.config.vocab_size)
    hf16 = type(hf)(hf.config).eval()
    hf16.load_state_dict(hf.state_dict())
    hf16 = hf16.to(torch.bfloat16)
    ours16 = CausalLM(ours.config)
    ours16.load_state_dict(ours.state_dict())
    ours16 = ours16.to(torch.bfloat16).eval()
    with torch.no_grad():
        expected = hf16(input_ids=ids).logits.float()
        actual = ours16(ids).float()
        reference = ours(ids)
    # Same bf16 op order -> a few bf16 ulps (2**-8 relative) at most; and both near fp32.
    _assert_close(actual, expected, f"{name} bf16 logits vs HF bf16", atol=2e-2, rtol=2e-2)
    _assert_close(actual, reference, f"{name} bf16 vs fp32 logits", atol=1e-1, rtol=5e-2)
