"""Build `tokenizer.json` / `tokenizer_config.json` for the `tokenizers` library from GGUF metadata.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`, the family of SmolLM2, Llama 3
and Qwen2) are handled; SentencePiece ("llama") and others are refused by name.

What a GGUF stores and how it maps:
- `tokenizer.ggml.tokens`: the vocabulary in id order, already spelled in GPT-2's byte-to-unicode
  alphabet (a space is "Ġ"), so it goes into the BPE model unchanged.
- `tokenizer.ggml.merges`: "left right" strings in rank order.
- `tokenizer.ggml.token_type`: 3 = CONTROL (added, special: `<|im_start|>`), 4 = USER_DEFINED
  (added, not special: `<think>`); both are matched whole in the text before BPE, as llama.cpp does.
- `tokenizer.ggml.pre`: the name of the pre-tokenizer (the regex that splits text into words
  before BPE). The name selects the split the vocabulary was trained with; an unknown name is
  refused rather than guessed, because a wrong split silently changes token ids.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONTROL, USER_DEFINED = 3, 4

# Llama 3's split (llama.cpp "llama-bpe"): case-insensitive contractions, letters with one optional
# leading non-letter, numbers in groups of up to three digits, punctuation runs, newlines, spaces.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's split: the same with every digit on its own.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The split llama.cpp uses for StarCoder-family vocabularies (SmolLM among them): every digit on its
# own first, then GPT-2's regex (which tokenizers' ByteLevel(use_regex=True) applies).
_DIGIT = r"\p{N}"

# tokenizer.ggml.pre -> (kind, regex); kinds: "gpt2" = GPT-2's regex (built into ByteLevel),
# "digits+gpt2" = digits isolated, then GPT-2's regex; "split" = one custom regex, then bytes.
PRE_TOKENIZERS: dict[str, tuple[str, str | None]] = {
    "default": ("gpt2", None),
    "gpt2": ("gpt2", None),
    "smollm": ("digits+gpt2", None),
    "starcoder": ("digits+gpt2", None),
    "refact": ("digits+gpt2", None),
    "codeshell": ("digits+gpt2", None),
    "llama-bpe": ("split", _LLAMA3_SPLIT),
    "llama3": ("split", _LLAMA3_SPLIT),
    "llama-v3": ("split", _LLAMA3_SPLIT),
    "falcon3": ("split", _LLAMA3_SPLIT),
    "qwen2": ("split", _QWEN2_SPLIT),
    "deepseek-r1-qwen": ("split", _QWEN2_SPLIT),
}
# llama.cpp treats these as Llama 3 vocabularies: a word that is a whole vocabulary entry skips BPE
# ("ignore_merges", as HF's Llama 3 tokenizer.json also says), and BOS is added unless the file's
# tokenizer.ggml.add_bos_token says otherwise.
_LLAMA3_FAMILY = {"llama-bpe", "llama3", "llama-v3", "falcon3"}
# The original Qwen2 tokenizer.json normalises to NFC before splitting. DeepSeek-R1-Distill-Qwen's
# GGUF ("deepseek-r1-qwen") does not: llama.cpp never normalises, and transformers' GGUF conversion
# of that file has no normaliser either, so composing "e" + U+0301 into "é" would change its ids
# (checked on its real vocabulary, tests/models/test_deepseek_tokenizer.py).
_NFC = {"qwen2"}


def _token_text(tokens: list[str], index, path, what: str) -> str | None:
    if index is None:
        return None
    index = int(index)
    if not 0 <= index < len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.{what} = {index} is outside the vocabulary of {len(tokens)}")
    return tokens[index]


def build_tokenizer_files(metadata: dict[str, Any], path: Path | str = "<gguf>") -> dict[str, str]:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...} for the vocabulary in `metadata`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model {model!r} is not supported (only 'gpt2', byte-level BPE)")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
                         f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges_text: list[str] = list(metadata.get("tokenizer.ggml.merges", []))
    types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens")

    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a string listed twice keeps its first id only
    merges = []
    for rank, merge in enumerate(merges_text):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"{path}: merge #{rank} {merge!r} is not 'left right'")
        merges.append((left, right))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                     ignore_merges=pre in _LLAMA3_FAMILY))
    kind, regex = PRE_TOKENIZERS[pre]
    if kind == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind == "digits+gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_DIGIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in _NFC:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()

    added = [
        AddedToken(token, special=(kind_ == CONTROL), normalized=False)
        for index, (token, kind_) in enumerate(zip(tokens, types))
        if kind_ in (CONTROL, USER_DEFINED) and vocab.get(token) == index
    ]
    # Control tokens go in as special (skipped by decode(skip_special_tokens=True)); user-defined
    # ones as plain added tokens. Both are in the vocabulary already, so they keep their ids.
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    for token in added:
        if tokenizer.token_to_id(token.content) != vocab[token.content]:
            raise ValueError(f"{path}: added token {token.content!r} did not keep id {vocab[token.content]}")

    meta = lambda key: metadata.get(f"tokenizer.ggml.{key}")  # noqa: E731
    bos = _token_text(tokens, meta("bos_token_id"), path, "bos_token_id")
    eos = _token_text(tokens, meta("eos_token_id"), path, "eos_token_id")
    unk = _token_text(tokens, meta("unknown_token_id"), path, "unknown_token_id")
    pad = _token_text(tokens, meta("padding_token_id"), path, "padding_token_id")
    add_bos = bool(meta("add_bos_token")) if meta("add_bos_token") is not None else pre in _LLAMA3_FAMILY
    add_eos = bool(meta("add_eos_token")) if meta("add_eos_token") is not None else False

    pieces_single, pieces_pair, specials = ["$A:0"], ["$A:0", "$B:1"], []
    if add_bos and bos is not None:
        pieces_single.insert(0, f"{bos}:0")
        pieces_pair = [f"{bos}:0", "$A:0", f"{bos}:1", "$B:1"]
        specials.append((bos, vocab[bos]))
    if add_eos and eos is not None:
        pieces_single.append(f"{eos}:0")
        pieces_pair.insert(pieces_pair.index("$B:1"), f"{eos}:0")
        pieces_pair.append(f"{eos}:1")
        specials.append((eos, vocab[eos]))
    if specials:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(pieces_single), pair=" ".join(pieces_pair), special_tokens=specials)
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    added_decoder = {
        str(vocab[t.content]): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": t.special}
        for t in added
    }
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added_decoder,
    }
    context = next((v for k, v in metadata.items() if k.endswith(".context_length")), None)
    if context is not None:
        tokenizer_config["model_max_length"] = int(context)
    template = metadata.get("tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = str(template)
    return {
        "tokenizer.json": tokenizer.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
    }


__all__ = ["build_tokenizer_files", "PRE_TOKENIZERS"]
