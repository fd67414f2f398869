"""The Triton LoRA linear (forced on CPU under TRITON_INTERPRET=1) against an fp64 reference.

The reference runs in float64 on the very inputs the kernel saw (already rounded to the test
dtype), so any difference is the kernel's own rounding. Each element's tolerance is derived
from the dtype: 2 * (eps_dtype + eps_fp32 * sqrt(L)) * |.|-reference, where the |.|-reference
is the same expression evaluated on absolute values (a bound on every partial sum the kernel
forms), eps_dtype covers the final rounding to the output dtype and eps_fp32 * sqrt(L) the fp32
accumulation over the L = K + N + M + r terms along the longest chain of reductions.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_core.kernels import lora_linear
from lora_core.kernels.triton_common import interpreting
from lora_core.kernels.triton_dropout import triton_keep_mask

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()),
    reason="Triton needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps


def _reference(x, w, b, a, lb, scale, mask, p, dy):
    """fp64 output and gradients (dx, da, db, dbias, dw) of the LoRA linear, plus the same
    expressions on absolute values, used as per-element error scales."""
    keep = 1.0 if mask is None else mask.to(torch.float64) / (1.0 - p)

    def fwd_bwd(x, w, b, a, lb, dy, s):
        xd = x * keep
        sa = xd @ a.T  # (M, r)
        y = x @ w.T + s * sa @ lb.T + (0.0 if b is None else b)
        ds = s * dy @ lb  # (M, r)
        dx = dy @ w + (ds @ a) * keep
        return {"y": y, "dx": dx, "da": ds.T @ xd, "db": s * dy.T @ sa,
                "dbias": dy.sum(0), "dw": dy.T @ x}

    d = lambda t: None if t is None else t.detach().to(torch.float64)
    ab = lambda t: None if t is None else d(t).abs()
    exact = fwd_bwd(d(x), d(w), d(b), d(a), d(lb), d(dy), scale)
    bound = fwd_bwd(ab(x), ab(w), ab(b), ab(a), ab(lb), ab(dy), abs(scale))
    return exact, bound


def _assert_close(name, got, want, bound, dtype, length):
    # The absolute floor is fp32's smallest normal: fp32 intermediates flush below it.
    tol = 2.0 * (torch.finfo(dtype).eps + EPS32 * math.sqrt(length)) * bound + torch.finfo(torch.float32).tiny
    err = (got.detach().to(torch.float64) - want).abs()
    excess = err - tol
    if excess.numel() and excess.max() > 0:
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{name}: max error {err.max().item():.3e}; worst vs tolerance at index {idx}: "
            f"got {got.reshape(err.shape)[idx].item():.6e} want {want[idx].item():.6e} "
            f"err {err[idx].item():.3e} > tol {tol[idx].item():.3e} ({dtype})")


def _make(shape, dtype, gen, noncontig=False):
    """Random tensor of `shape`; on request non-contiguous: 2-D ones column-major (a transpose),
    others every other column of a wider tensor."""
    if not noncontig:
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)
    if len(shape) == 2:
        return torch.randn(shape[1], shape[0], generator=gen).to(device=DEVICE, dtype=dtype).t()
    big = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(device=DEVICE, dtype=dtype)
    return big[..., ::2]


def _check(lead, K, N, r, dtype, *, bias=True, scale=0.5, noncontig=False, p=0.0,
           weight_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = _make((*lead, K), dtype, gen, noncontig).requires_grad_(True)
    w = _make((N, K), dtype, gen, noncontig).requires_grad_(weight_grad)
    b = _make((N,), dtype, gen).requires_grad_(True) if bias else None
    a = _make((r, K), dtype, gen, noncontig).requires_grad_(True)
    lb = _make((N, r), dtype, gen, noncontig).requires_grad_(True)
    if noncontig:
        assert not (x.is_contiguous() or w.is_contiguous() or a.is_contiguous())

    y = lora_linear(x, w, b, a, lb, scale, dropout_p=p, training=p > 0, backend="triton", seed=7)
    assert y.shape == (*lead, N) and y.dtype == dtype
    dy = _make(tuple(y.shape), dtype, gen)
    y.backward(dy)

    M = math.prod(lead)
    mask = triton_keep_mask(7, M, K, p, DEVICE) if p > 0 else None
    want, bound = _reference(x.reshape(M, K), w, b, a, lb, scale, mask, p, dy.reshape(M, N))
    length = K + N + M + r
    _assert_close("y", y.reshape(M, N), want["y"], bound["y"], dtype, length)
    _assert_close("dx", x.grad.reshape(M, K), want["dx"], bound["dx"], dtype, length)
    _assert_close("dA", a.grad, want["da"], bound["da"], dtype, length)
    _assert_close("dB", lb.grad, want["db"], bound["db"], dtype, length)
    if bias:
        _assert_close("dbias", b.grad, want["dbias"], bound["dbias"], dtype, length)
    if weight_grad:
        _assert_close("dW", w.grad, want["dw"], bound["dw"], dtype, length)
    else:
        assert w.grad is None


# Odd sizes (1, 17, 123) in every role, every rank of the issue, and leading dims.
SHAPES = [((1,), 17, 123, 1), ((17,), 123, 1, 3), ((123,), 1, 17, 16), ((2, 9), 33, 40, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N,r", SHAPES)
def test_triton_matches_fp64_reference(lead, K, N, r, dtype):
    _check(lead, K, N, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("lead", [(3, 7), (21,)])
def test_triton_no_bias_noncontiguous(lead, dtype):
    _check(lead, 40, 29, 5, dtype, bias=False, noncontig=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_dropout_uses_same_mask_in_backward(dtype):
    _check((45,), 70, 33, 8, dtype, p=0.3)


def test_triton_scale_zero_is_the_base_layer():
    _check((20,), 31, 26, 4, torch.float32, scale=0.0)


def test_triton_weight_gradient_not_dropped():
    _check((2, 11), 24, 19, 2, torch.float32, weight_grad=True)


def test_triton_rank_above_64():
    _check((30,), 48, 36, 130, torch.float32)


def test_triton_empty_batch():
    w = torch.randn(9, 12, device=DEVICE)
    a = torch.randn(3, 12, device=DEVICE, requires_grad=True)
    lb = torch.randn(9, 3, device=DEVICE, requires_grad=True)
    x = torch.randn(0, 12, device=DEVICE, requires_grad=True)
    y = lora_linear(x, w, None, a, lb, 1.0, backend="triton")
    assert y.shape == (0, 9)
    y.sum().backward()
    assert x.grad.shape == (0, 12)
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(lb.grad, torch.zeros_like(lb))


def test_triton_dropout_mask_depends_on_seed_and_rate():
    m1 = triton_keep_mask(3, 40, 50, 0.25, DEVICE)
    assert torch.equal(m1, triton_keep_mask(3, 40, 50, 0.25, DEVICE))
    assert not torch.equal(m1, triton_keep_mask(4, 40, 50, 0.25, DEVICE))
    # 2000 Bernoulli(0.75) draws: the keep rate is within 5 standard deviations (0.048).
    assert abs(m1.float().mean().item() - 0.75) < 0.05


@settings(max_examples=6, deadline=None, derandomize=True)
@given(M=st.integers(1, 40), K=st.integers(1, 40), N=st.integers(1, 40), r=st.integers(1, 20),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       scale=st.one_of(st.just(0.0), st.floats(0.05, 2.0), st.floats(-2.0, -0.05)))
def test_triton_property_random_shapes(M, K, N, r, bias, dtype, scale):
    _check((M,), K, N, r, dtype, bias=bias, scale=scale, seed=M * 1000 + K)


def test_triton_stride_zero_grad_output():
    # y.sum() hands the backward an expanded dY whose strides are all 0.
    gen = torch.Generator().manual_seed(1)
    x = _make((3, 20, 30), torch.float32, gen).requires_grad_(True)
    w, b = _make((25, 30), torch.float32, gen), _make((25,), torch.float32, gen).requires_grad_(True)
    a = _make((4, 30), torch.float32, gen).requires_grad_(True)
    lb = _make((25, 4), torch.float32, gen).requires_grad_(True)
    lora_linear(x, w, b, a, lb, 0.5, backend="triton").sum().backward()
    dy = torch.ones(60, 25, device=DEVICE)
    want, bound = _reference(x.reshape(60, 30), w, b, a, lb, 0.5, None, 0.0, dy)
    length = 30 + 25 + 60 + 4
    for key, got in (("dx", x.grad.reshape(60, 30)), ("da", a.grad), ("db", lb.grad),
                     ("dbias", b.grad)):
        _assert_close(key, got, want[key], bound[key], torch.float32, length)
