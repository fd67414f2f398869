"""A toy model with HF Llama module names (model.layers.{i}.self_attn.q_proj, ...), for LoRA injection
and adapter I/O tests, with a fixed input batch and a way to move every lora_B away from zero."""
import torch
from torch import nn

from lora_core import lora_modules

D, F, V, L = 16, 24, 40, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, n, nn.Linear(D, D, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(D, F, bias=False)
        self.mlp.up_proj = nn.Linear(D, F, bias=False)
        self.mlp.down_proj = nn.Linear(F, D, bias=False)
        self.input_layernorm = nn.LayerNorm(D)

    def forward(self, h):
        a = self.self_attn
        x = self.input_layernorm(h)
        h = h + a.o_proj(torch.tanh(a.q_proj(x)) * a.k_proj(x) + a.v_proj(x))
        m = self.mlp
        return h + m.down_proj(nn.functional.silu(m.gate_proj(h)) * m.up_proj(h))


class Toy(nn.Module):
    """Llama-style names: model.embed_tokens, model.layers.{i}..., model.norm, lm_head (tied)."""

    def __init__(self, tie=True):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(V, D)
        self.model.layers = nn.ModuleList(Block() for _ in range(L))
        self.model.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.eval()  # LoRA dropout (0.05 by default) acts in train mode; comparisons want it off

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        for block in self.model.layers:
            h = block(h)
        return self.lm_head(self.model.norm(h))


def ids():
    return torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
