"""--compile: the compiled elementwise ops give the eager losses and gradients on a tiny model,
and a compiler failure falls back to eager with a warning (nothing half switched on).

Reference: the same model, batch and dropout seed run eagerly (the lean autograd Functions,
themselves tested against autograd of the plain formulas in tests/models/test_decoder_ops.py).
Compile cost is kept small: a 2-layer, 32-wide model, one dtype.
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

import lora_core.models.decoder as decoder
from helpers.tiny_models import tiny_causal_lm
from helpers.toy_lora import randomize_adapters
from lora_core.models import causal_lm_loss
from lora_core.train.sft.config import TrainConfig
from lora_core.train.sft.model_prep import prepare_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _loss_and_grads(model, params, ids):
    torch.manual_seed(7)  # the dropout seeds come from the global RNG
    loss = causal_lm_loss(model, ids, ids)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, params)]


@pytest.fixture
def eager_after():
    yield
    decoder.disable_compiled_elementwise()


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile on CPU needs a C++ compiler (the fallback is tested below)")
def test_compiled_matches_eager(eager_after):
    base = tiny_causal_lm(vocab=48, seed=3).train()
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    cfg = dict(rank=4, alpha=8, dropout=0.1, targets="attn+mlp")
    eager_model = copy.deepcopy(base)
    torch.manual_seed(0)  # LoRA A is drawn from the global RNG
    eager_params, _ = prepare_model(eager_model, TrainConfig.from_flat(**cfg))
    randomize_adapters(eager_model, seed=1)  # B != 0: every gradient depends on every op
    want_loss, want_grads = _loss_and_grads(eager_model, eager_params, ids)

    compiled_model = copy.deepcopy(base)
    torch.manual_seed(0)
    params, _ = prepare_model(compiled_model, TrainConfig.from_flat(**cfg, compile=True))
    randomize_adapters(compiled_model, seed=1)
    assert set(decoder._COMPILED) == {"rms_norm", "silu_mul", "rotary"}, "compile did not switch on"
    got_loss, got_grads = _loss_and_grads(compiled_model, params, ids)
    # float32 throughout; inductor reorders reductions (RMSNorm's mean), a few ulps per op.
    assert abs(got_loss.item() - want_loss.item()) < 1e-5 * max(1.0, abs(want_loss.item()))
    for g, w in zip(got_grads, want_grads):
        err = (g - w).abs().max().item()
        assert err < 1e-4 * max(1.0, w.abs().max().item()), f"grad {tuple(g.shape)}: max error {err:.3e}"


def test_compile_failure_falls_back_to_eager(monkeypatch, eager_after):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    model = tiny_causal_lm(vocab=48, seed=3).train()
    with pytest.warns(UserWarning, match=r"--compile: torch.compile failed.*no C\+\+ compiler.*runs eager"):
        params, _ = prepare_model(model, TrainConfig.from_flat(rank=4, targets="attn", compile=True))
    assert not decoder._COMPILED
    loss = causal_lm_loss(model, torch.randint(0, 48, (1, 5)), torch.randint(0, 48, (1, 5)))
    loss.backward()
    assert all(p.grad is not None for p in params)
