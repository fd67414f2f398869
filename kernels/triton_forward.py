"""Triton forward of the LoRA linear: a shrink kernel, then one fused GEMM.

    S = drop(X) A^T                         (M, r) fp32, r padded to >= 16 inside the kernel
    Y = S (s B)^T + X W^T + b               one accumulator, Y written once

The expand is the first step of the main GEMM's accumulator (equivalently [X | S] @ [W | sB]^T,
the reduction extended by r), so the adapter never costs an extra (M, N) read/write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import block_r, dot_precision, gemm_blocks, upcast_flag


@triton.jit
def _shrink_kernel(X, A, S, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak, stride_sm,
                   seed, p, inv_keep,
                   HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """S[m, :] = (mask * X[m, :]) A^T / (1 - p) for one BLOCK_M row block, fp32 accumulate.

    The keep-mask is Philox(seed, m * K + k) >= p; the backward regenerates it identically.
    Rows of A beyond R (the padding up to BLOCK_R) load as zeros and are not stored.
    """
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # (BM, BK)
        a = tl.load(A + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                    mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)  # (BK, BR) = A^T
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        if HAS_DROPOUT:
            offs = rm[:, None].to(tl.int64) * K + rk[None, :]
            x = tl.where(tl.rand(seed, offs) >= p, x, 0.0)
        acc = tl.dot(x, a, acc, input_precision=PREC)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    tl.store(S + rm[:, None] * stride_sm + rr[None, :], acc,
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _fused_forward_kernel(X, W, Bias, S, LB, Y, M, N, K, R,
                          stride_xm, stride_xk, stride_wn, stride_wk, stride_sm,
                          stride_bn, stride_br, stride_ym, stride_yn, scale,
                          HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """Y tile = S_tile (s B_tile)^T + sum_k X_tile W_tile^T + b, fp32 accumulator."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: consecutive programs share W column tiles, which stay in L2.
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)

    s_tile = tl.load(S + rm[:, None] * stride_sm + rr[None, :],
                     mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)  # (BM, BR) fp32
    b_t = tl.load(LB + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                  mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)  # (BR, BN) = B^T
    acc = tl.dot(s_tile, b_t.to(tl.float32) * scale, input_precision=PREC)  # (BM, BN)

    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # (BM, BK)
        w = tl.load(W + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                    mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)  # (BK, BN) = W^T
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PREC)

    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def shrink(x2d: torch.Tensor, lora_a: torch.Tensor, dropout_p: float, seed: int | None) -> torch.Tensor:
    """S = drop(x2d) lora_a^T as fp32 (M, r)."""
    M, K = x2d.shape
    R = lora_a.shape[0]
    s_act = torch.empty((M, R), device=x2d.device, dtype=torch.float32)
    if M == 0:
        return s_act
    br = block_r(R)
    bm, _, bk, warps = gemm_blocks(br)
    has_drop = dropout_p > 0.0
    _shrink_kernel[(triton.cdiv(M, bm),)](
        x2d, lora_a, s_act, M, K, R, x2d.stride(0), x2d.stride(1),
        lora_a.stride(0), lora_a.stride(1), s_act.stride(0),
        int(seed) if has_drop else 0, float(dropout_p), 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=has_drop, UPCAST=upcast_flag(x2d.dtype), PREC=dot_precision(x2d.dtype),
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=warps)
    return s_act


def fused_forward(x2d, weight, bias, lora_a, lora_b, scale: float, dropout_p: float,
                  seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch shrink + fused GEMM; returns (Y (M, N) in x's dtype, S (M, r) fp32)."""
    M, K = x2d.shape
    N = weight.shape[0]
    R = lora_a.shape[0]
    s_act = shrink(x2d, lora_a, dropout_p, seed)
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    if M == 0 or N == 0:
        return y, s_act
    br = block_r(R)
    bm, bn, bk, warps = gemm_blocks(br)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _fused_forward_kernel[grid](
        x2d, weight, bias if bias is not None else y, s_act, lora_b, y, M, N, K, R,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), s_act.stride(0),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1), float(scale),
        HAS_BIAS=bias is not None, UPCAST=upcast_flag(x2d.dtype), PREC=dot_precision(x2d.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, GROUP_M=8, num_warps=warps)
    return y, s_act
