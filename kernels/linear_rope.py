"""The attention's input in one launch: RMSNorm, the fused q|k|v projection, RoPE on q and k, and
the write of k and v into their cache slots.

    q = linear_rope_cache(x, Wqkv, bias, norm_weight, eps, cos, sin, slots, k_cache, v_cache, h, n_kv)

is kernels.linear.linear(x, Wqkv, bias, norm_weight=...) followed by
kernels.rope_cache.rope_and_cache_write(...), without the (B, T, (h + 2 n_kv) hd) projection in
memory and without the second launch: one launch a layer fewer (30 of SmolLM2's ~210 a decode
step, and one per EAGLE layer and drafted level).

Why it fits in the GEMV's epilogue: rotate_half RoPE mixes column i of a head with column
i + hd/2 only. So each program takes P such pairs of one head (BLOCK_N = 2P columns of W,
interleaved i, i + hd/2, i + 1, i + 1 + hd/2, ...: W's rows are read through a row index, never
copied or permuted), and has both halves of every pair in registers when its products are done.
Programs of q heads store rotated q in the (B, h, T, hd) layout the attention reads, programs of
k heads the rotated k at the token's cache slot, programs of v heads v there.

Numerics are those of the two kernels it replaces, step for step: the product and bias in fp32,
rounded once to x's dtype (the projection's output), then RoPE in fp32 on those values with
cos/sin in their dtype, rounded once (kernels/rope_cache.py). Each row goes through the GEMV's
per-row code (kernels/linear.py), so a row's bits do not depend on M, as exact mode needs.
Only the GEMV path exists here (decode and verification of up to a few hundred rows); prefill
keeps cuBLAS and the separate RoPE kernel.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import FLOATS, INTS, check_device, check_last_contiguous, check_tensor, pdl
from ._tl import cast_rne, pdl_wait
from .linear import LinearConfig, _config, _check, _gemv_product, _nw_tile, _row_rstd, _w_tile, linear
from .rope_cache import rope_and_cache_write, rope_and_cache_write_ref


@triton.jit
def _linear_rope_kernel(
    x_ptr, w_ptr, b_ptr, nw_ptr, cos_ptr, sin_ptr, slots_ptr, q_ptr, kc_ptr, vc_ptr,   # pointers
    M, K, T, S, n_heads, n_kv, eps,                                                  # sizes
    stride_xm, stride_wn, s_cos_b, s_cos_t, s_sin_b, s_sin_t,                        # strides
    s_q_b, s_q_h, s_q_t, s_kc_b, s_kc_h, s_kc_s, s_vc_b, s_vc_h, s_vc_s,
    HALF: tl.constexpr, P: tl.constexpr,                                             # constexpr
    HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_K: tl.constexpr, ROWS: tl.constexpr, USE_GDC: tl.constexpr,
):
    # program (g, r): pairs g*P .. g*P+P-1 (all in one head, as HALF % P == 0) of row group r
    g0 = tl.program_id(0) * P
    head = g0 // HALF                    # q heads, then k heads, then v heads
    i0 = g0 % HALF
    jn = tl.arange(0, 2 * P)
    col = head * (2 * HALF) + i0 + jn // 2 + (jn % 2) * HALF       # (2P,): i, i + HALF, ...
    n_mask = jn < 2 * P                  # every column exists (the grid covers whole pairs)
    w_rows = w_ptr + col.to(tl.int64) * stride_wn
    # W, the bias and the norm weight before the PDL wait, as the GEMV does (they are weights)
    rk = tl.arange(0, BLOCK_K)
    w0 = _w_tile(w_rows, n_mask, rk, K, EVEN_K, False)                 # (2P, BLOCK_K)
    nw0 = _nw_tile(nw_ptr, rk, K, EVEN_K) if HAS_NORM else rk.to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + col).to(tl.float32)
    else:
        bias = tl.zeros((2 * P,), dtype=tl.float32)
    pdl_wait(USE_GDC)              # before any read of activations or any store
    o = i0 + tl.arange(0, P)       # the pairs' first-half columns within the head
    for r in tl.static_range(ROWS):
        row = tl.program_id(1) * ROWS + r
        if row < M:
            # the GEMV's per-row code (kernels/linear.py): the row's bits do not depend on M
            rm = row + tl.arange(0, 1)
            m_mask = rm < M
            x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
            if HAS_NORM:
                rstd = _row_rstd(x_rows, m_mask, K, eps, 1, BLOCK_K)
            else:
                rstd = tl.zeros((1,), dtype=tl.float32)
            acc = _gemv_product(x_rows, m_mask, w_rows, n_mask, nw_ptr, rstd, K, w0, nw0,
                                row, x_ptr, x_ptr, (0, 0, 0, 0, 0, 0, 0, 0, 0), HAS_NORM, EVEN_K,
                                False, 1,
                                2 * P, BLOCK_K)                              # (1, 2P)
            acc += bias[None, :]
            # the projection's output rounding, then its pairs' halves apart: (P,) each
            xq = cast_rne(acc, x_ptr.dtype.element_ty).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(xq, (P, 2)))
            b = (row // T).to(tl.int64)
            t = (row % T).to(tl.int64)
            if head < n_heads + n_kv:          # q or k: rotate (as kernels/rope_cache.py)
                c1 = tl.load(cos_ptr + b * s_cos_b + t * s_cos_t + o).to(tl.float32)
                c2 = tl.load(cos_ptr + b * s_cos_b + t * s_cos_t + HALF + o).to(tl.float32)
                s1 = tl.load(sin_ptr + b * s_sin_b + t * s_sin_t + o).to(tl.float32)
                s2 = tl.load(sin_ptr + b * s_sin_b + t * s_sin_t + HALF + o).to(tl.float32)
                # the multiply-adds spelled out: left to the compiler, fp contraction fused a different
                # product of r2 here and in the other kernel, 1 ulp apart in fp32 (found on an H200)
                r1 = tl.fma(x1, c1, -(x2 * s1))
                r2 = tl.fma(x2, c2, x1 * s2)
            else:                              # v: stored as projected
                r1 = x1
                r2 = x2
            if head < n_heads:
                dst = q_ptr + b * s_q_b + head.to(tl.int64) * s_q_h + t * s_q_t
                tl.store(dst + o, cast_rne(r1, q_ptr.dtype.element_ty))
                tl.store(dst + HALF + o, cast_rne(r2, q_ptr.dtype.element_ty))
            else:
                slot = tl.load(slots_ptr + t).to(tl.int64)
                tl.device_assert((slot >= 0) & (slot < S), "slot out of range")  # TRITON_DEBUG=1
                slot_v = o * 0 + slot          # by hand: the interpreter rejects vector & scalar
                ok = (slot_v >= 0) & (slot_v < S)          # never write outside the cache
                if head < n_heads + n_kv:
                    dst = kc_ptr + b * s_kc_b + (head - n_heads).to(tl.int64) * s_kc_h + slot * s_kc_s
                else:
                    dst = vc_ptr + b * s_vc_b + (head - n_heads - n_kv).to(tl.int64) * s_vc_h + slot * s_vc_s
                tl.store(dst + o, cast_rne(r1, dst.dtype.element_ty), mask=ok)
                tl.store(dst + HALF + o, cast_rne(r2, dst.dtype.element_ty), mask=ok)


def rope_config(M: int, N: int, K: int, half: int, config: LinearConfig | None = None) -> LinearConfig:
    """The GEMV tiles for linear_rope_cache: `config` (e.g. exact mode's koala.model._row_config)
    or _config's for (M, N, K), with BLOCK_N made a whole number of pairs of one head: 2P
    columns, P a divisor of hd/2 (BLOCK_N 1 becomes 2)."""
    cfg = config or _config(M, N, K)
    if cfg.use_dot or cfg.vec:
        raise ValueError(f"config {cfg}: linear_rope_cache has the GEMV path only (use_dot and vec False)")
    p = math.gcd(max(1, cfg.BLOCK_N // 2), half)
    return cfg._replace(BLOCK_N=2 * p)


def linear_rope_cache(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None,
                      norm_weight: torch.Tensor | None, eps: float,
                      cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int,
                      *, config: LinearConfig | None = None) -> torch.Tensor:
    """rope_and_cache_write(linear(x, W, bias, norm_weight=norm_weight, eps=eps), cos, sin, slots,
    k_cache, v_cache, n_heads, n_kv) in one launch.

    x (B, T, K); W ((h + 2 n_kv) hd, K), rows q | k | v (Attention.wqkv's layout), a row
    stride free; bias ((h + 2 n_kv) hd,) or None; norm_weight (K,) or None; cos, sin (B, T, hd);
    slots (T,) cache slots shared by the batch; k_cache, v_cache (B, n_kv, S, hd), written in
    place. Returns the rotated q (B, h, T, hd), contiguous, in x's dtype. config: the GEMV tiles
    (rope_config makes BLOCK_N whole pairs)."""
    K = _check(x, W, norm_weight)
    check_tensor("x", x, ndim=3)
    B, T, _ = x.shape
    N = W.shape[0]
    if n_heads <= 0 or n_kv <= 0 or N % (n_heads + 2 * n_kv):
        raise ValueError(f"W has {N} rows, not (n_heads + 2*n_kv) * hd with n_heads={n_heads}, n_kv={n_kv}")
    hd = N // (n_heads + 2 * n_kv)
    if hd % 2:
        raise ValueError(f"head_dim {hd} must be even for rotate_half RoPE")
    named = [("x", x), ("W", W), ("cos", cos), ("sin", sin), ("slots", slots), ("k_cache", k_cache),
             ("v_cache", v_cache)]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), shape=(N,))
        named.append(("bias", bias))
    if norm_weight is not None:
        named.append(("norm_weight", norm_weight))
    check_tensor("cos", cos, ndim=3, dtypes=FLOATS, shape=(B, T, hd))
    check_tensor("sin", sin, ndim=3, dtypes=FLOATS, shape=(B, T, hd))
    check_tensor("slots", slots, ndim=1, dtypes=INTS, shape=(T,))
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOATS, shape=(B, n_kv, None, hd))
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOATS, shape=tuple(k_cache.shape))
    check_device(*named)
    for n, t in named:
        if n != "slots":
            check_last_contiguous(n, t)
    slots = slots.contiguous()
    x2 = x.reshape(-1, K)                                               # (M, K)
    M = x2.shape[0]
    cfg = rope_config(M, N, K, hd // 2, config)
    if cfg.BLOCK_M != 1 or cfg.ROWS not in (1, 2, 4, 8):
        raise ValueError(f"config {cfg}: the GEMV path takes BLOCK_M=1 and ROWS in 1, 2, 4, 8")
    q = torch.empty((B, n_heads, T, hd), dtype=x.dtype, device=x.device)
    if M == 0:
        return q
    P = cfg.BLOCK_N // 2
    dummy = q
    _linear_rope_kernel[(N // 2 // P, triton.cdiv(M, cfg.ROWS))](
        x2, W, dummy if bias is None else bias, dummy if norm_weight is None else norm_weight,
        cos, sin, slots, q, k_cache, v_cache,
        M, K, T, k_cache.shape[2], n_heads, n_kv, float(eps),
        x2.stride(0), W.stride(0), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=hd // 2, P=P, HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None,
        EVEN_K=K % cfg.BLOCK_K == 0, BLOCK_K=cfg.BLOCK_K, ROWS=cfg.ROWS, USE_GDC=pdl(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl(),
    )
    return q


def linear_rope_cache_unfused(x, W, bias, norm_weight, eps, cos, sin, slots, k_cache, v_cache,
                              n_heads: int, n_kv: int, *, config: LinearConfig | None = None):
    """The two launches linear_rope_cache replaces (kernels.linear.linear with the same tiles,
    then kernels.rope_cache): its numerics, step for step."""
    hd = W.shape[0] // (n_heads + 2 * n_kv)
    cfg = rope_config(x.numel() // x.shape[-1], W.shape[0], x.shape[-1], hd // 2, config)
    qkv = linear(x, W, bias, norm_weight=norm_weight, eps=eps, config=cfg)
    return rope_and_cache_write(qkv, cos, sin, slots, k_cache, v_cache, n_heads, n_kv)


def linear_rope_cache_ref(x, W, bias, norm_weight, eps, cos, sin, slots, k_cache, v_cache,
                          n_heads: int, n_kv: int):
    """The plain PyTorch ops koala.model runs: RMSNorm, F.linear, RoPE, KVCache.write."""
    from .linear import linear_ref
    qkv = linear_ref(x, W, bias, norm_weight=norm_weight, eps=eps)
    return rope_and_cache_write_ref(qkv, cos, sin, slots, k_cache, v_cache, n_heads, n_kv)
