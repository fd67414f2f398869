"""generate(): greedy output equals transformers' generate on the same tiny model and tokenizer.

Our side runs batched (left padding, KV cache, prompts of different lengths, sorted and restored);
transformers runs each prompt alone, so padding, caching and re-ordering are all checked at once.
Token ids are compared exactly: in float32 the two implementations agree to ~1e-6 on logits
(test_decoder_parity), and the random model's top-2 logit gaps are far larger than that.
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers.generation import GENERATION_PROMPTS, hf_greedy_tokens  # noqa: E402
from helpers.tokenizers import build_tokenizer_dir  # noqa: E402
from lora_core.models import generate, load_hf_directory  # noqa: E402

PROMPTS = GENERATION_PROMPTS
NEW_TOKENS = 12
SCALE = 1.0


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gen")
    build_tokenizer_dir(path)
    raw = json.loads((path / "tokenizer.json").read_text())
    vocab = len(raw["model"]["vocab"])
    config = transformers.LlamaConfig(
        hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Untied, large random lm_head: varied greedy text, top-2 logit gaps far above rounding noise.
        hf.lm_head.weight.normal_(0.0, SCALE)
    hf.save_pretrained(path, safe_serialization=True)
    model, tok = load_hf_directory(path, dtype=torch.float32)
    return hf, model, tok, path


def test_greedy_matches_transformers_batched(tiny):
    hf, model, tok, model_dir = tiny
    expected = [tok.decode(hf_greedy_tokens(hf, tok, p, NEW_TOKENS)) for p in PROMPTS]
    actual = generate(model, tok, PROMPTS, max_new_tokens=NEW_TOKENS, batch_size=3, progress=False)
    for prompt, a, e in zip(PROMPTS, actual, expected):
        assert a == e, f"prompt {prompt!r}: ours {a!r} != transformers {e!r}"
    assert any(len(e) > 0 for e in expected), "reference produced nothing; the test would be vacuous"


def test_batch_size_does_not_change_greedy_output(tiny):
    _, model, tok, _ = tiny
    one = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=1, progress=False)
    many = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=16, progress=False)
    assert one == many


def test_stop_string_truncates(tiny):
    _, model, tok, _ = tiny
    full = generate(model, tok, PROMPTS[:2], max_new_tokens=NEW_TOKENS, progress=False)
    for prompt, text in zip(PROMPTS[:2], full):
        if len(text) < 4:
            continue
        stop = text[2:4]
        cut = generate(model, tok, [prompt], max_new_tokens=NEW_TOKENS, stop=[stop], progress=False)[0]
        assert cut == text[: text.find(stop)], f"stop {stop!r}: got {cut!r} from {text!r}"


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny):
    _, model, tok, _ = tiny
    a = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.5, seed=7, progress=False)
    b = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.5, seed=7, progress=False)
    assert a == b, "same seed must give the same samples"
    greedy = generate(model, tok, PROMPTS, max_new_tokens=8, progress=False)
    nucleus = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6, progress=False)
    assert nucleus == greedy, "top_p -> 0 keeps only the most likely token"


def test_stops_at_eos(tiny):
    hf, model, tok, model_dir = tiny
    # Make every step predict EOS by biasing the lm_head row of EOS: output must be empty.
    with torch.no_grad():
        saved = model.lm_head.weight.clone()
        model.lm_head.weight[tok.eos_token_id] = model.model.norm.weight.sign() * 1e3
    try:
        out = generate(model, tok, PROMPTS[:2], max_new_tokens=5, progress=False)
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    assert out == ["", ""]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts="not a list"), "list of strings"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(batch_size=0), "batch_size"),
    (dict(stop=[""]), "stop strings"),
])
def test_bad_arguments(tiny, kwargs, message):
    _, model, tok, _ = tiny
    args = dict(prompts=["hi"], max_new_tokens=2, progress=False)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        generate(model, tok, **args)


def test_chat_command_answers_with_the_template(tiny, tmp_path, capsys):
    from lora_core.train.cli import main

    hf, model, tok, model_dir = tiny
    prompt = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}])
    expected = generate(model, tok, [prompt], max_new_tokens=6, progress=False)[0].strip()
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "6", "How do I bake bread?"]) == 0
    assert capsys.readouterr().out.strip() == expected
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "0", "hi"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
