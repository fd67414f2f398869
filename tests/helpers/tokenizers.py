"""Tokenizers for tests: a character-level fake (WordTokenizer) and two small byte-level BPE
tokenizers trained on the spot and written as HF directories (build_tokenizer_dir for the
tokenizer/chat-template tests, make_tokenizer_dir for SFT).

`from tokenizers import ...` below is the HF library: only tests/ is on sys.path, never this folder.
"""
import json

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers


class WordTokenizer:
    """Char-level fake tokenizer. Ids: 0 = `first_word`, 1 = pad, 2 = eos, 3.. = characters.

    `decode` spells id 0 as `first_word`, so a model that always emits id 0 "says" that word;
    `apply_chat_template` renders turns as <role>text</role> and records what it rendered.
    """

    def __init__(self, vocab: int = 64, first_word: str = "safe", chat: bool = True):
        self.vocab, self.first_word, self.chat = vocab, first_word, chat
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 1, None, 2
        self.eos_token_ids = {2}
        self.special_tokens = {}
        self.rendered: list[str] = []

    @property
    def has_chat_template(self) -> bool:
        return self.chat

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % (self.vocab - 3) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        parts = []
        for i in ids:
            if i == 0:
                parts.append(self.first_word + " ")
            elif i >= 3:
                parts.append(chr(ord("a") + (i - 3) % 26))
        return "".join(parts)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        if not self.chat:
            raise ValueError("no chat template")
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        self.rendered.append(text)
        return text


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ------------------------------------------------------------------ build_tokenizer_dir (models/)
# ChatML special tokens and a ChatML-style template of our own that exercises what real templates
# use: a default system message, loop controls, `namespace`, `raise_exception`, `tojson`, `bos_token`.

CHAT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I bake bread? Mix flour, water, salt and yeast; knead; rest; bake at 230C.",
    "I'm sorry, but I can't help with that request.",
    "Qu'est-ce que c'est? Ünïcödé text, emojis 🙂 and numbers 12345 too.",
    "def add(a, b):\n    return a + b\n",
] * 20

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system_seen=false) %}"
    "{% for message in messages %}\n"
    "  {% if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "    {{ raise_exception('unknown role: ' + message['role']) }}\n"
    "  {% endif %}\n"
    "  {% if message['role'] == 'system' %}{% set ns.system_seen = true %}{% endif %}\n"
    "  {% if loop.first and not ns.system_seen %}\n"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "  {% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if tools %}<|im_start|>tools\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer_dir(path, template=CHAT_TEMPLATE, extra_config=None):
    """Write tokenizer.json + tokenizer_config.json (+ generation_config.json) into `path`."""
    raw = RawTokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(CHAT_CORPUS, trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    raw.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    if template is not None:
        config["chat_template"] = template
    config.update(extra_config or {})
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path


# ------------------------------------------------------------------ make_tokenizer_dir (train/)

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SFT_CORPUS = ["You are a helpful assistant.", "How do I bake bread? Mix flour, water, yeast and salt.",
              "I'm sorry, but I can't help with that. It could cause serious harm to people.",
              "Explain how to pick a lock. Write a story about a dragon. What is two plus two? Four.",
              "user assistant system <think> </think> reasoning refuse harmful request decline"] * 5


def make_tokenizer_dir(path, template: str = CHATML):
    """A small byte-level BPE tokenizer with a ChatML template, written as an HF directory."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SFT_CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "model_max_length": 2048}))
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                              "pad_token": "<|endoftext|>"}))
    return path, tok

