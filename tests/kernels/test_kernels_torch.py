"""The torch path of `lora_linear` (the CPU fast path): gradients, dropout, validation, dispatch.

References: torch.autograd.gradcheck in float64 (finite differences, independent of our
backward), and the plain unfused formula written out in float64.
"""
from __future__ import annotations

import math

import pytest
import torch

from lora_core.kernels import lora_linear
from lora_core.kernels.dispatch import ENV_VAR, resolve_backend
from lora_core.kernels.dropout import torch_keep_mask


def _inputs(lead, K, N, r, dtype=torch.float64, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    return mk(*lead, K), mk(N, K), (mk(N) if bias else None), mk(r, K), mk(N, r)


def _unfused(x, w, b, a, lb, scale, keep=None):
    """Reference formula; `keep` is the already scaled dropout multiplier (mask / (1 - p))."""
    xd = x if keep is None else x * keep
    y = x @ w.T + scale * (xd @ a.T) @ lb.T
    return y if b is None else y + b


def _max_err(got, want):
    err = (got.detach().double() - want.detach().double()).abs()
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.numel() else ()
    return err.max().item() if err.numel() else 0.0, idx


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_gradcheck_float64(bias, weight_grad):
    x, w, b, a, lb = _inputs((2, 3), 7, 5, 3, bias=bias)
    w.requires_grad_(weight_grad)
    fn = lambda x, w, b, a, lb: lora_linear(x, w, b, a, lb, 0.7, backend="torch")
    assert torch.autograd.gradcheck(fn, (x, w, b, a, lb))


def test_gradcheck_float64_with_dropout():
    # A fixed seed fixes the mask, so the function is deterministic and finite differences apply.
    x, w, b, a, lb = _inputs((6,), 9, 4, 2)
    fn = lambda x, w, b, a, lb: lora_linear(x, w, b, a, lb, 1.3, dropout_p=0.4, training=True,
                                            backend="torch", seed=123)
    assert torch.autograd.gradcheck(fn, (x, w, b, a, lb))


def test_dropout_same_mask_in_forward_and_backward():
    p, seed, scale = 0.3, 42, 0.9
    x, w, b, a, lb = _inputs((4, 10), 32, 12, 5)
    y = lora_linear(x, w, b, a, lb, scale, dropout_p=p, training=True, backend="torch", seed=seed)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, lb, b), dy)

    keep = torch_keep_mask(seed, (40, 32), p, x.device).reshape(4, 10, 32).double() / (1 - p)
    assert 0 < keep.count_nonzero() < keep.numel(), "the mask must drop some but not all entries"
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, lb, b)]
    want_y = _unfused(leaves[0], w.detach(), leaves[3], leaves[1], leaves[2], scale, keep)
    want = torch.autograd.grad(want_y, leaves, dy)
    for name, g, h in zip(("y", "dx", "dA", "dB", "dbias"), (y, *got), (want_y, *want)):
        err, idx = _max_err(g, h)
        assert err < 1e-12 * (1 + h.abs().max().item()), f"{name}: max error {err:.3e} at {idx}"


def test_dropout_seed_controls_mask_and_eval_disables_it():
    x, w, b, a, lb = _inputs((16,), 20, 8, 4)
    run = lambda **kw: lora_linear(x, w, b, a, lb, 1.0, backend="torch", **kw)
    y1 = run(dropout_p=0.5, training=True, seed=1)
    assert torch.equal(y1, run(dropout_p=0.5, training=True, seed=1))
    assert not torch.equal(y1, run(dropout_p=0.5, training=True, seed=2))
    torch.manual_seed(5)
    y_a = run(dropout_p=0.5, training=True)
    torch.manual_seed(5)
    assert torch.equal(y_a, run(dropout_p=0.5, training=True)), "global seed must fix the mask"
    assert torch.equal(run(dropout_p=0.5, training=False), run())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_matches_fp64(dtype):
    # Tolerance: output rounding plus one rounding of S (kept in the input dtype on this path)
    # scaled by the |.|-bound of each term, plus fp32 accumulation over K.
    K, N, r = 96, 40, 8
    x, w, b, a, lb = (t.detach() for t in _inputs((3, 11), K, N, r, dtype=dtype))
    y = lora_linear(x, w, b, a, lb, 0.5, backend="torch")
    d = lambda t: t.double()
    want = _unfused(d(x), d(w), d(b), d(a), d(lb), 0.5)
    bound = _unfused(d(x).abs(), d(w).abs(), d(b).abs(), d(a).abs(), d(lb).abs(), 0.5)
    eps = torch.finfo(dtype).eps
    tol = 3 * (eps + torch.finfo(torch.float32).eps * math.sqrt(K)) * bound
    err = (y.double() - want).abs()
    idx = tuple(int(i) for i in torch.unravel_index((err - tol).argmax(), err.shape))
    assert (err <= tol).all(), f"{dtype}: max error {err.max():.3e}; worst at {idx}"


def test_empty_batch_and_single_row():
    x, w, b, a, lb = _inputs((0,), 6, 5, 2)
    y = lora_linear(x, w, b, a, lb, 1.0, backend="torch")
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 6)
    for t in (a, lb, b):
        assert torch.equal(t.grad, torch.zeros_like(t))
    x1, w1, b1, a1, lb1 = _inputs((1,), 6, 5, 2)
    err, idx = _max_err(lora_linear(x1, w1, b1, a1, lb1, 2.0, backend="torch"),
                        _unfused(x1, w1, b1, a1, lb1, 2.0))
    assert err < 1e-12, f"M=1: max error {err:.3e} at {idx}"


def test_noncontiguous_and_mixed_adapter_dtype():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(13, 2 * 24, generator=gen)[:, ::2].requires_grad_(True)  # (13, 24) strided
    w = torch.randn(24, 17, generator=gen).t()  # (17, 24) column-major
    a = torch.randn(4, 24, generator=gen, dtype=torch.float64).requires_grad_(True)  # other dtype
    lb = torch.randn(17, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    y = lora_linear(x, w, None, a, lb, 0.25, backend="torch")
    assert y.dtype == torch.float32
    y.sum().backward()
    assert a.grad.dtype == torch.float64 and lb.grad.dtype == torch.float64
    want = _unfused(x.double(), w.double(), None, a, lb, 0.25)
    err, idx = _max_err(y, want)
    assert err < 1e-4, f"max error {err:.3e} at {idx}"


BAD_INPUTS = [
    (dict(x=(5, 7)), ValueError, r"x shape \(5, 7\).*weight shape \(4, 6\)"),
    (dict(a=(0, 6), b=(4, 0)), ValueError, r"rank must be >= 1.*\(0, 6\)"),
    (dict(a=(3, 5)), ValueError, r"lora_a must be \(r, K=6\).*\(3, 5\)"),
    (dict(b=(4, 2)), ValueError, r"lora_b must be \(N=4, r=3\).*\(4, 2\)"),
    (dict(bias=(5,)), ValueError, r"bias must be \(N=4,\).*\(5,\)"),
    (dict(w=(4, 6, 1)), ValueError, r"weight must be \(N, K\).*\(4, 6, 1\)"),
]


@pytest.mark.parametrize("shapes,exc,match", BAD_INPUTS)
def test_bad_shapes_are_named(shapes, exc, match):
    sz = dict(x=(2, 6), w=(4, 6), bias=(4,), a=(3, 6), b=(4, 3)) | shapes
    t = {k: torch.randn(*v) for k, v in sz.items()}
    with pytest.raises(exc, match=match):
        lora_linear(t["x"], t["w"], t["bias"], t["a"], t["b"], 1.0)


def test_bad_dtypes_devices_and_options():
    x, w, b, a, lb = (torch.randn(2, 6), torch.randn(4, 6), torch.randn(4),
                      torch.randn(3, 6), torch.randn(4, 3))
    with pytest.raises(TypeError, match=r"x has dtype torch.int64"):
        lora_linear(x.long(), w, b, a, lb, 1.0)
    with pytest.raises(TypeError, match=r"lora_a has dtype torch.int32"):
        lora_linear(x, w, b, a.int(), lb, 1.0)
    with pytest.raises(TypeError, match=r"x dtype torch.float16 differs from weight dtype torch.float32"):
        lora_linear(x.half(), w, b, a, lb, 1.0)
    with pytest.raises(ValueError, match=r"one device.*x=meta.*weight=cpu"):
        lora_linear(x.to("meta"), w, b, a, lb, 1.0)
    with pytest.raises(ValueError, match=r"dropout_p.*1.5"):
        lora_linear(x, w, b, a, lb, 1.0, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"backend.*'cuda'"):
        lora_linear(x, w, b, a, lb, 1.0, backend="cuda")


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    cpu = torch.zeros(1)
    assert resolve_backend(None, cpu) == "torch"
    assert resolve_backend("triton", cpu) == "triton"
    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_backend(None, cpu) == "triton"
    assert resolve_backend("torch", cpu) == "torch", "an explicit argument beats the env var"
    monkeypatch.setenv(ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=r"LORA_CORE_BACKEND='tpu'"):
        resolve_backend(None, cpu)


def test_frozen_weight_gets_no_gradient_and_no_dw_cost():
    x, w, b, a, lb = _inputs((5,), 8, 6, 2)
    w.requires_grad_(False)
    lora_linear(x, w, b, a, lb, 1.0, backend="torch").sum().backward()
    assert w.grad is None and a.grad is not None and x.grad is not None
