"""Tokenisation with the chat template and the assistant-only loss mask.

The reference for "which tokens are the assistant's" is independent of the code under test: the
character span of each assistant reply (plus the template's end-of-turn marker) is located in the
rendered text by plain string search, and the tokenizer's own character offsets say which tokens
fall inside it.
"""
import pytest

from helpers.tokenizers import CHATML, make_tokenizer_dir
from lora_core.train.sft.batches import IGNORE_INDEX, collate, micro_batches, tokenize_example, tokenize_examples


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from lora_core.models import Tokenizer

    path, raw = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    return Tokenizer.from_directory(path), raw


CONVERSATIONS = [
    [{"role": "user", "content": "How do I pick a lock?"},
     {"role": "assistant", "content": "I'm sorry, but I can't help with that."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is two plus two?"},
     {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "Write a story about a dragon."},
     {"role": "assistant", "content": "<think>\nThis is harmless.\n</think>\n\nOnce upon a time..."}],
]


def _reference_mask(raw, text, messages):
    """Tokens whose characters lie inside an assistant reply or its '<|im_end|>\\n' marker."""
    spans, start = [], 0
    for m in messages:
        head = f"<|im_start|>{m['role']}\n"
        at = text.index(head + m["content"] + "<|im_end|>\n", start)
        body = at + len(head)
        end = body + len(m["content"]) + len("<|im_end|>\n")
        if m["role"] == "assistant":
            spans.append((body, end))
        start = end
    enc = raw.encode(text, add_special_tokens=False)
    return enc.ids, [any(s <= a and b <= e for s, e in spans) for a, b in enc.offsets]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_mask_covers_exactly_the_assistant_tokens(tokenizers, conv):
    tok, raw = tokenizers
    messages = CONVERSATIONS[conv]
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    ref_ids, ref_mask = _reference_mask(raw, text, messages)
    ex = tokenize_example(tok, messages)
    assert ex.input_ids == ref_ids
    got_mask = [l != IGNORE_INDEX for l in ex.labels]
    wrong = [i for i, (g, r) in enumerate(zip(got_mask, ref_mask)) if g != r]
    assert not wrong, f"mask differs at tokens {wrong[:10]}: {[raw.id_to_token(ex.input_ids[i]) for i in wrong[:10]]}"
    assert all(l == t for l, t in zip(ex.labels, ex.input_ids) if l != IGNORE_INDEX)
    # The end-of-turn token after each reply carries loss, so the model learns to stop.
    eot = raw.token_to_id("<|im_end|>")
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    assert sum(l == eot for l in ex.labels) == n_assistant


def test_template_that_breaks_the_prefix_is_an_error(tmp_path):
    from lora_core.models import Tokenizer

    # Rewrites earlier turns once an assistant turn exists: the generation prompt is not a prefix.
    bad = CHATML.replace("{{ message['content'] }}", "{{ message['content'] }}{% if loop.last %}!{% endif %}")
    path, _ = make_tokenizer_dir(tmp_path / "bad", bad)
    with pytest.raises(ValueError, match="example 0.*prefix"):
        tokenize_example(Tokenizer.from_directory(path), CONVERSATIONS[0])


def test_truncation_and_drop(tokenizers):
    tok, _ = tokenizers
    examples = [{"messages": m} for m in CONVERSATIONS]
    full, stats = tokenize_examples(tok, examples, max_length=None)
    prompt_len = full[0].labels.index(next(l for l in full[0].labels if l != IGNORE_INDEX))
    short, stats = tokenize_examples(tok, examples[:1], max_length=prompt_len + 3)
    assert stats["truncated"] == 1 and len(short[0].input_ids) == prompt_len + 3
    with pytest.raises(ValueError, match="max_length"):
        tokenize_examples(tok, examples[:1], max_length=prompt_len)
    with pytest.raises(ValueError, match="empty"):
        tokenize_examples(tok, [], max_length=64)


def test_collate_pads_and_masks(tokenizers):
    tok, _ = tokenizers
    exs, _ = tokenize_examples(tok, [{"messages": m} for m in CONVERSATIONS], max_length=None)
    batch = collate(exs, pad_token_id=tok.pad_token_id)
    lengths = [len(e.input_ids) for e in exs]
    assert batch["input_ids"].shape == (2, max(lengths))
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert batch["input_ids"][row, :n].tolist() == exs[row].input_ids


def test_micro_batches_cover_each_epoch_once():
    for epoch in range(3):
        batches = micro_batches(10, 3, epoch, seed=5)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(10)) and [len(b) for b in batches] == [3, 3, 3, 1]
    assert micro_batches(10, 3, 0, 5) != micro_batches(10, 3, 1, 5)
    assert micro_batches(10, 3, 1, 5) == micro_batches(10, 3, 1, 5)


# A reasoning template in the style of DeepSeek-R1's: history replies lose their <think> part and
# the generation prompt opens "<think>\n" itself.
R1_STYLE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
            "{% else %}{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}"
            "{% endif %}<|im_start|>assistant\n{{ c }}<|im_end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def test_reasoning_template_keeps_the_thought_in_the_target(tmp_path):
    from lora_core.models import Tokenizer

    path, raw = make_tokenizer_dir(tmp_path / "r1", R1_STYLE)
    tok = Tokenizer.from_directory(path)
    reply = "<think>\nThis request is harmful, so I should refuse.\n</think>\n\nI can't help with that."
    messages = [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": reply}]
    ex = tokenize_example(tok, messages)
    assert ex.rebuilt
    prompt = "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    target = "This request is harmful, so I should refuse.\n</think>\n\nI can't help with that.<|im_end|>\n"
    assert ex.input_ids == raw.encode(prompt + target, add_special_tokens=False).ids
    supervised = [t for t in ex.labels if t != IGNORE_INDEX]
    assert raw.decode(supervised, skip_special_tokens=False) == raw.decode(
        raw.encode(target, add_special_tokens=False).ids, skip_special_tokens=False)
