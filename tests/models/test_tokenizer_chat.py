"""Tokenizer wrapper and chat-template rendering against transformers on the same files.

The tokenizer is trained on the spot (byte-level BPE, `tokenizers`) on a few sentences, with ChatML
special tokens and a ChatML-style template of our own that exercises what real templates use: a
default system message, loop controls, `namespace`, `raise_exception`, `tojson`, `bos_token`
(helpers.tokenizers.build_tokenizer_dir).
"""
from __future__ import annotations

import pytest

from helpers.tokenizers import CHAT_CORPUS, build_tokenizer_dir
from lora_core.models import ChatTemplateError, Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


MESSAGES = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>&</b> 🙂"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Qu'est-ce que c'est?"}],
]
TEXTS = CHAT_CORPUS[:5] + ["", " leading space", "unseen wörds xyz 987", "<|im_start|>user\nhi<|im_end|>\n",
                      "tabs\tand\nnewlines\r\n", "   "]


def test_special_ids(tok_dir):
    tok = Tokenizer.from_directory(tok_dir)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.pad_token_id == tok.eos_token_id, "pad must fall back to eos"
    assert tok.eos_token_ids == {0, 2}, "eos ids from generation_config.json must be included"
    assert tok.has_chat_template


@pytest.mark.parametrize("add_special", [False, True])
def test_encode_decode_match_transformers(tok_dir, hf_tok, add_special):
    tok = Tokenizer.from_directory(tok_dir)
    for text in TEXTS:
        ours = tok.encode(text, add_special_tokens=add_special)
        theirs = hf_tok.encode(text, add_special_tokens=add_special)
        assert ours == theirs, f"encode({text!r}): {ours} != {theirs}"
        for skip in (True, False):
            assert tok.decode(ours, skip_special_tokens=skip) == hf_tok.decode(theirs, skip_special_tokens=skip), (
                f"decode of {text!r} (skip_special_tokens={skip}) differs")


@pytest.mark.parametrize("conversation", range(len(MESSAGES)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok_dir, hf_tok, conversation, add_generation_prompt):
    tok = Tokenizer.from_directory(tok_dir)
    messages = MESSAGES[conversation]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs, f"rendering differs:\nours:   {ours!r}\ntheirs: {theirs!r}"
    assert ours.startswith("<|im_start|>")


def test_chat_template_tools_tojson_matches_transformers(tok_dir, hf_tok):
    tok = Tokenizer.from_directory(tok_dir)
    tools = [{"type": "function", "function": {"name": "f<x>", "description": "ünï & co", "parameters": {}}}]
    ours = tok.apply_chat_template(MESSAGES[0], tools=tools)
    theirs = hf_tok.apply_chat_template(MESSAGES[0], tools=tools, add_generation_prompt=True, tokenize=False)
    assert ours == theirs
    assert '"f<x>"' in ours, "tojson must not HTML-escape"


def test_template_raise_exception_is_an_error(tok_dir):
    tok = Tokenizer.from_directory(tok_dir)
    with pytest.raises(ChatTemplateError, match="unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}{{ ns }}",
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
])
def test_sandbox_blocks_escape(tmp_path, attack):
    tok = Tokenizer.from_directory(build_tokenizer_dir(tmp_path, template=attack))
    with pytest.raises(ChatTemplateError, match="SecurityError|unsafe|underscore"):
        tok.apply_chat_template(MESSAGES[0])


def test_missing_template_is_an_error_unless_fallback_requested(tmp_path):
    tok = Tokenizer.from_directory(build_tokenizer_dir(tmp_path, template=None))
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(MESSAGES[0])
    text = tok.apply_chat_template(MESSAGES[0], fallback="chatml")
    assert text == "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="unknown chat template fallback 'vicuna'"):
        tok.apply_chat_template(MESSAGES[0], fallback="vicuna")


def test_chat_template_jinja_file_takes_precedence(tmp_path):
    path = build_tokenizer_dir(tmp_path, template="from config")
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }} from file")
    assert Tokenizer.from_directory(path).apply_chat_template(MESSAGES[0]) == "How do I bake bread? from file"


def test_add_bos_token_from_config(tmp_path):
    tok = Tokenizer.from_directory(build_tokenizer_dir(tmp_path, extra_config={"add_bos_token": True}))
    assert tok.encode("hello", add_special_tokens=True)[0] == tok.bos_token_id
    assert tok.encode("hello", add_special_tokens=False)[0] != tok.bos_token_id


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_directory(tmp_path)
