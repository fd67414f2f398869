"""Triton backward of the LoRA linear (W frozen).

    dS = s * dY B                          (M, r) fp32        _ds_kernel
    dB = s * dY^T S                        (N, r)             _db_kernel
    dA = dS^T drop(X)                      (r, K)             _da_kernel
    dX = dY W + mask/(1-p) * (dS A)        (M, K)             _dx_kernel: one GEMM whose reduction
                                                               runs over N then the r extra columns
    db = sum_rows dY and dW = dY^T X (only if W requires grad) are left to torch by the caller.

drop(X) = mask * X / (1 - p) with mask = Philox(seed, m * K + k) >= p, regenerated here exactly
as in the forward's shrink kernel, so no (M, K) mask is ever stored. Every accumulator is fp32;
S and dS stay fp32 between kernels. dY is read three times (dS, dB, dX).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import block_r, dot_precision, gemm_blocks, upcast_flag


@triton.jit
def _ds_kernel(DY, LB, DS, M, N, R, stride_dym, stride_dyn, stride_bn, stride_br, stride_dsm,
               scale, UPCAST: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """dS[m-block, :] = s * sum_n dY[m-block, n] B[n, :]   (fp32 out, padded rank masked)."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)  # (BM, BN)
        b = tl.load(LB + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)  # (BN, BR)
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(dy, b, acc, input_precision=PREC)
    tl.store(DS + rm[:, None] * stride_dsm + rr[None, :], acc * scale,
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _db_kernel(DY, S, DB, M, N, R, stride_dym, stride_dyn, stride_sm, stride_dbn, stride_dbr,
               scale, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """dB[n-block, :] = s * sum_m dY[m, n-block]^T S[m, :]; dY upcast since S is fp32."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        dy_t = tl.load(DY + rn[:, None] * stride_dyn + rm[None, :] * stride_dym,
                       mask=(rn[:, None] < N) & (rm[None, :] < M), other=0.0)  # (BN, BM)
        s = tl.load(S + rm[:, None] * stride_sm + rr[None, :],
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)  # (BM, BR)
        acc = tl.dot(dy_t.to(tl.float32), s, acc, input_precision=PREC)
    tl.store(DB + rn[:, None] * stride_dbn + rr[None, :] * stride_dbr,
             (acc * scale).to(DB.dtype.element_ty), mask=(rn[:, None] < N) & (rr[None, :] < R))


@triton.jit
def _da_kernel(DS, X, DA, M, K, R, stride_dsm, stride_xm, stride_xk, stride_dar, stride_dak,
               seed, p, inv_keep, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dA[:, k-block] = sum_m dS[m, :]^T drop(X)[m, k-block]; X upcast since dS is fp32."""
    pid = tl.program_id(0)
    rk = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        ds_t = tl.load(DS + rr[:, None] + rm[None, :] * stride_dsm,
                       mask=(rr[:, None] < R) & (rm[None, :] < M), other=0.0)  # (BR, BM)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            offs = rm[:, None].to(tl.int64) * K + rk[None, :]
            x = tl.where(tl.rand(seed, offs) >= p, x, 0.0)
        acc = tl.dot(ds_t, x, acc, input_precision=PREC)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    tl.store(DA + rr[:, None] * stride_dar + rk[None, :] * stride_dak,
             acc.to(DA.dtype.element_ty), mask=(rr[:, None] < R) & (rk[None, :] < K))


@triton.jit
def _dx_kernel(DY, W, DS, LA, DX, M, N, K, R, stride_dym, stride_dyn, stride_wn, stride_wk,
               stride_dsm, stride_ar, stride_ak, stride_dxm, stride_dxk, seed, p, inv_keep,
               HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """dX tile = dS_tile A_tile (masked by dropout) + sum_n dY_tile W_tile: the reduction
    dimension of the base dX GEMM extended by the r adapter columns, one accumulator."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    group = pid // (GROUP_M * num_k)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_k)) % size_m
    pid_k = (pid % (GROUP_M * num_k)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)

    ds = tl.load(DS + rm[:, None] * stride_dsm + rr[None, :],
                 mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)  # (BM, BR) fp32
    a = tl.load(LA + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)  # (BR, BK)
    acc = tl.dot(ds, a.to(tl.float32), input_precision=PREC)  # (BM, BK)
    if HAS_DROPOUT:
        # drop() is elementwise on X, so the mask multiplies the adapter term only.
        offs = rm[:, None].to(tl.int64) * K + rk[None, :]
        acc = tl.where(tl.rand(seed, offs) >= p, acc * inv_keep, 0.0)

    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)  # (BM, BN)
        w = tl.load(W + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                    mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)  # (BN, BK)
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=PREC)
    tl.store(DX + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk,
             acc.to(DX.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


def _drop_args(dropout_p: float, seed: int | None) -> tuple[int, float, float]:
    return (int(seed) if dropout_p > 0.0 else 0, float(dropout_p), 1.0 / (1.0 - dropout_p))


def grad_s(dy: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """dS = s * dY B as fp32 (M, r)."""
    M, N = dy.shape
    R = lora_b.shape[1]
    ds = torch.zeros((M, R), device=dy.device, dtype=torch.float32)
    if M == 0:
        return ds
    br = block_r(R)
    bm, bn, _, warps = gemm_blocks(br)
    _ds_kernel[(triton.cdiv(M, bm),)](
        dy, lora_b, ds, M, N, R, dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1),
        ds.stride(0), float(scale), UPCAST=upcast_flag(dy.dtype), PREC=dot_precision(dy.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, num_warps=warps)
    return ds


def grad_b(dy: torch.Tensor, s_act: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """dB = s * dY^T S as (N, r) in `dtype`."""
    M, N = dy.shape
    R = s_act.shape[1]
    db = torch.zeros((N, R), device=dy.device, dtype=dtype)
    if M == 0 or N == 0:
        return db
    br = block_r(R)
    bm, bn, _, warps = gemm_blocks(br)
    _db_kernel[(triton.cdiv(N, bn),)](
        dy, s_act, db, M, N, R, dy.stride(0), dy.stride(1), s_act.stride(0),
        db.stride(0), db.stride(1), float(scale), PREC=dot_precision(dy.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, num_warps=warps)
    return db


def grad_a(ds: torch.Tensor, x2d: torch.Tensor, dropout_p: float, seed: int | None,
           dtype: torch.dtype) -> torch.Tensor:
    """dA = dS^T drop(X) as (r, K) in `dtype`, with the forward's dropout mask."""
    M, K = x2d.shape
    R = ds.shape[1]
    da = torch.zeros((R, K), device=x2d.device, dtype=dtype)
    if M == 0 or K == 0:
        return da
    br = block_r(R)
    bm, _, bk, warps = gemm_blocks(br)
    _da_kernel[(triton.cdiv(K, bk),)](
        ds, x2d, da, M, K, R, ds.stride(0), x2d.stride(0), x2d.stride(1),
        da.stride(0), da.stride(1), *_drop_args(dropout_p, seed),
        HAS_DROPOUT=dropout_p > 0.0, PREC=dot_precision(x2d.dtype),
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=warps)
    return da


def grad_x(dy: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_a: torch.Tensor,
           dropout_p: float, seed: int | None) -> torch.Tensor:
    """dX = dY W + mask/(1-p) * (dS A) as (M, K) in dY's dtype."""
    M, N = dy.shape
    K = weight.shape[1]
    R = lora_a.shape[0]
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    if M == 0 or K == 0:
        return dx
    br = block_r(R)
    bm, bn, bk, warps = gemm_blocks(br)
    grid = (triton.cdiv(M, bm) * triton.cdiv(K, bk),)
    _dx_kernel[grid](
        dy, weight, ds, lora_a, dx, M, N, K, R, dy.stride(0), dy.stride(1),
        weight.stride(0), weight.stride(1), ds.stride(0), lora_a.stride(0), lora_a.stride(1),
        dx.stride(0), dx.stride(1), *_drop_args(dropout_p, seed),
        HAS_DROPOUT=dropout_p > 0.0, UPCAST=upcast_flag(dy.dtype), PREC=dot_precision(dy.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, GROUP_M=8, num_warps=warps)
    return dx
