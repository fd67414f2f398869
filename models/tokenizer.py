"""A thin wrapper over the `tokenizers` library, configured from an HF-format directory.

Reads `tokenizer.json` (the vocabulary, merges, normaliser, pre-tokeniser, post-processor) and the
settings HF keeps around it: `tokenizer_config.json` (special tokens, add_bos/add_eos, chat
template, clean-up of spaces), `chat_template.jinja` / `chat_template.json` (where newer
transformers store the template), `special_tokens_map.json`, `generation_config.json` and
`config.json` (end-of-sequence ids; instruct checkpoints often list several).

Special-token behaviour follows tokenizer.json's post-processor; `add_bos_token` / `add_eos_token`
in tokenizer_config.json, when true, make sure the token is there (as HF's Llama tokenizer does).
The pad token falls back to the EOS token, the usual choice for decoder-only models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from lora_core.common.files import read_json

from .chat_template import render_chat_template

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# HF's clean_up_tokenization: undo spaces that word-level detokenisation puts before punctuation.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token entry {value!r} is neither a string nor {{'content': ...}}")


def _ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, settings: dict | None = None, chat_template: str | None = None,
                 extra_eos_ids: set[int] | None = None, name: str = "tokenizer"):
        settings = settings or {}
        self._tok = tokenizer
        self.name = name
        self.chat_template = chat_template
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_NAMES:
            text = _token_text(settings.get(key))
            if text is not None:
                self.special_tokens[key] = text
        self.bos_token_id = self._id_of(self.special_tokens.get("bos_token"))
        self.eos_token_id = self._id_of(self.special_tokens.get("eos_token"))
        pad = self._id_of(self.special_tokens.get("pad_token"))
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        self.eos_token_ids: set[int] = set(extra_eos_ids or set())
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)
        self.add_bos_token = bool(settings.get("add_bos_token", False))
        self.add_eos_token = bool(settings.get("add_eos_token", False))
        self.clean_up_tokenization_spaces = bool(settings.get("clean_up_tokenization_spaces", False))

    def _id_of(self, text: str | None) -> int | None:
        if text is None:
            return None
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise ValueError(f"{self.name}: special token {text!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_directory(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception subclass on bad files
            raise ValueError(f"{path}: cannot load tokenizer ({error})") from error
        settings = _read_json(directory / "special_tokens_map.json")
        settings.update(_read_json(directory / "tokenizer_config.json"))
        template = _chat_template(directory, settings)
        eos_ids = _ids(_read_json(directory / "generation_config.json").get("eos_token_id"))
        eos_ids |= _ids(_read_json(directory / "config.json").get("eos_token_id"))
        return cls(tok, settings, template, eos_ids, name=str(directory))

    # -- encoding -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and self.eos_token_id is not None and ids[-1:] != [self.eos_token_id]:
                ids = ids + [self.eos_token_id]
        return ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # -- chat ---------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            fallback: str | None = None, **kwargs) -> str:
        """Render messages with the checkpoint's template (see chat_template.py)."""
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens, fallback=fallback, **kwargs,
        )


def _chat_template(directory: Path, settings: dict) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(directory / "chat_template.json").get("chat_template", settings.get("chat_template"))
    if isinstance(template, list):
        # Named templates: the "default" one is what a plain apply_chat_template uses.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{directory}: chat_template must be a string")
    return template
