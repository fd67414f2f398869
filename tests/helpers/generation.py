"""What the generation tests share: the prompts every path is fed, and transformers' own greedy
tokens for one prompt (the independent reference)."""


# Prompts the generation tests feed every path: short and long, an apostrophe, code, non-ASCII.
GENERATION_PROMPTS = [
    "The quick brown fox",
    "How do I bake bread? Mix flour, water",
    "I'm",
    "def add(a, b):\n    return",
    "Qu'est-ce que c'est? Ünïcödé text, emojis",
]


def hf_greedy_tokens(hf, tok, prompt: str, new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt`, cut at the first EOS."""
    import torch

    ids = torch.tensor([tok.encode(prompt, add_special_tokens=True)])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                      eos_token_id=sorted(tok.eos_token_ids), pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    end = next((i for i, t in enumerate(new) if t in tok.eos_token_ids), len(new))
    return new[:end]
