"""The torch path's LoRA dropout: the mask's distribution, its cost, and one mask per call.

References: the Bernoulli(p) law itself (keep rate, per-position rate, pairwise independence,
checked with binomial standard errors), the plain formula x * mask / (1 - p) in float64 with
the materialised mask, and a count of the random numbers drawn.
"""
from __future__ import annotations

import math

import pytest
import torch

from lora_core.kernels import lora_linear
from lora_core.kernels.dropout import dropped_positions, torch_keep_mask


def _within(count: float, n: int, prob: float, sigmas: float = 5.0) -> bool:
    """count is within `sigmas` binomial standard deviations of n * prob."""
    return abs(count - n * prob) <= sigmas * math.sqrt(n * prob * (1 - prob)) + 1


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_keep_rate_matches_p(p):
    numel = 200_000
    keep = torch_keep_mask(11, (400, 500), p, "cpu")
    kept = int(keep.sum())
    assert _within(kept, numel, 1 - p), f"p={p}: kept {kept} of {numel}, expected ~{numel * (1 - p):.0f}"


def test_every_position_drops_at_rate_p_and_independently():
    # Over many seeds: the first, a middle and the last position each drop with probability p
    # (a renewal process started wrong would bias position 0 or the tail), and two neighbours
    # drop together with probability p^2 (independence of adjacent trials).
    p, numel, seeds = 0.2, 37, 4000
    masks = torch.stack([~torch_keep_mask(s, (numel,), p, "cpu") for s in range(seeds)])  # dropped
    for pos in (0, 1, numel // 2, numel - 1):
        count = int(masks[:, pos].sum())
        assert _within(count, seeds, p), f"position {pos}: dropped {count}/{seeds}, expected ~{p * seeds:.0f}"
    both = int((masks[:, 10] & masks[:, 11]).sum())
    assert _within(both, seeds, p * p), f"neighbours dropped together {both}/{seeds}, expected ~{p * p * seeds:.0f}"


def test_positions_sorted_unique_in_range_and_seeded():
    pos = dropped_positions(3, 10_000, 0.5, "cpu")
    assert pos.dtype == torch.int32
    assert bool((pos[1:] > pos[:-1]).all()) and int(pos[0]) >= 0 and int(pos[-1]) < 10_000
    assert torch.equal(pos, dropped_positions(3, 10_000, 0.5, "cpu"))
    assert not torch.equal(pos, dropped_positions(4, 10_000, 0.5, "cpu"))


def test_scaling_is_one_over_keep_probability():
    # x = 1, A = 1/K: S[m] = (kept in row m) / (K (1 - p)) exactly, and its mean is 1 (unbiased).
    M, K, p, seed = 512, 64, 0.25, 5
    x = torch.ones(M, K, dtype=torch.float64)
    w = torch.zeros(1, K, dtype=torch.float64)
    a = torch.full((1, K), 1.0 / K, dtype=torch.float64)
    lb = torch.ones(1, 1, dtype=torch.float64)
    y = lora_linear(x, w, None, a, lb, 1.0, dropout_p=p, training=True, backend="torch", seed=seed)
    keep = torch_keep_mask(seed, (M, K), p, "cpu").double()
    want = keep.sum(1, keepdim=True) / (K * (1 - p))
    assert torch.allclose(y, want, rtol=1e-12, atol=1e-12), f"max error {(y - want).abs().max():.3e}"
    se = math.sqrt(p / ((1 - p) * M * K))  # standard error of the mean of mask / (1 - p)
    assert abs(float(y.mean()) - 1.0) < 5 * se, f"mean of drop(1) {float(y.mean()):.4f}, expected 1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_mask_forward_backward_low_precision(dtype):
    # Forward and backward against x * mask / (1 - p) in float64 with the materialised mask;
    # tolerance: a few roundings of the dtype times the |.|-bound of each output, plus fp32
    # accumulation over the reduction.
    p, seed, scale, M, K, N, r = 0.3, 9, 0.8, 48, 40, 24, 4
    gen = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x, w, b, a, lb = mk(M, K), mk(N, K), mk(N), mk(r, K), mk(N, r)
    leaves = [t.to(dtype).requires_grad_(True) for t in (x, a, lb)]
    y = lora_linear(leaves[0], w.to(dtype), b.to(dtype), leaves[1], leaves[2], scale,
                    dropout_p=p, training=True, backend="torch", seed=seed)
    dy = mk(M, N)
    got = (y, *torch.autograd.grad(y, leaves, dy.to(dtype)))

    keep = torch_keep_mask(seed, (M, K), p, "cpu").double() / (1 - p)
    ref = [t.to(dtype).double().requires_grad_(True) for t in (x, a, lb)]
    wd, bd = w.to(dtype).double(), b.to(dtype).double()
    want_y = ref[0] @ wd.T + bd + scale * ((ref[0] * keep) @ ref[1].T) @ ref[2].T
    want = (want_y, *torch.autograd.grad(want_y, ref, dy))
    absx = [t.abs() for t in ref]
    bound_y = absx[0] @ wd.abs().T + bd.abs() + scale * ((absx[0] * keep) @ absx[1].T) @ absx[2].T
    bound_dx = dy.abs() @ wd.abs() + scale * keep * ((dy.abs() @ absx[2]) @ absx[1])
    bound_da = scale * (dy.abs() @ absx[2]).T @ (absx[0] * keep)
    bound_db = scale * dy.abs().T @ ((absx[0] * keep) @ absx[1].T)
    eps = torch.finfo(dtype).eps
    for name, g, h, bound in zip(("y", "dx", "dA", "dB"), got, want, (bound_y, bound_dx, bound_da, bound_db)):
        err = (g.double() - h).abs()
        tol = 4 * (eps + torch.finfo(torch.float32).eps * math.sqrt(max(K, N))) * bound + 1e-30
        worst = tuple(int(i) for i in torch.unravel_index((err - tol).argmax(), err.shape))
        assert (err <= tol).all(), f"{dtype} {name}: max error {err.max():.3e} at {worst}"


def test_random_numbers_drawn_scale_with_p_not_with_x(monkeypatch):
    # The mask used to be a dense rand(M, K), drawn three times per layer per step (forward,
    # dA, dX): 3 M K numbers. Now about p M K, once, and the backward draws none.
    drawn = []
    real_rand = torch.rand

    def counting_rand(*args, **kwargs):
        out = real_rand(*args, **kwargs)
        drawn.append(out.numel())
        return out

    monkeypatch.setattr(torch, "rand", counting_rand)
    M, K, N, r, p = 256, 128, 32, 4, 0.05
    x = torch.randn(M, K, requires_grad=True)
    a, lb = torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True)
    y = lora_linear(x, torch.randn(N, K), None, a, lb, 1.0, dropout_p=p, training=True,
                    backend="torch", seed=1)
    forward_draws = sum(drawn)
    y.sum().backward()
    mean = p * M * K
    assert forward_draws <= mean + 6 * math.sqrt(mean) + 16, f"forward drew {forward_draws} numbers for {M * K} inputs"
    assert sum(drawn) == forward_draws, f"backward drew {sum(drawn) - forward_draws} more random numbers"


@pytest.mark.parametrize("M", [0, 1])
def test_dropout_on_empty_and_single_row(M):
    x = torch.randn(M, 6, dtype=torch.float64, requires_grad=True)
    w, a = torch.randn(5, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    lb = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    y = lora_linear(x, w, None, a, lb, 1.0, dropout_p=0.5, training=True, backend="torch", seed=4)
    y.sum().backward()
    keep = torch_keep_mask(4, (M, 6), 0.5, "cpu").double() / 0.5
    want = x.detach() @ w.T + ((x.detach() * keep) @ a.detach().T) @ lb.detach().T
    assert y.shape == (M, 5) and torch.allclose(y, want, rtol=1e-12, atol=1e-12)
    assert x.grad.shape == (M, 6) and a.grad.shape == (2, 6)
