"""models.fp32_projections: bf16 weights, float32 projections, for CPUs without bf16 units.

The reference is F.linear on the same weights upcast whole (float64 for the tolerance's sake); the
chunked upcast must give the same numbers whatever the chunk, leave small calls and autograd alone,
and run a whole decoder to the same logits as the model upcast to float32.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_models import tiny_causal_lm

from lora_core.models.fp32_projections import fp32_projections, linear_fp32


@pytest.mark.parametrize("rows, out_features, chunk_rows", [(17, 123, 1), (64, 33, 7), (16, 1, 5)])
def test_chunked_upcast_equals_a_whole_fp32_projection(rows, out_features, chunk_rows):
    torch.manual_seed(0)
    x = torch.randn(2, rows, 40, dtype=torch.bfloat16)
    w = torch.randn(out_features, 40, dtype=torch.bfloat16)
    b = torch.randn(out_features, dtype=torch.bfloat16)
    got = linear_fp32(x, w, b, chunk_bytes=4 * 40 * chunk_rows)
    expected = F.linear(x.double(), w.double(), b.double())
    assert got.dtype == torch.bfloat16
    # fp32 accumulation over K=40, then one bf16 rounding of the output.
    tol = 2.0**-8 * expected.abs() + 1e-5 * float(expected.abs().max())
    assert bool(((got.double() - expected).abs() <= tol).all()), float((got.double() - expected).abs().max())


def test_small_calls_and_autograd_pass_through():
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad(), fp32_projections(min_rows=4):
        assert torch.equal(F.linear(x, w), torch.ops.aten.linear(x, w))  # 3 rows < 4: native bf16
    xg = x.clone().requires_grad_()
    with fp32_projections(min_rows=1):
        out = F.linear(xg, w)
    out.sum().backward()  # autograd went through the ordinary op
    assert xg.grad is not None


def test_a_bf16_decoder_gives_what_native_bf16_gives(monkeypatch):
    import lora_core.models.fp32_projections as mod

    calls = []
    monkeypatch.setattr(mod, "linear_fp32", lambda *a, **k: calls.append(1) or linear_fp32(*a, **k))
    # Native CPU bf16 matmuls also accumulate in fp32 and round the output once, so the mode only
    # changes speed: the logits agree with the native ones to bf16 rounding, and both stay as
    # close to the fp32 model on the same weights.
    model = tiny_causal_lm(vocab=64).to(torch.bfloat16)
    reference = tiny_causal_lm(vocab=64).to(torch.bfloat16).float()  # the same bf16 values, in fp32
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with fp32_projections(min_rows=1):
            got = model(ids).float()
        expected = reference(ids)
        native = model(ids).float()
    assert len(calls) == 2 * 7 + 1  # every projection and lm_head went through the upcast
    scale = float(expected.abs().max())
    assert float((got - native).abs().max()) <= 2.0**-7 * scale
    assert float((got - expected).abs().max()) <= 0.05 * scale
