"""Small-M linear layers for decode and tree verification, with the RMSNorm before them and the
residual / SwiGLU after them fused into the one launch.

    linear(x, W, bias, residual, norm_weight, eps)  y = rmsnorm(x) @ W.T (+ bias) (+ residual)
    linear_silu(x, W13, norm_weight, eps)            y = silu(g) * u, [g | u] = rmsnorm(x) @ W13.T

Why: at batch 1 a decoder layer's GEMMs have M = 1..64 rows (the tokens of a step or a tree), so
they are weight reads (0.66 MB at 576x576 bf16, 33.5 MB at 4096x4096) with almost no arithmetic.
cuBLAS spends 5-8 us on each of SmolLM2's (0.2-1.2 us of bytes at 3 TB/s on the H100) and the
norm and the activation are launches of their own; here a layer's 11 launches become 6
(linear+norm, rope/cache, attention, linear+residual, linear_silu+norm, linear+residual).

Two code paths, picked by `_config` from (M, N, K); neither autotunes, so both are safe to
capture in a CUDA graph:
  * GEMV (M <= 8): a program holds a (BLOCK_N, BLOCK_K) tile of W (16-byte loads along K) and
    applies it to ROWS = next_pow2(M) rows one after another, each exactly as a one-row program
    would (fp32 products accumulated elementwise, reduced over K once at the end): a row's
    output is bitwise the same whatever M is, and W leaves HBM once, so M = 8 reads what M = 1
    reads. BLOCK_N is as small as 1-2 rows of W so that N = 576 still gives ~288 programs for
    the 132 SMs. A grid over row groups extends it to any M (koala.model's exact mode).
  * MMA (M > 8): a (BLOCK_M >= 16, BLOCK_N) tile per program with tl.dot (fp32 accumulation).
With PDL (kernels/_common.py) the GEMV path loads its first K block of W (all of it for every
SmolLM2 layer), its bias and its norm weights before waiting on the previous kernel: W, bias and
norm_weight must therefore not be outputs of the launch just before. The MMA path waits first.
The RMSNorm prologue recomputes each row's rms over K in every program (x is a few KB, L2
resident): no extra launch and no normalised copy of x in memory. Numerics follow
koala.model.RMSNorm: fp32 math, the normalised x rounded to x's dtype, times the weight rounded
again (bit-identical to rms_norm_ref), then fed to the product in W's dtype. Bias and residual
are added to the fp32 accumulator and the sum rounded once, as cuBLAS addmm (beta=1) does.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (FLOATS, check_device, check_last_contiguous, check_tensor, interpreting,
                      next_pow2, pdl)
from ._tl import cast_rne, dot_acc, pdl_wait, sigmoid
from .rmsnorm import rms_norm_ref
from .swiglu import silu_mul_ref
from .tree_attention import SplitParts, _combine_splits

NUM_SMS_H100 = 132


@triton.jit
def _row_rstd(x_rows, m_mask, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """rsqrt(mean(x^2) + eps) of each of the tile's rows (BLOCK_M,), fp32."""
    rk = tl.arange(0, BLOCK_K)
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        xk = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
        xk = xk.to(tl.float32)
        ss += tl.sum(xk * xk, axis=1)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def _nw_tile(nw_ptr, kk, K, EVEN_K: tl.constexpr):
    """(BLOCK_K,) of the norm weight, fp32."""
    if EVEN_K:
        return tl.load(nw_ptr + kk).to(tl.float32)
    else:
        return tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)


@triton.jit
def _x_tile(x_rows, m_mask, kk, K, rstd, nw,
            HAS_NORM: tl.constexpr, EVEN_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) of x, normalised by rstd and the norm weight nw (BLOCK_K,) when
    HAS_NORM, as fp32 values of x's dtype."""
    if EVEN_K:
        xk = tl.load(x_rows + kk[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)
    else:
        xk = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
        xk = xk.to(tl.float32)
    if HAS_NORM:
        # as RMSNorm: round x * rstd to x's dtype, then round the product with the weight again
        xn = cast_rne(xk * rstd[:, None], x_rows.dtype.element_ty).to(tl.float32)
        xk = cast_rne(xn * nw[None, :], x_rows.dtype.element_ty).to(tl.float32)
    return xk


@triton.jit
def _w_tile(w_rows, n_mask, kk, K, EVEN_K: tl.constexpr, TRANS: tl.constexpr):
    """W[rn, kk] as (BLOCK_N, BLOCK_K), or (BLOCK_K, BLOCK_N) when TRANS (tl.dot's operand)."""
    if TRANS:
        if EVEN_K:
            w = tl.load(w_rows[None, :] + kk[:, None], mask=n_mask[None, :], other=0.0)
        else:
            w = tl.load(w_rows[None, :] + kk[:, None], mask=n_mask[None, :] & (kk[:, None] < K),
                        other=0.0)
    else:
        if EVEN_K:
            w = tl.load(w_rows[:, None] + kk[None, :], mask=n_mask[:, None], other=0.0)
        else:
            w = tl.load(w_rows[:, None] + kk[None, :], mask=n_mask[:, None] & (kk[None, :] < K),
                        other=0.0)
    return w


@triton.jit
def _mma_product(x_rows, m_mask, w_rows, n_mask, nw_ptr, rstd, K,
                 HAS_NORM: tl.constexpr, EVEN_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 = x_tile @ W[rn, :].T over all of K, with tl.dot."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        nw = _nw_tile(nw_ptr, kk, K, EVEN_K) if HAS_NORM else rstd
        a = _x_tile(x_rows, m_mask, kk, K, rstd, nw, HAS_NORM, EVEN_K)
        w = _w_tile(w_rows, n_mask, kk, K, EVEN_K, True)              # (BLOCK_K, BLOCK_N)
        # x is fed to the product in W's dtype, as F.linear does
        if DOT_PRECISION == "ieee":
            # fp32: each K block summed afresh, then added to the total. One FMA chain over all
            # of K (dot(a, b, acc)) had 5-8x cuBLAS's error at K = 1536-4100 on the H200. A plain
            # `acc + dot(a, b)` is folded back into dot(a, b, acc) by Triton's combine pass;
            # fma(part, 1, acc) is the same single rounding of part + acc and is not folded
            part = dot_acc(cast_rne(a, w.dtype), w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                           DOT_PRECISION, UPCAST)
            acc = tl.fma(part, 1.0, acc)
        else:
            acc = dot_acc(cast_rne(a, w.dtype), w, acc, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _parts_tile(p_ptr, lse_ptr, row, kk, K, cb, HD: tl.constexpr, dtype: tl.constexpr):
    """(1, BLOCK_K): columns kk of row `row` (= b * T + t) of a split attention's output, combined
    from its splits' partials (kernels/tree_attention.py, _combine_splits: the combine launch's
    arithmetic) and rounded to dtype as that launch stores it, as fp32. cb = (T, n_splits, and
    the partials' strides s_pb, s_ph, s_pt, s_ps, s_lb, s_lh, s_lt)."""
    T, n_splits, s_pb, s_ph, s_pt, s_ps, s_lb, s_lh, s_lt = cb
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    head = (kk // HD).to(tl.int64)
    d = kk % HD
    x = _combine_splits(p_ptr + b * s_pb + head * s_ph + t * s_pt + d,
                        lse_ptr + b * s_lb + head * s_lh + t * s_lt, kk < K, n_splits, s_ps)
    return cast_rne(x, dtype).to(tl.float32)[None, :]


@triton.jit
def _gemv_product(x_rows, m_mask, w_rows, n_mask, nw_ptr, rstd, K, w0, nw0, row, x_ptr, lse_ptr, cb,
                  HAS_NORM: tl.constexpr, EVEN_K: tl.constexpr, COMBINE: tl.constexpr,
                  HD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(1, BLOCK_N) fp32 = x_row @ W[rn, :].T over all of K (BLOCK_M == 1): elementwise fp32
    products, one reduction over K after the loop. w0 (BLOCK_N, BLOCK_K) and nw0 (BLOCK_K,) are
    the first K block's W and norm weight, loaded by the caller (before its PDL wait); the
    accumulation order is that of one loop from k0 = 0, whoever loaded the first block.
    COMBINE: x's row `row` is combined from a split attention's partials (x_ptr: o_part, lse_ptr,
    cb: _parts_tile's sizes and strides) instead of loaded."""
    rk = tl.arange(0, BLOCK_K)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if COMBINE:
        a = _parts_tile(x_ptr, lse_ptr, row, rk, K, cb, HD, w0.dtype)
    else:
        a = _x_tile(x_rows, m_mask, rk, K, rstd, nw0, HAS_NORM, EVEN_K)   # (1, BLOCK_K)
    acc2 += a * w0.to(tl.float32)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + rk
        if COMBINE:
            a = _parts_tile(x_ptr, lse_ptr, row, kk, K, cb, HD, w0.dtype)
        else:
            nw = _nw_tile(nw_ptr, kk, K, EVEN_K) if HAS_NORM else rstd
            a = _x_tile(x_rows, m_mask, kk, K, rstd, nw, HAS_NORM, EVEN_K)
        w = _w_tile(w_rows, n_mask, kk, K, EVEN_K, False)             # (BLOCK_N, BLOCK_K)
        acc2 += a * w.to(tl.float32)
    return tl.sum(acc2, axis=1)[None, :]                                # (1, BLOCK_N)


@triton.jit
def _w_tile3(w_rows3, n_mask3, kk3, K, EVEN_K: tl.constexpr):
    """W[rn, kk] as (1, BLOCK_N, BLOCK_K): loaded in 3-D, so that its layout is the product's
    (a 2-D load would be converted through shared memory, with barriers, on the GPU)."""
    if EVEN_K:
        return tl.load(w_rows3 + kk3, mask=n_mask3, other=0.0)
    else:
        return tl.load(w_rows3 + kk3, mask=n_mask3 & (kk3 < K), other=0.0)


@triton.jit
def _x_tile3(x_rows3, m_mask3, kk3, K, rstd3, nw_ptr, HAS_NORM: tl.constexpr, EVEN_K: tl.constexpr):
    """(BLOCK_M, 1, BLOCK_K) of x as fp32 values of x's dtype, normalised as _x_tile does (rstd3
    (BLOCK_M, 1, 1), the norm weight loaded here) when HAS_NORM."""
    if EVEN_K:
        xk = tl.load(x_rows3 + kk3, mask=m_mask3, other=0.0).to(tl.float32)
    else:
        xk = tl.load(x_rows3 + kk3, mask=m_mask3 & (kk3 < K), other=0.0).to(tl.float32)
    if HAS_NORM:
        if EVEN_K:
            nw = tl.load(nw_ptr + kk3).to(tl.float32)
        else:
            nw = tl.load(nw_ptr + kk3, mask=kk3 < K, other=0.0).to(tl.float32)
        xn = cast_rne(xk * rstd3, x_rows3.dtype.element_ty).to(tl.float32)
        xk = cast_rne(xn * nw, x_rows3.dtype.element_ty).to(tl.float32)
    return xk


@triton.jit
def _vec_product(x_rows3, m_mask3, w_rows3, wu_rows3, n_mask3, nw_ptr, K, eps, w0, wu0,
                 HAS_NORM: tl.constexpr, SILU: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 = x_tile @ W[rn, :].T for all BLOCK_M rows at once, and the up
    product when SILU: each K block's fp32 products as one (BLOCK_M, BLOCK_N, BLOCK_K) tile,
    reduced over K, the blocks summed in order from k0 = 0. Every row goes through the same lanes
    of the same tile shape, so its bits depend on BLOCK_M, BLOCK_N and BLOCK_K only, never on M
    or on which of the tile's rows it is. The normalised x block is made once for gate and up.
    Everything is 3-D ((BLOCK_M, 1, BLOCK_K) rows of x, (1, BLOCK_N, BLOCK_K) tiles of W) so the
    broadcast product needs no layout conversion. w0 / wu0: the first K block, loaded by the
    caller (before its PDL wait)."""
    kk3 = tl.arange(0, BLOCK_K)[None, None, :]
    if HAS_NORM:
        ss = tl.zeros((BLOCK_M, 1, 1), dtype=tl.float32)          # the rows' sums of squares
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_rows3 + k0 + kk3, mask=m_mask3 & (k0 + kk3 < K), other=0.0).to(tl.float32)
            ss += tl.sum(xk * xk, axis=2, keep_dims=True)
        rstd3 = tl.rsqrt(ss / K + eps)
    else:
        rstd3 = tl.zeros((1, 1, 1), dtype=tl.float32)
    a = _x_tile3(x_rows3, m_mask3, kk3, K, rstd3, nw_ptr, HAS_NORM, EVEN_K)        # (BM, 1, BK)
    acc = tl.sum(a * w0.to(tl.float32), axis=2)                                    # (BM, BN)
    if SILU:
        up = tl.sum(a * wu0.to(tl.float32), axis=2)
    else:
        up = acc
    for k0 in range(BLOCK_K, K, BLOCK_K):
        a = _x_tile3(x_rows3, m_mask3, k0 + kk3, K, rstd3, nw_ptr, HAS_NORM, EVEN_K)
        acc += tl.sum(a * _w_tile3(w_rows3, n_mask3, k0 + kk3, K, EVEN_K).to(tl.float32), axis=2)
        if SILU:
            up += tl.sum(a * _w_tile3(wu_rows3, n_mask3, k0 + kk3, K, EVEN_K).to(tl.float32), axis=2)
    return acc, up


@triton.jit
def _epilogue(acc, up, bias, rm, m_mask, rn, n_mask, r_ptr, y_ptr, stride_rm, stride_ym,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU: tl.constexpr):
    """Bias, SwiGLU (up: the up product, unused unless SILU), residual, one rounding, store of
    the (BLOCK_M, BLOCK_N) fp32 acc at rows rm, columns rn."""
    if HAS_BIAS:
        acc += bias[None, :]
    if SILU:
        # gate and up are rounded to the output dtype first, as the unfused w13 GEMM (whose
        # output is x's dtype) then silu_mul do
        g = cast_rne(acc, y_ptr.dtype.element_ty).to(tl.float32)
        u = cast_rne(up, y_ptr.dtype.element_ty).to(tl.float32)
        acc = g * sigmoid(g) * u
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + rm.to(tl.int64)[:, None] * stride_rm + rn[None, :],
                       mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :],
             cast_rne(acc, y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, wu_ptr, b_ptr, r_ptr, nw_ptr, y_ptr,            # pointers (wu: up rows, SILU)
    lse_ptr,                                                      # COMBINE: the splits' lse (x: o_part)
    M, N, K, eps,                                                 # sizes (N: output columns)
    stride_xm, stride_wn, stride_rm, stride_ym,                   # strides (last dims unit)
    T, n_splits, s_pb, s_ph, s_pt, s_ps, s_lb, s_lh, s_lt,        # COMBINE: rows and partials
    HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,  # constexpr
    SILU: tl.constexpr, USE_DOT: tl.constexpr, VEC: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
    COMBINE: tl.constexpr, HD: tl.constexpr, USE_GDC: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w_rows = w_ptr + rn.to(tl.int64) * stride_wn                       # (BLOCK_N,)
    # wu_ptr = W's up rows [N, 2N) (a host view: no int32 N * stride overflow)
    wu_rows = wu_ptr + rn.to(tl.int64) * stride_wn
    if USE_DOT:
        pdl_wait(USE_GDC)              # before any read of activations or any store
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm          # (BLOCK_M, 1)
        if HAS_NORM:
            rstd = _row_rstd(x_rows, m_mask, K, eps, BLOCK_M, BLOCK_K)
        else:
            rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = _mma_product(x_rows, m_mask, w_rows, n_mask, nw_ptr, rstd, K, HAS_NORM, EVEN_K,
                           DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        if SILU:
            up = _mma_product(x_rows, m_mask, wu_rows, n_mask, nw_ptr, rstd, K, HAS_NORM, EVEN_K,
                              DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            up = acc
        if HAS_BIAS:
            bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        _epilogue(acc, up, bias, rm, m_mask, rn, n_mask, r_ptr, y_ptr, stride_rm, stride_ym,
                  HAS_BIAS, HAS_RESIDUAL, SILU)
    elif VEC:
        # all BLOCK_M rows as one tile (_vec_product): the first K block of W and the bias
        # before the PDL wait as in the GEMV (the norm weight is read with x, after it), then
        # the tile's rows' norms and products together
        kk3 = tl.arange(0, BLOCK_K)[None, None, :]
        n_mask3 = n_mask[None, :, None]
        w_rows3 = w_rows[None, :, None]                                  # (1, BLOCK_N, 1)
        wu_rows3 = wu_rows[None, :, None]
        w0 = _w_tile3(w_rows3, n_mask3, kk3, K, EVEN_K)                  # (1, BLOCK_N, BLOCK_K)
        wu0 = _w_tile3(wu_rows3, n_mask3, kk3, K, EVEN_K) if SILU else w0
        if HAS_BIAS:
            bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        pdl_wait(USE_GDC)              # before any read of activations or any store
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        x_rows3 = x_ptr + rm.to(tl.int64)[:, None, None] * stride_xm    # (BLOCK_M, 1, 1)
        acc, up = _vec_product(x_rows3, m_mask[:, None, None], w_rows3, wu_rows3, n_mask3, nw_ptr,
                               K, eps, w0, wu0, HAS_NORM, SILU, EVEN_K, BLOCK_M, BLOCK_K)
        _epilogue(acc, up, bias, rm, m_mask, rn, n_mask, r_ptr, y_ptr, stride_rm, stride_ym,
                  HAS_BIAS, HAS_RESIDUAL, SILU)
    else:
        # GEMV: the constants of the first K block (all of this program's W when BLOCK_K >= K,
        # as for every SmolLM2 layer) are loaded once, before the PDL wait, so their DRAM
        # latency overlaps the previous kernel's tail; then they serve each of the program's
        # ROWS rows. Done with USE_GDC off too: same code, same bits.
        rk = tl.arange(0, BLOCK_K)
        w0 = _w_tile(w_rows, n_mask, rk, K, EVEN_K, False)               # (BLOCK_N, BLOCK_K)
        wu0 = _w_tile(wu_rows, n_mask, rk, K, EVEN_K, False) if SILU else w0
        nw0 = _nw_tile(nw_ptr, rk, K, EVEN_K) if HAS_NORM else rk.to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        pdl_wait(USE_GDC)              # before any read of activations or any store
        # One row after another, each by the same code as a program of ROWS=1 (and the same
        # tiles, so the same reduction order): a row's output does not depend on ROWS or M,
        # which exact mode (koala.model._Fast) relies on. Only one accumulator is live at a
        # time; K blocks after the first are re-read per row (from L1/L2).
        for r in tl.static_range(ROWS):
            row = tl.program_id(1) * ROWS + r
            if row < M:
                rm = row + tl.arange(0, 1)                               # (1,)
                m_mask = rm < M
                # x's row pointer with no alignment the compiler could prove from ROWS: it sizes
                # the x loads' vectors from it, and the vector width orders the sum of squares.
                # pid * ROWS is a multiple of ROWS, so at a row stride that is not a multiple of
                # 16 bytes' worth (K = 4100) a 1-, 2- and 8-row program loaded x in 1-, 2- and
                # 4-wide vectors and their fp32 rstd differed by an ulp on the H200. The select
                # (a no-op: rm < M here) leaves rm only what is common to all ROWS.
                x_rows = x_ptr + tl.where(m_mask, rm, 1).to(tl.int64)[:, None] * stride_xm
                if HAS_NORM:
                    rstd = _row_rstd(x_rows, m_mask, K, eps, 1, BLOCK_K)
                else:
                    rstd = tl.zeros((1,), dtype=tl.float32)
                cb = (T, n_splits, s_pb, s_ph, s_pt, s_ps, s_lb, s_lh, s_lt)
                acc = _gemv_product(x_rows, m_mask, w_rows, n_mask, nw_ptr, rstd, K, w0, nw0,
                                    row, x_ptr, lse_ptr, cb, HAS_NORM, EVEN_K, COMBINE, HD,
                                    BLOCK_N, BLOCK_K)
                if SILU:
                    up = _gemv_product(x_rows, m_mask, wu_rows, n_mask, nw_ptr, rstd, K, wu0, nw0,
                                       row, x_ptr, lse_ptr, cb, HAS_NORM, EVEN_K, COMBINE, HD,
                                       BLOCK_N, BLOCK_K)
                else:
                    up = acc
                _epilogue(acc, up, bias, rm, m_mask, rn, n_mask, r_ptr, y_ptr, stride_rm,
                          stride_ym, HAS_BIAS, HAS_RESIDUAL, SILU)


class LinearConfig(NamedTuple):
    """Launch parameters; `_config` picks them, the benchmark may pass others to compare."""
    use_dot: bool
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 3
    ROWS: int = 1          # GEMV: rows per program, each W tile applied to all of them (1-8)
    vec: bool = False      # the row-tile path: BLOCK_M rows as one (BLOCK_M, BLOCK_N, BLOCK_K) tile


GEMV_MAX_M = 8             # _config's GEMV path takes M <= this, in one program row of ROWS


def _config(M: int, N: int, K: int) -> LinearConfig:
    """Fixed tile sizes as a function of the shape (no autotuning: graph-capture safe).
    N: output columns (I for linear_silu, whose programs read a gate and an up tile each).
    Chosen from the H100's shape (132 SMs, ~3 MB in flight to saturate HBM), not swept;
    bench/linear_bench.py times them against cuBLAS (bench/results/linear.json, f13d795: the GEMV
    wins up to M = 4 and loses from M = 8, and the 49152-row LM head loses from M = 2, which is
    where koala.model stops using it outside exact mode)."""
    target = 2 * NUM_SMS_H100                 # programs: 2 per SM so one waits while one loads
    if M <= GEMV_MAX_M:
        # GEMV: all M rows in one program row (ROWS = next_pow2(M)), so W is read once whatever
        # M is. BLOCK_N rows of W per program, as few as keep >= 2 programs per SM (576 -> 2,
        # 1728 -> 4, 4096 -> 8, 49152 -> 16), and BLOCK_K so that a tile is ~4096 elements:
        # 32 per thread (four 16-byte loads in flight) at 4 warps. The tiles depend on N and K
        # only, never on M: a row's output is then bitwise the same at every M <= 8 (and in
        # koala.model's exact mode, which reuses this config over groups of 8 rows).
        bn = 1
        while bn < 16 and triton.cdiv(N, 2 * bn) >= target:
            bn *= 2
        bk = max(32, min(next_pow2(K), 4096 // bn))
        return LinearConfig(False, 1, bn, bk, 4, 1, min(GEMV_MAX_M, next_pow2(M)))
    # MMA: tl.dot needs >= 16 rows; one M tile covers M <= 64
    bm = min(64, max(16, next_pow2(M)))
    mt = triton.cdiv(M, bm)
    bn = 16
    while bn < 64 and triton.cdiv(N, 2 * bn) * mt >= target:
        bn *= 2
    # long K steps: few loop trips (K=576 in 3 at BLOCK_K=256), ~8 KB of W per stage
    bk = max(32, min(next_pow2(K), 256 if bm <= 16 else 128, 4096 // bn))
    return LinearConfig(True, bm, bn, bk, 4, 3)


VEC_PRODUCTS = 8192        # fp32 products per K block of a row tile: 64 a thread at 4 warps


def vec_config(N: int, K: int, rows: int, silu: bool = False) -> LinearConfig:
    """The row-tile path's tiles for a row tile of `rows` rows (BLOCK_M; koala.model's exact
    mode uses one tile for every M, so a row's bits do not depend on M): BLOCK_N as _config's
    GEMV (>= 2 programs per SM), BLOCK_K as long as VEC_PRODUCTS allows (half for SwiGLU, whose
    programs hold a gate and an up tile)."""
    if rows not in (1, 2, 4, 8, 16):
        raise ValueError(f"row tile of {rows} rows: it must be 1, 2, 4, 8 or 16")
    target = 2 * NUM_SMS_H100
    bn = 1
    while bn < 16 and triton.cdiv(N, 2 * bn) >= target:
        bn *= 2
    budget = VEC_PRODUCTS // (2 if silu else 1)
    bk = max(32, min(next_pow2(K), budget // (rows * bn)))
    return LinearConfig(False, rows, bn, bk, 4, 1, 1, True)


def _check(x, W, norm_weight, name_w="W"):
    check_tensor("x", x, dtypes=FLOATS)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim, got shape {tuple(x.shape)}")
    K = x.shape[-1]
    check_tensor(name_w, W, ndim=2, dtypes=(x.dtype,), shape=(None, K))
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, ndim=1, dtypes=(x.dtype,), shape=(K,))
    return K


def _launch(x2, W, bias, res2, norm_weight, eps, y, N, silu, config, parts=None):
    """Launch; returns Triton's compiled-kernel handle (n_regs, n_spills: bench/linear_waves.py),
    or None when there is nothing to compute. parts: x's rows are combined from these SplitParts
    (x2 then only gives the shape (M, K)); the GEMV path only."""
    M, K = x2.shape
    cfg = config or _config(M, N, K)
    if parts is not None and (cfg.use_dot or cfg.vec):
        raise ValueError(f"config {cfg}: combining a split attention's partials is the GEMV path's "
                         "(use_dot=False, vec=False)")
    if not cfg.use_dot and not cfg.vec and (cfg.BLOCK_M != 1 or cfg.ROWS not in (1, 2, 4, 8)):
        raise ValueError(f"config {cfg}: the GEMV path takes BLOCK_M=1 and ROWS in 1, 2, 4, 8")
    if cfg.use_dot and cfg.ROWS != 1:
        raise ValueError(f"config {cfg}: ROWS is the GEMV path's (the MMA path takes ROWS=1)")
    if cfg.vec and (cfg.use_dot or cfg.ROWS != 1):
        raise ValueError(f"config {cfg}: the row-tile path (vec) takes use_dot=False and ROWS=1")
    if M == 0 or N == 0:
        return None
    if K == 0:
        raise ValueError("K=0: empty reduction")
    grid = (triton.cdiv(N, cfg.BLOCK_N),
            triton.cdiv(M, cfg.BLOCK_M if cfg.use_dot or cfg.vec else cfg.ROWS))
    dummy = y                                            # pointer for absent operands (never read)
    if parts is None:
        comb = (x2, dummy, x2.stride(0), 1, 1) + (0,) * 7    # T, n_splits, the 7 strides: unused
        hd = 1
    else:
        B, h, T, _, hd = parts.o_part.shape
        comb = (parts.o_part, parts.lse, 0, T, parts.n_splits, *parts.o_part.stride()[:4],
                *parts.lse.stride()[:3])
    return _linear_kernel[grid](
        comb[0], W, W[N:] if silu else W, dummy if bias is None else bias, dummy if res2 is None else res2,
        dummy if norm_weight is None else norm_weight, y, comb[1],
        M, N, K, float(eps),
        comb[2], W.stride(0), 0 if res2 is None else res2.stride(0), y.stride(0), *comb[3:],
        HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=res2 is not None, SILU=silu, USE_DOT=cfg.use_dot, VEC=cfg.vec,
        EVEN_K=K % cfg.BLOCK_K == 0,
        # fp32 inputs: exact fp32 products, not TF32 (which would be 10x the reference's error)
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", UPCAST=interpreting(),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, ROWS=cfg.ROWS,
        COMBINE=parts is not None, HD=hd, USE_GDC=pdl(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl(),
        # fp32: no contraction of a product and a sum into one FMA, which the compiler decides
        # per instance (a GEMV row of a ROWS=8 program and the same row alone got different
        # bits at K = 4100 on the H200); bf16 products are exact in fp32, so FMA changes nothing
        enable_fp_fusion=x2.dtype != torch.float32,
    )


def linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
           eps: float = 1e-5, *, config: LinearConfig | None = None) -> torch.Tensor:
    """y = rmsnorm(x, norm_weight, eps) @ W.T (+ bias) (+ residual), one launch.

    x (..., K): rows flattened to M = x.numel() // K (a view when the rows are evenly strided);
    any M, tuned for M <= 64. W (N, K) in nn.Linear layout; bias (N,), norm_weight (K,) and
    residual (..., N) (x's leading dims) all of x's dtype; every last dim unit stride, row strides
    free (W may be a row slice of a fused weight). Returns (..., N) in x's dtype, fp32
    accumulation. norm_weight=None: no norm. config: override the tile choice (benchmarks)."""
    K = _check(x, W, norm_weight)
    N = W.shape[0]
    named = [("x", x), ("W", W)]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), shape=(N,))
        named.append(("bias", bias))
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,))
        if tuple(residual.shape) != tuple(x.shape[:-1]) + (N,):
            raise ValueError(f"residual has shape {tuple(residual.shape)}, expected "
                             f"{tuple(x.shape[:-1]) + (N,)}")
        named.append(("residual", residual))
    if norm_weight is not None:
        named.append(("norm_weight", norm_weight))
    check_device(*named)
    for n, t in named:
        check_last_contiguous(n, t)
    x2 = x.reshape(-1, K)                                              # (M, K)
    res2 = None if residual is None else residual.reshape(-1, N)       # (M, N)
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    _launch(x2, W, bias, res2, norm_weight, eps, y, N, False, config)
    return y.view(*x.shape[:-1], N)


def linear_combine(parts: SplitParts, W: torch.Tensor, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, *,
                   config: LinearConfig | None = None) -> torch.Tensor:
    """y = combine(parts) @ W.T (+ bias) (+ residual), one launch: the output projection of a
    split attention whose combine was deferred (kernels.tree_attention.tree_attention(...,
    defer_combine=True)). Each GEMV program builds its x row from the splits' partials in its
    prologue with the combine launch's code, so y has the bits of tree_attention (combined),
    then linear(attn.transpose(1, 2).reshape(B, T, h * hd), W, bias, residual), one launch fewer.

    parts.o_part (B, h, T, n_splits, hd), parts.lse (B, h, T, n_splits), W (N, h * hd) of
    parts.dtype; bias (N,), residual (B, T, N). Returns (B, T, N) in parts.dtype. config: a GEMV
    configuration (use_dot=False, vec=False); default _config's for min(B * T, 8) rows. Every
    program of a row combines the whole row (n_splits x h*hd fp32 read from L2), so it pays where
    the saved launch costs more than that: few rows, few splits."""
    if not isinstance(parts, SplitParts):
        raise TypeError(f"parts must be the SplitParts of tree_attention(..., defer_combine=True), "
                        f"got {type(parts).__name__}")
    op, lse = parts.o_part, parts.lse
    check_tensor("parts.o_part", op, ndim=5, dtypes=(torch.float32,))
    B, h, T, S, hd = op.shape
    check_tensor("parts.lse", lse, ndim=4, dtypes=(torch.float32,), shape=(B, h, T, S))
    if not 1 <= parts.n_splits <= S:
        raise ValueError(f"parts.n_splits={parts.n_splits}: o_part holds {S} splits")
    K = h * hd
    check_tensor("W", W, ndim=2, dtypes=(parts.dtype,), shape=(None, K))
    N = W.shape[0]
    named = [("parts.o_part", op), ("parts.lse", lse), ("W", W)]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(parts.dtype,), shape=(N,))
        named.append(("bias", bias))
    if residual is not None:
        check_tensor("residual", residual, ndim=3, dtypes=(parts.dtype,), shape=(B, T, N))
        named.append(("residual", residual))
    dev = check_device(*named)
    for n, t in named:
        check_last_contiguous(n, t)
    M = B * T
    res2 = None if residual is None else residual.reshape(M, N)
    y = torch.empty((M, N), dtype=parts.dtype, device=dev)
    shape = torch.empty((M, K), dtype=parts.dtype, device="meta")   # x's shape, never read
    _launch(shape, W, bias, res2, None, 0.0, y, N, False,
            config or _config(min(max(M, 1), GEMV_MAX_M), N, K), parts)
    return y.view(B, T, N)


def linear_silu(x: torch.Tensor, W13: torch.Tensor, norm_weight: torch.Tensor | None = None,
                eps: float = 1e-5, *, config: LinearConfig | None = None) -> torch.Tensor:
    """y = silu(g) * u where [g | u] = rmsnorm(x, norm_weight, eps) @ W13.T, one launch.

    x (..., K); W13 (2I, K): gate rows [0, I) then up rows [I, 2I) (FeedForward.w13's layout);
    norm_weight (K,) or None; all of x's dtype, last dims unit stride. Returns (..., I) in x's
    dtype. Each program computes matching gate and up tiles, so the (M, 2I) product never
    reaches memory."""
    K = _check(x, W13, norm_weight, "W13")
    if W13.shape[0] % 2:
        raise ValueError(f"W13 has shape {tuple(W13.shape)}: the first dim must be 2*I (gate | up)")
    I = W13.shape[0] // 2
    named = [("x", x), ("W13", W13)] + ([("norm_weight", norm_weight)] if norm_weight is not None else [])
    check_device(*named)
    for n, t in named:
        check_last_contiguous(n, t)
    x2 = x.reshape(-1, K)
    y = torch.empty((x2.shape[0], I), dtype=x.dtype, device=x.device)
    _launch(x2, W13, None, None, norm_weight, eps, y, I, True, config)
    return y.view(*x.shape[:-1], I)


def linear_ref(x, W, bias=None, residual=None, norm_weight=None, eps: float = 1e-5):
    """The unfused ops koala.model runs: RMSNorm, F.linear, then the residual add."""
    xn = x if norm_weight is None else rms_norm_ref(x, norm_weight, eps)
    y = F.linear(xn, W, bias)
    return y if residual is None else residual + y


def linear_silu_ref(x, W13, norm_weight=None, eps: float = 1e-5):
    """RMSNorm, the w13 GEMM, then silu(gate) * up (koala.model.FeedForward's first half)."""
    xn = x if norm_weight is None else rms_norm_ref(x, norm_weight, eps)
    return silu_mul_ref(F.linear(xn, W13))
