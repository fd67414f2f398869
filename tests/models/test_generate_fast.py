"""The fast generation path (slot cache with continuous batching, shared prefix, packed and fused
weights, compiled layer, tail stop check) against slow references on tiny random llama / qwen2 models.

References, none of which uses models/generate.py:
- `_slow_tokens`: the decoder's own incremental path, one prompt at a time with no padding, the
  growing KVCache, the full logits of every step (what generate() did before its fixed-shape caches);
- transformers' generate on the same weights (greedy);
- for stop strings: the full text generated without stop strings, cut at the first stop string.
"""
from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers.generation import GENERATION_PROMPTS, hf_greedy_tokens  # noqa: E402
from helpers.tokenizers import build_tokenizer_dir  # noqa: E402
from lora_core.models import generate, load_hf_directory  # noqa: E402
from lora_core.models import compile_utils  # noqa: E402
from lora_core.models.kv_cache import KVCache, SlotKVCache  # noqa: E402
from lora_core.models.sampling import prompt_generator, sample_next, stop_in_tail  # noqa: E402

PROMPTS = GENERATION_PROMPTS

pytestmark = pytest.mark.usefixtures("single_thread")


def _build(tmp_path_factory, arch: str):
    path = tmp_path_factory.mktemp(f"tiny-fast-{arch}")
    build_tokenizer_dir(path)
    vocab = len(json.loads((path / "tokenizer.json").read_text())["model"]["vocab"])
    common = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=vocab, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "llama":
        config, cls = transformers.LlamaConfig(head_dim=16, **common), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    torch.manual_seed(1)
    hf = cls(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.normal_(0.0, 1.0)  # varied greedy text, top-2 gaps far above rounding
        for name, p in hf.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.02)  # non-zero q/k/v biases (0.5 made every answer "ZZZZ...")
    from lora_core.models import Tokenizer

    tok = Tokenizer.from_directory(path)
    with torch.no_grad():
        # Lone bytes of multi-byte characters all decode to U+FFFD, and texts made of them compare
        # equal whatever the ids: make them unlikely so text equality means token equality.
        for i in range(vocab):
            if "\ufffd" in tok.decode([i]):
                hf.lm_head.weight[i].mul_(0.05)
    hf.save_pretrained(path, safe_serialization=True)
    model, tok = load_hf_directory(path, dtype=torch.float32)
    return hf, model, tok


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    return _build(tmp_path_factory, request.param)


@torch.inference_mode()
def _slow_tokens(model, tok, prompt: str, new_tokens: int, temperature=0.0, top_p=1.0, generator=None):
    """Token ids, stopping at EOS, from the decoder's incremental forward (no padding, growing cache)."""
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=True)])
    cache = KVCache(model.config.num_hidden_layers)
    logits = model(ids, kv_cache=cache)[:, -1].float()
    out = []
    for _ in range(new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        if int(nxt) in tok.eos_token_ids:
            break
        out.append(int(nxt))
        logits = model(nxt.view(1, 1), kv_cache=cache)[:, -1].float()
    return out


def test_greedy_equals_slow_path_and_transformers(tiny):
    hf, model, tok = tiny
    fast = generate(model, tok, PROMPTS, max_new_tokens=20, batch_size=4, progress=False, compile=False)
    for prompt, text in zip(PROMPTS, fast):
        slow = _slow_tokens(model, tok, prompt, 20)
        theirs = hf_greedy_tokens(hf, tok, prompt, 20)
        assert slow == theirs, f"{prompt!r}: the slow reference already disagrees with transformers"
        assert text == tok.decode(slow), f"{prompt!r}: fast {text!r} != slow {tok.decode(slow)!r}"
    assert len(set(fast)) == len(fast), f"answers repeat across prompts, a weak comparison: {fast}"


def test_sampling_equals_slow_path_with_each_prompts_own_generator(tiny):
    """Prompt i samples from prompt_generator(seed, i) whatever the batch: the one-row reference
    with that generator gives the same text at every batch size, and a rerun gives it again."""
    _, model, tok = tiny
    expected = [tok.decode(_slow_tokens(model, tok, p, 10, 1.3, 0.9, prompt_generator(5, i)))
                for i, p in enumerate(PROMPTS)]
    for batch_size in (1, 2, len(PROMPTS)):
        fast = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.3, top_p=0.9, seed=5,
                        batch_size=batch_size, progress=False)
        assert fast == expected, f"batch_size {batch_size}"
    other_seed = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.3, top_p=0.9, seed=6,
                          progress=False)
    assert other_seed != expected, "seed 6 drew the same samples as seed 5"
    repeated = generate(model, tok, [PROMPTS[0]] * 4, max_new_tokens=10, temperature=1.3, seed=5, progress=False)
    assert len(set(repeated)) > 1, f"four copies of one prompt drew the same sample: {repeated}"


def test_last_token_costs_no_forward_pass(tiny):
    """Before: a decoder forward ran after the last token and its logits were thrown away."""
    _, model, tok = tiny
    calls = []
    handle = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        no_eos = copy.copy(tok)
        no_eos.eos_token_ids = set()
        generate(model, no_eos, PROMPTS[:1], max_new_tokens=6, progress=False)
        assert len(calls) == 1 + 5, f"{len(calls)} layer-0 passes for a prefill and 6 tokens (want 6)"
        assert generate(model, no_eos, PROMPTS[:2], max_new_tokens=0, progress=False) == ["", ""]
        assert len(calls) == 6, "max_new_tokens=0 still ran a prefill"
    finally:
        handle.remove()


def test_weight_change_between_calls_is_seen(tiny):
    """Packed copies of the weights must not outlive an in-place update (an optimizer step, merge)."""
    _, model, tok = tiny
    before = generate(model, tok, PROMPTS[:2], max_new_tokens=8, progress=False)
    before_tokens = [_slow_tokens(model, tok, p, 8) for p in PROMPTS[:2]]
    with torch.no_grad():
        saved = model.lm_head.weight.clone()
        model.lm_head.weight.mul_(-1.0)  # in place: same tensor, new version
    try:
        after = generate(model, tok, PROMPTS[:2], max_new_tokens=8, progress=False)
        after_tokens = [_slow_tokens(model, tok, p, 8) for p in PROMPTS[:2]]
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    assert after_tokens != before_tokens, "negating lm_head changed nothing: the test would be vacuous"
    assert after == [tok.decode(t) for t in after_tokens], f"stale weights: {after} (before the change: {before})"


# ---------------------------------------------------------------------------- stop strings
def test_stop_strings_equal_cutting_the_full_text(tiny):
    _, model, tok = tiny
    full = generate(model, tok, PROMPTS, max_new_tokens=24, progress=False)
    for prompt, text in zip(PROMPTS, full):
        if len(text) < 8:
            continue
        # A stop string late in the text (spans tokens), an early one, two at once, and one absent.
        for stop in ([text[5:8]], [text[1:3], text[6:9]], ["\u2603 never"], [text[-3:]]):
            cut = generate(model, tok, [prompt], max_new_tokens=24, stop=stop, progress=False)[0]
            first = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
            assert cut == text[:first], f"stop {stop!r}: {cut!r}, expected {text[:first]!r}"


def test_stop_check_decodes_only_a_tail(tiny):
    """Before: every step decoded every row from its first token (quadratic in the length)."""
    _, model, tok = tiny
    decoded = []
    counting = copy.copy(tok)
    counting.eos_token_ids = set()  # run the full length

    def decode(ids, skip_special_tokens=True):
        decoded.append(len(ids))
        return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    counting.decode = decode
    steps = 60
    generate(model, counting, [PROMPTS[0]], max_new_tokens=steps, stop=["\u2603"], progress=False)
    per_step = sorted(decoded)[:-1]  # the final decode of the whole answer is not a check
    assert max(per_step) <= 16, f"a stop check decoded {max(per_step)} tokens at once"
    assert sum(per_step) < steps * 20


def test_tail_check_equals_full_decode_on_random_ids(tiny):
    _, _, tok = tiny
    vocab = tok.vocab_size if hasattr(tok, "vocab_size") else 300
    gen = torch.Generator().manual_seed(0)
    specials = sorted(tok.eos_token_ids) + [0, 1]
    for trial in range(200):
        ids = torch.randint(0, min(vocab, 400), (30,), generator=gen).tolist()
        ids[int(torch.randint(0, 30, (1,), generator=gen))] = specials[trial % len(specials)]
        text = tok.decode(ids)
        if len(text) < 6:
            continue
        start = int(torch.randint(0, len(text) - 3, (1,), generator=gen))
        stop = [text[start:start + 3]]
        # The first prefix whose full decode contains the stop string is where the tail check fires.
        want = next(n for n in range(1, 31) if stop[0] in tok.decode(ids[:n]))
        got = next((n for n in range(1, 31) if stop_in_tail(tok, ids[:n], stop, 3)), None)
        assert got == want, f"ids {ids}: stop {stop!r} found at {got}, full decode at {want}"


# ---------------------------------------------------------------------------- slot cache
def test_slot_cache_fill_keeps_real_tokens_only(tiny):
    """Two left-padded prompts prefilled together land in their slots as if each had been
    prefilled alone: the same keys and values, at positions 0..n-1, mask and length set."""
    _, model, tok = tiny
    cfg = model.config
    prompts = [tok.encode(PROMPTS[1]), tok.encode(PROMPTS[2])]
    assert len(prompts[0]) != len(prompts[1]), "the test needs padding"
    from lora_core.models.continuous_batching import _prefill

    slots = SlotKVCache(cfg.num_hidden_layers, 3, cfg.num_key_value_heads, cfg.head_dim, 64, model.dtype)
    with torch.inference_mode():
        prefilled, _ = _prefill(model, prompts, tok.pad_token_id, None)
        assert slots.fill([2, 0], prefilled) == [len(p) for p in prompts]
        for slot, ids in zip([2, 0], prompts):
            alone = KVCache(cfg.num_hidden_layers)
            model.hidden_states(torch.tensor([ids]), kv_cache=alone)
            for layer in range(cfg.num_hidden_layers):
                keys, values = alone.stored(layer)
                torch.testing.assert_close(slots.keys[layer][slot, :, :len(ids)], keys[0], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(slots.values[layer][slot, :, :len(ids)], values[0], rtol=1e-5, atol=1e-6)
            assert slots.key_mask[slot].tolist() == [True] * len(ids) + [False] * (64 - len(ids))
    assert slots.lengths.tolist() == [len(prompts[1]), 0, len(prompts[0])]


def test_slot_cache_refuses_overflow_and_bad_sizes(tiny):
    _, model, tok = tiny
    cfg = model.config
    from lora_core.models.continuous_batching import _prefill

    small = SlotKVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, 4, model.dtype)
    with torch.inference_mode():
        prefilled, _ = _prefill(model, [tok.encode(PROMPTS[1])], tok.pad_token_id, None)
    with pytest.raises(ValueError, match="leaves no room in a capacity of 4"):
        small.fill([0], prefilled)
    with pytest.raises(ValueError, match="2 slots for 1 prefilled"):
        small.fill([0, 1], prefilled)
    small.lengths[0] = 4
    with pytest.raises(ValueError, match="slot cache full"):
        small.begin_step(fixed_shape=False)
    with pytest.raises(ValueError, match="capacity=0"):
        SlotKVCache(2, 1, 1, 4, 0, torch.float32)


# ---------------------------------------------------------------------------- continuous batching
def _early_eos_tokenizer(model, tok):
    """A copy of `tok` whose EOS set adds a token the greedy answers reach at different steps, so
    rows finish at different times and waiting prompts join a running batch."""
    answers = [_slow_tokens(model, tok, p, 24) for p in PROMPTS]
    # Answer j would end near step 3 + 4j (earlier where the token came up before).
    ends = {ids[3 + 4 * j] for j, ids in enumerate(answers[:4]) if len(ids) > 3 + 4 * j}
    early = copy.copy(tok)
    early.eos_token_ids = set(tok.eos_token_ids) | ends
    return early


def test_continuous_batching_equals_one_prompt_at_a_time_and_transformers(tiny):
    hf, model, tok = tiny
    early = _early_eos_tokenizer(model, tok)
    lengths = [len(_slow_tokens(model, early, p, 24)) for p in PROMPTS]
    assert len(set(lengths)) >= 3, f"answers of lengths {lengths}: too few finish at different steps"
    for batch_size in (2, 3):
        fast = generate(model, early, PROMPTS, max_new_tokens=24, batch_size=batch_size, progress=False)
        for prompt, text in zip(PROMPTS, fast):
            theirs = hf_greedy_tokens(hf, early, prompt, 24)
            assert text == early.decode(theirs), f"batch_size {batch_size}, {prompt!r}"


def test_finished_rows_hand_their_slot_to_waiting_prompts(tiny):
    """With 2 slots and 5 prompts, prompts join while others decode: a prefill of one prompt runs
    between decode steps (the static batches of before prefilled 2, 2, 1 only at their start)."""
    _, model, tok = tiny
    early = _early_eos_tokenizer(model, tok)
    shapes = []
    handle = model.model.layers[0].register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape[:2])))
    try:
        generate(model, early, PROMPTS, max_new_tokens=24, batch_size=2, progress=False)
    finally:
        handle.remove()
    prefills = [i for i, (_, steps) in enumerate(shapes) if steps > 1]
    decodes = [i for i, (_, steps) in enumerate(shapes) if steps == 1]
    assert any(decodes[0] < i < decodes[-1] for i in prefills[1:]), f"no prompt joined mid-run: {shapes}"
    assert shapes[-1][0] == 1, "the last decode steps should run the one live row only"


def test_shared_prefix_is_prefilled_once_with_the_same_tokens(tiny):
    hf, model, tok = tiny
    header = "Answer the question. Keep it short and plain, then stop. Question: "
    prompts = [header + p for p in PROMPTS]
    from lora_core.models.continuous_batching import MIN_SHARED_PREFIX, SharedPrefix

    with torch.inference_mode():
        prefix = SharedPrefix.compute(model, [tok.encode(p) for p in prompts])
    assert prefix is not None and prefix.length >= MIN_SHARED_PREFIX
    shared = generate(model, tok, prompts, max_new_tokens=12, batch_size=3, progress=False)
    alone = generate(model, tok, prompts, max_new_tokens=12, batch_size=3, progress=False, share_prefix=False)
    assert shared == alone
    assert shared == [tok.decode(hf_greedy_tokens(hf, tok, p, 12)) for p in prompts]


# ---------------------------------------------------------------------------- compile switch
def test_compile_switch_reads_argument_then_environment(monkeypatch):
    monkeypatch.delenv(compile_utils.ENV_VAR, raising=False)
    assert compile_utils.compile_requested(None) is False
    monkeypatch.setenv(compile_utils.ENV_VAR, "1")
    assert compile_utils.compile_requested(None) is True
    assert compile_utils.compile_requested(False) is False
    monkeypatch.setenv(compile_utils.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="LORA_CORE_COMPILE must be 1 or 0"):
        compile_utils.compile_requested(None)
    with pytest.raises(TypeError, match="compile must be"):
        compile_utils.compile_requested("yes")


def test_compile_failure_falls_back_to_eager_with_one_warning(tiny, monkeypatch):
    _, model, tok = tiny

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no C++ compiler\nmore detail")

    monkeypatch.setattr(compile_utils, "_state", {"failed": False, "compiled": broken})
    eager = generate(model, tok, PROMPTS[:2], max_new_tokens=6, progress=False, compile=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(model, tok, PROMPTS[:2], max_new_tokens=6, progress=False, compile=True)
    assert out == eager
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0] and "more detail" not in messages[0]


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile on CPU needs a C++ compiler (the fallback is tested above)")
def test_compiled_step_equals_eager_with_one_graph_for_all_layers(tmp_path_factory, monkeypatch):
    """The compiled path on a tiny model (seconds): the same greedy text, and every layer shares
    one compiled graph (a per-layer specialisation would compile num_layers times)."""
    from torch._dynamo.utils import counters

    _, model, tok = _build(tmp_path_factory, "qwen2")
    monkeypatch.setattr(compile_utils, "_state", {"failed": False, "compiled": None})
    torch._dynamo.reset()
    counters.clear()
    eager = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=8, progress=False, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would hide a broken compile
        compiled = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=8, progress=False, compile=True)
    assert compiled == eager
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_packed_forwards_are_restored_even_after_an_error(tiny):
    """Inside the context every linear runs packed, q/k/v and gate/up as one fused matmul each
    (their outputs side by side, equal to the separate projections to rounding); on exit, even
    through an error, the modules are as they were."""
    from lora_core.models import packed_linear

    _, model, tok = tiny
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(2, 3, model.config.hidden_size)
    with torch.inference_mode(), packed_linear.packed_linears(model, 4):
        patched = sum("forward" in m.__dict__ for m in linears)
        fused = [getattr(layer, attr) for layer in model.model.layers
                 for attr in ("self_attn", "mlp")]
        assert all(("fused_qkv" in f.__dict__) != ("fused_gate_up" in f.__dict__) for f in fused)
        separate = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        torch.testing.assert_close(attn.fused_qkv(x), separate, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp.fused_gate_up(x), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1),
                                   rtol=1e-5, atol=1e-5)
    members = 5 * model.config.num_hidden_layers
    assert patched == len(linears) - members, "every linear outside a fused group should run packed"
    with pytest.raises(RuntimeError, match="boom"):
        with packed_linear.packed_linears(model, 4):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in linears)
    assert not any(attr in m.__dict__ for m in model.modules() for attr in packed_linear.FUSED_GROUPS)
    packed_linear.release(model)
    assert model not in packed_linear._PACKS


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 100])
def test_packed_linear_equals_plain_linear(dtype, rows, vendor, monkeypatch):
    """Inside the context every row count (one row, the packed layout's, a prefill's) gives the
    plain nn.Linear's result to the dtype's rounding, with and without bias, on both fp32 routes
    (MKL where the CPU is Intel's, oneDNN elsewhere)."""
    import dataclasses

    from lora_core.models import packed_linear

    caps = dataclasses.replace(packed_linear.cpu_caps(), vendor=vendor)
    monkeypatch.setattr(packed_linear, "cpu_caps", lambda: caps)
    if dtype == torch.float32 and torch.backends.mkl.is_available():
        assert packed_linear._route(dtype) == ("mkl" if vendor == "GenuineIntel" else "mkldnn")

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(96, 160, bias=True), torch.nn.Linear(160, 48, bias=False)).to(dtype)
    x = torch.randn(rows, 7, 96).to(dtype) if rows == 100 else torch.randn(rows, 96).to(dtype)
    with torch.inference_mode():
        plain = layers(x).float()
        with packed_linear.packed_linears(layers, 16):
            packed = layers(x).float()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(packed, plain, rtol=8 * eps, atol=8 * eps * float(plain.abs().max()))
    packed_linear.release(layers)
