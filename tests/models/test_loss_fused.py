"""The fused lm_head + cross-entropy of models.loss against plain F.cross_entropy(lm_head(h)).

Reference: the unchunked, unfused computation in float64 (or the same dtype), autograd's own
gradients; plus a count of the head's (C, V) products to show the logits are built once.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lora_core.models.loss import causal_lm_loss


class _TinyLM(torch.nn.Module):
    """hidden_states = an embedding lookup (differentiable), lm_head a plain nn.Linear."""

    def __init__(self, vocab: int, dim: int, bias: bool, dtype, tied: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen, dtype=torch.float64).to(dtype))
        self.lm_head = torch.nn.Linear(dim, vocab, bias=bias, dtype=dtype)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(vocab, dim, generator=gen, dtype=torch.float64))
            if bias:
                self.lm_head.bias.copy_(torch.randn(vocab, generator=gen, dtype=torch.float64))
        if tied:
            self.lm_head.weight = self.embed

    def hidden_states(self, ids, attention_mask=None):
        return self.embed[ids] * 0.5  # (B, T, D)


def _plain(model, ids, labels, mask):
    logits = model.lm_head(model.hidden_states(ids)).to(torch.float32 if model.embed.dtype != torch.float64
                                                        else torch.float64)[:, :-1]
    target = labels[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def _batch(vocab: int, batch=3, steps=11):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, steps), generator=gen)
    labels = ids.clone()
    labels[0, 2:6] = -100
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # left padding
    return ids, labels, mask


CASES = [  # (dtype, head bias, head trains, tied)
    (torch.float64, True, True, False),
    (torch.float64, False, False, True),
    (torch.float32, True, False, False),
    (torch.float32, False, True, True),
]


@pytest.mark.parametrize("dtype,bias,head_trains,tied", CASES)
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_fused_loss_and_grads_match_plain(dtype, bias, head_trains, tied, chunk):
    vocab, dim = 37, 6
    model = _TinyLM(vocab, dim, bias, dtype, tied)
    for p in model.lm_head.parameters():
        p.requires_grad_(head_trains)
    if tied:
        model.embed.requires_grad_(True)  # the embedding (hidden states) trains; the head shares it
    ids, labels, mask = _batch(vocab)
    leaves = [p for p in model.parameters() if p.requires_grad]
    got = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=chunk)
    got_grads = torch.autograd.grad(got * 1.7, leaves)  # a non-unit incoming gradient
    want = _plain(model, ids, labels, mask)
    want_grads = torch.autograd.grad(want * 1.7, leaves)
    # float32: logsumexp order differs from cross_entropy's; a few ulps of the loss's magnitude.
    tol = 1e-12 if dtype == torch.float64 else 8 * torch.finfo(torch.float32).eps * math.log(vocab)
    assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item())), f"loss {got.item()} vs {want.item()}"
    for g, w in zip(got_grads, want_grads):
        err = (g - w).abs().max().item()
        scale = w.abs().max().item()
        assert err <= max(tol, 1e-14) * max(1.0, scale) * 4, \
            f"grad {tuple(g.shape)}: max error {err:.3e} (|max| {scale:.3e})"


def test_bf16_matches_fp64_reference_within_bf16_tolerance():
    vocab, dim = 64, 16
    model = _TinyLM(vocab, dim, False, torch.bfloat16)
    model.lm_head.weight.requires_grad_(False)
    ids, labels, mask = _batch(vocab)
    got = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=5)
    (g_embed,) = torch.autograd.grad(got, [model.embed])
    ref = _TinyLM(vocab, dim, False, torch.float64)
    with torch.no_grad():
        ref.embed.copy_(model.embed.double())
        ref.lm_head.weight.copy_(model.lm_head.weight.double())
    ref.lm_head.weight.requires_grad_(False)
    want = _plain(ref, ids, labels, mask)
    (w_embed,) = torch.autograd.grad(want, [ref.embed])
    eps = torch.finfo(torch.bfloat16).eps
    # bf16 logits (one rounding of |z| ~ sqrt(dim)) move the loss by about eps * |z|.
    assert abs(got.item() - want.item()) < 4 * eps * math.sqrt(dim) * 3, f"{got.item()} vs {want.item()}"
    err = (g_embed.double() - w_embed).abs().max().item()
    assert err < 8 * eps * w_embed.abs().max().item(), f"embed grad max error {err:.3e}"


class _HeadProducts(TorchDispatchMode):
    """Counts matrix products whose output has the vocabulary as its last dim (the logits)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.count = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "linear", "matmul") and isinstance(out, torch.Tensor) \
                and out.dim() == 2 and out.shape[-1] == self.vocab:
            self.count += 1
        return out


def test_logits_built_once_and_frozen_head_gets_no_gradient():
    vocab, dim, chunk = 41, 8, 4
    model = _TinyLM(vocab, dim, False, torch.float32, tied=False)
    model.lm_head.weight.requires_grad_(False)
    ids, labels, mask = _batch(vocab)
    n_rows = int(((labels[:, 1:] != -100) & (mask[:, 1:] != 0)).sum())
    with _HeadProducts(vocab) as counter:
        loss = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=chunk)
        loss.backward()
    assert counter.count == math.ceil(n_rows / chunk), \
        f"{counter.count} logit products for {math.ceil(n_rows / chunk)} chunks: logits recomputed"
    assert model.lm_head.weight.grad is None and model.embed.grad is not None


def test_no_grad_returns_the_same_loss():
    model = _TinyLM(29, 5, True, torch.float64)
    ids, labels, mask = _batch(29)
    with torch.no_grad():
        got = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=3)
        want = _plain(model, ids, labels, mask)
    assert not got.requires_grad and abs(got.item() - want.item()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("head_trains", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_fused_kl_matches_plain(dtype, head_trains, chunk):
    from lora_core.models.loss import fused_linear_kl, token_kl

    vocab, dim, rows = 31, 7, 10
    gen = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(dim, vocab, bias=True, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=gen))
        head.bias.copy_(torch.randn(vocab, generator=gen))
    head.requires_grad_(head_trains)
    h = torch.randn(rows, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    h_ref = h.detach() + 0.3 * torch.randn(rows, dim, generator=gen, dtype=torch.float64).to(dtype)
    leaves = [h] + ([head.weight, head.bias] if head_trains else [])
    got = fused_linear_kl(h, h_ref, head, chunk)
    got_grads = torch.autograd.grad(got * 0.6, leaves)
    with torch.no_grad():
        lp_ref = torch.log_softmax(head(h_ref), dim=-1)
    want = token_kl(lp_ref, torch.log_softmax(head(h), dim=-1)).sum()
    want_grads = torch.autograd.grad(want * 0.6, leaves)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item())), f"KL {got.item()} vs {want.item()}"
    for g, w in zip(got_grads, want_grads):
        err = (g - w).abs().max().item()
        assert err <= tol * max(1.0, w.abs().max().item()), f"grad {tuple(g.shape)}: max error {err:.3e}"


def test_retain_kl_builds_each_logit_chunk_once():
    # Base and adapted logits once per chunk each (2 products); checkpointing ran both again.
    from helpers.tiny_models import tiny_causal_lm
    from lora_core import LoRAConfig, inject_lora
    from lora_core.train.sft.losses import retain_kl

    model = tiny_causal_lm(vocab=40, seed=1).train()
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    chunk = 5
    rows = 2 * 6
    with _HeadProducts(40) as counter:
        kl = retain_kl(model, ids, ids, chunk_size=chunk)
        kl.backward()
    assert counter.count == 2 * math.ceil(rows / chunk), \
        f"{counter.count} logit products for {math.ceil(rows / chunk)} chunks"
