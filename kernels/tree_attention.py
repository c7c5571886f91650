"""Decode / tree-verification attention: T <= 64 new queries over a static cache of S slots with
an explicit boolean mask and GQA, split along the cache (flash-decoding).

koala.model.Attention runs SDPA with a (B|1, 1, g*T, S) mask over all S slots of the cache: at
S=4096 slots and a 100-token prefix that reads 40x the keys it needs. Here `kv_len` (an int or a
device tensor, so it can change between CUDA-graph replays) bounds the slots read, and the
cache range is split over programs so that a batch-1 step still fills the GPU:
  stage 1, grid (B*n_kv, row blocks, splits): the g*T query rows of one kv head (GQA: the g
    query heads sharing it are folded into rows, so K and V are read once per kv head) against
    one contiguous range of slots, online softmax in fp32; writes o (normalised) and log2-sum-exp.
  stage 2, grid (B*h*T,): combines the splits. With one split stage 1 writes the output itself.
    Opt-in (fuse_combine=True or KOALA_FUSED_COMBINE=1): the last program of each row tile to
    finish combines instead (a ticket counter per tile), one launch in all; it measured slower
    on the H100 (0.545 against 0.495 ms per SmolLM2 step, bench/results/vanilla*.json).
    Or deferred (defer_combine=True): stage 1 only, and the output projection combines the
    splits in its prologue (kernels/linear.py, linear_combine), one launch fewer a layer.
    Every way combines with the same code (_combine_splits), so they give the same bits.
A row that sees no slot returns zeros, as SDPA does in torch 2.13 (older releases gave NaN).
"""
from __future__ import annotations

import logging
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (FLOATS, INTS, check_device, check_last_contiguous, check_tensor,
                      interpreting, next_pow2, pdl)
from ._tl import cast_rne, dot_acc, pdl_wait


@triton.jit
def _attn_split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, kvlen_ptr, o_ptr, lse_ptr,          # pointers
    out_ptr, cnt_ptr,                                                  # FUSED: output, tickets
    T, G, n_kv, S, n_splits, qk_scale,                                 # sizes (qk_scale has log2 e)
    s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs,              # strides (last dims unit)
    s_mb, s_mt, s_ob, s_oh, s_ot, s_os, s_lb, s_lh, s_lt,
    s_yb, s_yh, s_yt,                                                  # FUSED: output strides
    HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,    # constexpr
    BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, HAS_KV_LEN: tl.constexpr, FUSED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_GDC: tl.constexpr,
):
    pdl_wait(USE_GDC)              # before any read of activations or any store
    bk = tl.program_id(0)
    b = (bk // n_kv).to(tl.int64)
    kvh = (bk % n_kv).to(tl.int64)
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)           # row = group member * T + t
    rmask = r < G * T
    head = kvh * G + (r // T)
    t = (r % T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    q = tl.load(q_ptr + b * s_qb + head[:, None] * s_qh + t[:, None] * s_qt + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    kv_len = _kv_len(kvlen_ptr, b, S, HAS_KV_LEN)
    _split_rows(q, b, kvh, head, t, rmask, d, dmask, kv_len, bk,
                k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr, out_ptr, cnt_ptr, n_splits, qk_scale,
                s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb, s_mt, s_ob, s_oh, s_ot, s_os,
                s_lb, s_lh, s_lt, s_yb, s_yh, s_yt,
                BLOCK_D, BLOCK_M, BLOCK_N, SINGLE, FUSED, DOT_PRECISION, UPCAST)


@triton.jit
def _kv_len(kvlen_ptr, b, S, HAS_KV_LEN: tl.constexpr):
    """The slots a batch row's queries read: min(kv_len[b], S), or S."""
    if HAS_KV_LEN:
        return tl.minimum(tl.load(kvlen_ptr + b).to(tl.int32), S)
    else:
        return S


@triton.jit
def _split_range(kv_len, split, n_splits, BLOCK_N: tl.constexpr):
    """[lo, hi): the slots of one split, whole BLOCK_N blocks of [0, kv_len) in split order."""
    chunk = tl.cdiv(tl.cdiv(kv_len, n_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    return lo, tl.minimum(lo + chunk, kv_len)


@triton.jit
def _split_rows(q, b, kvh, head, t, rmask, d, dmask, kv_len, bk,
                k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr, out_ptr, cnt_ptr, n_splits, qk_scale,
                s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb, s_mt, s_ob, s_oh, s_ot, s_os,
                s_lb, s_lh, s_lt, s_yb, s_yh, s_yt,
                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SINGLE: tl.constexpr, FUSED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    """Stage 1 for one program: the query rows q (BLOCK_M, BLOCK_D) of kv head kvh (their query
    heads `head`, positions `t`) against this program's split of the slots below kv_len, online
    softmax in fp32; stores the split's output and log2-sum-exp (or, SINGLE, the output itself;
    FUSED, the last split program of the row tile combines)."""
    split = tl.program_id(2)
    lo, hi = _split_range(kv_len, split, n_splits, BLOCK_N)
    m_i = tl.zeros((BLOCK_M,), tl.float32) - float("inf")
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = k_ptr + b * s_kb + kvh * s_kh
    v_base = v_ptr + b * s_vb + kvh * s_vh
    m_base = mask_ptr + b * s_mb + t[:, None] * s_mt
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < hi
        kt = tl.load(k_base + n[None, :].to(tl.int64) * s_ks + d[:, None],
                     mask=dmask[:, None] & nmask[None, :], other=0.0)          # (BLOCK_D, BLOCK_N)
        s = dot_acc(q.to(kt.dtype), kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32),
                    DOT_PRECISION, UPCAST) * qk_scale
        vis = tl.load(m_base + n[None, :], mask=rmask[:, None] & nmask[None, :], other=0)
        s = tl.where(vis != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)         # all masked so far: no NaN
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None].to(tl.int64) * s_vs + d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)           # (BLOCK_N, BLOCK_D)
        acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
        m_i = m_new
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    omask = rmask[:, None] & dmask[None, :]
    if SINGLE:
        tl.store(o_ptr + b * s_ob + head[:, None] * s_oh + t[:, None] * s_ot + d[None, :],
                 cast_rne(o, o_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(o_ptr + b * s_ob + head[:, None] * s_oh + t[:, None] * s_ot + split * s_os + d[None, :],
                 o, mask=omask)
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * s_lb + head * s_lh + t * s_lt + split, lse, mask=rmask)
        if FUSED:
            # The last of this row tile's split programs to finish combines all of them, so no
            # second launch is needed. Every thread's stores are issued (barrier), then one
            # acq_rel ticket per program publishes them at GPU scope; the program holding the
            # last ticket reads the others' partials past L1 (.cg: a line left there by an
            # earlier replay would be stale) and resets the ticket for the next launch.
            tl.debug_barrier()
            tile = cnt_ptr + bk * tl.num_programs(1) + tl.program_id(1)
            ticket = tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu")
            if ticket == n_splits - 1:
                _combine_rows(o_ptr, lse_ptr, out_ptr, b, head, t, rmask, d, dmask, n_splits,
                              s_ob, s_oh, s_ot, s_os, s_lb, s_lh, s_lt, s_yb, s_yh, s_yt,
                              BLOCK_M, BLOCK_D)
                tl.atomic_xchg(tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _rotate(x, xp, c, sn, low):
    """RoPE (rotate_half) of x given its partner half xp (x[d +- hd/2]), cos and sin at d, and
    low = d < hd/2: x*cos - xp*sin on the low half, x*cos + xp*sin on the high half, fp32. The
    same multiply-adds as kernels/rope_cache.py spells out (r1 = fma(x1, c1, -(x2 * s1)), r2 =
    fma(x2, c2, x1 * s2)), so q and k get that kernel's bits."""
    prod = xp * sn
    return tl.fma(x, c, tl.where(low, -prod, prod))


@triton.jit
def _attn_rope_split_kernel(
    qkv_ptr, cos_ptr, sin_ptr, slots_ptr,                              # pointers: the step's inputs
    k_ptr, v_ptr, mask_ptr, kvlen_ptr, o_ptr, lse_ptr, out_ptr, cnt_ptr,
    T, G, n_kv, S, S_cap, n_splits, qk_scale,                          # sizes (S: window, S_cap: cache)
    s_xb, s_xt, s_cb, s_ct, s_sb, s_st,                                # strides (last dims unit)
    s_kb, s_kh, s_ks, s_vb, s_vh, s_vs,
    s_mb, s_mt, s_ob, s_oh, s_ot, s_os, s_lb, s_lh, s_lt, s_yb, s_yh, s_yt,
    HD: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,      # constexpr
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    SINGLE: tl.constexpr, HAS_KV_LEN: tl.constexpr, FUSED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_GDC: tl.constexpr,
):
    """_attn_split_kernel from the q|k|v projection itself: RoPE of the program's query rows in
    registers (never stored), and the rotated k and the v of every new token whose slot lies in
    this program's split written into the caches before the split reads them (a slot at or past
    kv_len by the last split). Each slot below kv_len lies in exactly one split, so no program
    reads a slot that another program writes; the row tiles of one split write the same values."""
    pdl_wait(USE_GDC)              # before any read of activations or any store
    bk = tl.program_id(0)
    b = (bk // n_kv).to(tl.int64)
    kvh = (bk % n_kv).to(tl.int64)
    split = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    low = d < HALF
    pd = tl.where(low, d + HALF, d - HALF)                           # the partner of d in its head
    NH = n_kv * G
    kv_len = _kv_len(kvlen_ptr, b, S, HAS_KV_LEN)
    lo, hi = _split_range(kv_len, split, n_splits, BLOCK_N)
    # the program's query rows, rotated and rounded to the input dtype as the RoPE kernel stores them
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)           # row = group member * T + t
    rmask = r < G * T
    head = kvh * G + (r // T)
    t = (r % T).to(tl.int64)
    qm = rmask[:, None] & dmask[None, :]
    qrow = qkv_ptr + b * s_xb + t[:, None] * s_xt + head[:, None] * HD
    qx = tl.load(qrow + d[None, :], mask=qm, other=0.0).to(tl.float32)
    qxp = tl.load(qrow + pd[None, :], mask=qm, other=0.0).to(tl.float32)
    cq = tl.load(cos_ptr + b * s_cb + t[:, None] * s_ct + d[None, :], mask=qm, other=0.0).to(tl.float32)
    sq = tl.load(sin_ptr + b * s_sb + t[:, None] * s_st + d[None, :], mask=qm, other=0.0).to(tl.float32)
    q = cast_rne(_rotate(qx, qxp, cq, sq, low[None, :]), qkv_ptr.dtype.element_ty)
    # the new tokens' k and v (BLOCK_T >= T rows), those whose slot this split owns. Only programs
    # that own one write and wait (a decode step's or a chain's new slots lie in one or two splits):
    # the barrier makes this program's cache writes visible to all its threads before the split
    # is read, and keeps the other splits' programs from waiting on loads they do not need.
    tt = tl.arange(0, BLOCK_T)
    tmask = tt < T
    slot = tl.load(slots_ptr + tt, mask=tmask, other=-1).to(tl.int64)
    last = (tt * 0 + split) == n_splits - 1                           # (BLOCK_T,): scalar & vector masks
    mine = tmask & (((slot >= lo) & (slot < hi)) | (last & (slot >= kv_len))) & (slot >= 0) & (slot < S_cap)
    if tl.max(mine.to(tl.int32), axis=0) > 0:
        wmask = mine[:, None] & dmask[None, :]
        xrow = qkv_ptr + b * s_xb + tt[:, None].to(tl.int64) * s_xt
        kcol = (NH + kvh) * HD
        kx = tl.load(xrow + kcol + d[None, :], mask=wmask, other=0.0).to(tl.float32)
        kxp = tl.load(xrow + kcol + pd[None, :], mask=wmask, other=0.0).to(tl.float32)
        ck = tl.load(cos_ptr + b * s_cb + tt[:, None] * s_ct + d[None, :], mask=wmask, other=0.0).to(tl.float32)
        sk = tl.load(sin_ptr + b * s_sb + tt[:, None] * s_st + d[None, :], mask=wmask, other=0.0).to(tl.float32)
        vx = tl.load(xrow + (NH + n_kv + kvh) * HD + d[None, :], mask=wmask, other=0.0)
        kr = _rotate(kx, kxp, ck, sk, low[None, :])
        tl.store(k_ptr + b * s_kb + kvh * s_kh + slot[:, None] * s_ks + d[None, :],
                 cast_rne(kr, k_ptr.dtype.element_ty), mask=wmask)
        tl.store(v_ptr + b * s_vb + kvh * s_vh + slot[:, None] * s_vs + d[None, :],
                 cast_rne(vx.to(tl.float32), v_ptr.dtype.element_ty), mask=wmask)
        tl.debug_barrier()
    _split_rows(q, b, kvh, head, t, rmask, d, dmask, kv_len, bk,
                k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr, out_ptr, cnt_ptr, n_splits, qk_scale,
                s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb, s_mt, s_ob, s_oh, s_ot, s_os,
                s_lb, s_lh, s_lt, s_yb, s_yh, s_yt,
                BLOCK_D, BLOCK_M, BLOCK_N, SINGLE, FUSED, DOT_PRECISION, UPCAST)


@triton.jit
def _combine_splits(o_ptrs, lse_ptrs, valid, n_splits, s_os):
    """The attention output of each element of o_ptrs' shape (any), fp32, from the splits'
    partials: o_ptrs points at the element's split-0 output (split sp at + sp * s_os), lse_ptrs
    (the same shape) at its row's split-0 log2-sum-exp (split stride 1); valid masks elements.

    One pass in split order, four splits at a time (one load round trip each: every load of a
    chunk is issued before any is used), online: the running max m is raised per chunk and what
    was summed so far is rescaled by exp2(m_old - m_new), then each split's output is added with
    weight exp2(lse - m) by an explicit fma. The arithmetic per element is the same whatever
    shape or kernel calls this (the combine launch, the fused ticket combine, the output
    projection's prologue in kernels/linear.py), so all of them give the same bits. A split a row
    does not see (lse = -inf) leaves the max and the sums exactly unchanged (a scale of exactly
    1, a weight of 0), so a row's bits do not depend on how many splits the window has (exact
    mode). Partials are read past L1 (.cg): the fused ticket combine reads other programs' writes
    of the same launch."""
    m = tl.zeros(o_ptrs.shape, tl.float32) - float("inf")
    den = tl.zeros(o_ptrs.shape, tl.float32)
    res = tl.zeros(o_ptrs.shape, tl.float32)
    for s0 in range(0, n_splits, 4):
        sp = tl.zeros(o_ptrs.shape, tl.int32) + s0          # split index as a tensor (interpreter)
        l0 = tl.load(lse_ptrs + s0, mask=valid & (sp < n_splits), other=float("-inf"), cache_modifier=".cg")
        l1 = tl.load(lse_ptrs + (s0 + 1), mask=valid & (sp + 1 < n_splits), other=float("-inf"), cache_modifier=".cg")
        l2 = tl.load(lse_ptrs + (s0 + 2), mask=valid & (sp + 2 < n_splits), other=float("-inf"), cache_modifier=".cg")
        l3 = tl.load(lse_ptrs + (s0 + 3), mask=valid & (sp + 3 < n_splits), other=float("-inf"), cache_modifier=".cg")
        # every split below n_splits has its output written (zeros where it saw no slot), so the
        # outputs are loaded with the lse and a weight of 0 picks zero, not a load mask on it
        o0 = tl.load(o_ptrs + s0 * s_os, mask=valid & (sp < n_splits), other=0.0, cache_modifier=".cg")
        o1 = tl.load(o_ptrs + (s0 + 1) * s_os, mask=valid & (sp + 1 < n_splits), other=0.0, cache_modifier=".cg")
        o2 = tl.load(o_ptrs + (s0 + 2) * s_os, mask=valid & (sp + 2 < n_splits), other=0.0, cache_modifier=".cg")
        o3 = tl.load(o_ptrs + (s0 + 3) * s_os, mask=valid & (sp + 3 < n_splits), other=0.0, cache_modifier=".cg")
        mc = tl.maximum(tl.maximum(tl.maximum(tl.maximum(m, l0), l1), l2), l3)
        ms = tl.where(mc == float("-inf"), 0.0, mc)                  # nothing seen yet: no NaN
        alpha = tl.exp2(m - ms)
        w0 = tl.exp2(l0 - ms)
        w1 = tl.exp2(l1 - ms)
        w2 = tl.exp2(l2 - ms)
        w3 = tl.exp2(l3 - ms)
        res = res * alpha
        res = tl.fma(tl.where(w0 > 0, o0, 0.0), w0, res)
        res = tl.fma(tl.where(w1 > 0, o1, 0.0), w1, res)
        res = tl.fma(tl.where(w2 > 0, o2, 0.0), w2, res)
        res = tl.fma(tl.where(w3 > 0, o3, 0.0), w3, res)
        den = den * alpha
        den = den + w0
        den = den + w1
        den = den + w2
        den = den + w3
        m = mc
    return res / tl.where(den > 0, den, 1.0)


@triton.jit
def _combine_rows(o_ptr, lse_ptr, out_ptr, b, head, t, rmask, d, dmask, n_splits,
                  s_ob, s_oh, s_ot, s_os, s_lb, s_lh, s_lt, s_yb, s_yh, s_yt,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[rows] = the splits' outputs combined by _combine_splits."""
    lse_rows = lse_ptr + b * s_lb + head * s_lh + t * s_lt                 # (BLOCK_M,)
    o_rows = o_ptr + b * s_ob + head[:, None] * s_oh + t[:, None] * s_ot + d[None, :]
    omask = rmask[:, None] & dmask[None, :]
    res = _combine_splits(o_rows, lse_rows[:, None] + d[None, :] * 0, omask, n_splits, s_os)
    tl.store(out_ptr + b * s_yb + head[:, None] * s_yh + t[:, None] * s_yt + d[None, :],
             cast_rne(res, out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _attn_combine_kernel(
    o_part_ptr, lse_ptr, out_ptr,                  # pointers
    h, T, n_splits,                                # sizes
    s_pb, s_ph, s_pt, s_ps, s_lb, s_lh, s_lt,      # strides
    s_ob, s_oh, s_ot,
    HD: tl.constexpr, BLOCK_D: tl.constexpr,       # constexpr
    USE_GDC: tl.constexpr,
):
    pdl_wait(USE_GDC)              # before any read of activations or any store
    row = tl.program_id(0)
    b = (row // (h * T)).to(tl.int64)
    hh = ((row // T) % h).to(tl.int64)
    t = (row % T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    lse_row = lse_ptr + b * s_lb + hh * s_lh + t * s_lt
    res = _combine_splits(o_part_ptr + b * s_pb + hh * s_ph + t * s_pt + d, lse_row + d * 0, dmask,
                          n_splits, s_ps)
    tl.store(out_ptr + b * s_ob + hh * s_oh + t * s_ot + d, cast_rne(res, out_ptr.dtype.element_ty),
             mask=dmask)


_TICKETS: dict = {}        # device -> int32 ticket counters of the fused combine, all zero at rest
_MIN_TICKETS = 4096
_log = logging.getLogger(__name__)


def _tickets(dev, n: int):
    """n zeroed ticket counters on dev, allocated once (each launch leaves them zero again).
    None if more are needed while a CUDA graph is being captured (an allocation there would be a
    graph node). One stream at a time: two attention launches in flight at once would share
    counters (koala runs one stream)."""
    t = _TICKETS.get(dev)
    if t is None or t.numel() < n:
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        t = torch.zeros(max(n, _MIN_TICKETS), dtype=torch.int32, device=dev)
        _TICKETS[dev] = t
    return t


def _n_splits(programs: int, S: int) -> int:
    """Split the cache until about 2 programs per SM of an H100 (132 SMs) are busy, but give
    each split at least 128 slots: B=1, SmolLM2 (3 kv heads), S=2048 -> 16 splits of 128."""
    return max(1, min(triton.cdiv(264, programs), triton.cdiv(S, 128), 64))


def exact_tiles(kv_programs: int, S: int) -> dict:
    """tree_attention's keyword arguments for batch-invariant use through a window of S slots: a
    fixed row tile and 128-slot splits (n_splits grows with S, up to S = 8192). The combine sums
    the splits in split order and a split a query does not see adds exact zeros, so a query's
    result is the same bits whatever the window and however many rows share the launch (koala's
    exact mode)."""
    return dict(n_splits=_n_splits(kv_programs, S), block_m=64)


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   mask: torch.Tensor, kv_len=None, scale: float | None = None,
                   n_splits: int | None = None, block_m: int | None = None,
                   fuse_combine: bool | None = None, defer_combine: bool = False):
    """q (B, h, T, hd); k_cache, v_cache (B, n_kv, S, hd), h a multiple of n_kv; mask (B|1, T, S)
    bool, True where a query may see a slot; kv_len: None (= S), an int, or an int tensor () or
    (B,): only slots < kv_len are read (and they must cover every visible slot). Every last dim
    needs unit stride. Returns (B, h, T, hd) in q's dtype (a transposed view of a (B, T, h, hd)
    buffer); softmax scale defaults to hd**-0.5.
    Batch-invariant use (koala's exact mode): a fixed block_m and n_splits = S / 128 (128-slot
    splits whatever S is; exact_tiles). The combine sums the splits in split order
    (_combine_splits) and the splits past the ones a query sees add exact zeros, so a query's
    result does not depend on the window or on how many rows share the launch.
    fuse_combine (default False; None reads KOALA_FUSED_COMBINE=1): with several splits, the
    last split program of each row tile to finish combines them, so one launch does it all;
    otherwise a separate combine launch.
    defer_combine: with several splits, no combine at all: returns SplitParts, which
    kernels.linear.linear_combine combines in the output projection's prologue (the same bits as
    the combine launch). With one split the output is returned as usual."""
    check_tensor("q", q, ndim=4, dtypes=FLOATS)
    B, h, T, hd = q.shape
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOATS, shape=(B, None, None, hd))
    _, n_kv, S, _ = k_cache.shape
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), shape=tuple(k_cache.shape))
    if k_cache.dtype != q.dtype:
        raise ValueError(f"q is {q.dtype} but the caches are {k_cache.dtype}")
    if h % n_kv:
        raise ValueError(f"h={h} query heads is not a multiple of n_kv={n_kv}")
    check_tensor("mask", mask, ndim=3, dtypes=(torch.bool,), shape=(None, T, S))
    if mask.shape[0] not in (1, B):
        raise ValueError(f"mask batch {mask.shape[0]} must be 1 or B={B}")
    dev = check_device(("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("mask", mask))
    for n, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("mask", mask)):
        check_last_contiguous(n, t)
    plan = _plan(B, h, n_kv, T, hd, S, q.dtype, dev, kv_len, scale, n_splits, block_m,
                 False if defer_combine else fuse_combine)
    if B * T:
        _split(q, k_cache, v_cache, mask, plan.kv_len, plan.o_part, plan.lse, plan.so, plan.sl,
               plan.out, plan.tickets, plan.n_splits, plan.BLOCK_M, plan.scale)
    return _finish(plan, defer_combine)


class _Plan(NamedTuple):
    """One attention launch's tiles and buffers (tree_attention and rope_tree_attention)."""
    out: torch.Tensor             # (B, h, T, hd): the transposed view of a (B, T, h, hd) buffer
    o_part: torch.Tensor          # (B, h, T, n_splits, hd) fp32, or out with one split
    lse: torch.Tensor             # (B, h, T, n_splits) fp32 (unused with one split)
    so: tuple                     # o_part's (b, head, t, split) strides
    sl: tuple                     # lse's (b, head, t) strides
    kv_len: torch.Tensor | None   # (B,) int, or None: all S slots
    tickets: torch.Tensor | None  # the fused combine's counters, or None
    n_splits: int
    BLOCK_M: int
    scale: float


class SplitParts(NamedTuple):
    """A split attention's uncombined result (tree_attention(..., defer_combine=True)), for
    kernels.linear.linear_combine: o_part (B, h, T, n_splits, hd) fp32, each split's normalised
    output; lse (B, h, T, n_splits) fp32, each split's log2-sum-exp (-inf: the split saw no slot);
    dtype: the attention output's dtype (q's), to which the combined rows are rounded."""
    o_part: torch.Tensor
    lse: torch.Tensor
    n_splits: int
    dtype: torch.dtype


def _plan(B, h, n_kv, T, hd, S, dtype, dev, kv_len, scale, n_splits, block_m,
          fuse_combine) -> _Plan:
    if hd > 256:
        raise ValueError(f"head_dim {hd} > 256 is not supported")
    # kv_len=None reads all S slots with no extra launch (a fill kernel per layer would cost
    # 30 graph nodes a step on SmolLM2); an int becomes a tensor (one small fill launch)
    if kv_len is not None:
        if not isinstance(kv_len, torch.Tensor):
            kv_len = torch.full((B,), int(kv_len), dtype=torch.int32, device=dev)
        check_tensor("kv_len", kv_len, dtypes=INTS)
        if kv_len.device != dev:
            raise ValueError(f"tensors on different devices: k_cache={dev}, kv_len={kv_len.device}")
        kv_len = kv_len.reshape(-1).expand(B).contiguous()
    scale = hd ** -0.5 if scale is None else float(scale)
    G = h // n_kv
    BLOCK_M = min(64, max(16, next_pow2(G * T)))
    if block_m is not None:  # a fixed row tile (with a fixed n_splits) makes each query row's
        # result independent of how many rows share the launch: batch-invariant verification
        if block_m not in (16, 32, 64):
            raise ValueError(f"block_m must be 16, 32 or 64, got {block_m}")
        BLOCK_M = block_m
    row_blocks = triton.cdiv(G * T, BLOCK_M)
    if n_splits is None:
        n_splits = _n_splits(B * n_kv * row_blocks, S)
    # stored as (B, T, h, hd) and returned as its transposed view: the output projection reads
    # (B, T, h*hd), which is then a free reshape (a copy kernel per layer otherwise, 2.3 us each
    # at T = 5 on the H100: 69 us of a SmolLM2 verify, bench/results/profile_step.txt)
    out = torch.empty((B, T, h, hd), dtype=dtype, device=dev).transpose(1, 2)
    single = n_splits == 1
    if fuse_combine is None:
        fuse_combine = os.environ.get("KOALA_FUSED_COMBINE", "0") == "1"
    want_tickets = not single and fuse_combine and B * T > 0
    tickets = _tickets(dev, B * n_kv * row_blocks) if want_tickets else None
    if want_tickets and tickets is None:
        _log.warning("tree_attention: %d ticket counters needed while a CUDA graph is being "
                     "captured and fewer were allocated before it: using the separate combine "
                     "launch", B * n_kv * row_blocks)
    if single:
        o_part, lse = out, out                            # lse unused with one split
        so = (out.stride(0), out.stride(1), out.stride(2), 0)
        sl = (0, 0, 0)
    else:
        o_part = torch.empty((B, h, T, n_splits, hd), dtype=torch.float32, device=dev)
        lse = torch.empty((B, h, T, n_splits), dtype=torch.float32, device=dev)
        so = o_part.stride()[:4]
        sl = lse.stride()[:3]
    return _Plan(out, o_part, lse, so, sl, kv_len, tickets, n_splits, BLOCK_M, scale)


def _finish(plan: _Plan, defer: bool = False):
    """Stage 2 after a split launch: the separate combine, unless one split or the fused one;
    deferred (SplitParts returned), none."""
    if plan.n_splits > 1 and plan.tickets is None:
        if defer:
            return SplitParts(plan.o_part, plan.lse, plan.n_splits, plan.out.dtype)
        _combine(plan.o_part, plan.lse, plan.out, plan.n_splits)
    return plan.out


ROPE_MAX_T = 64            # rope_tree_attention's new tokens at most (every split program reads them all)


def rope_tree_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, mask: torch.Tensor,
                        kv_len=None, scale: float | None = None, n_splits: int | None = None,
                        block_m: int | None = None, fuse_combine: bool | None = None,
                        defer_combine: bool = False):
    """RoPE, the KV-cache write and tree_attention in the launches of tree_attention alone:
    rope_and_cache_write(qkv, cos, sin, slots, k_cache, v_cache, n_heads, n_kv) followed by
    tree_attention(q, k_cache[:, :, :W], v_cache[:, :, :W], mask, ...) with W = mask.shape[-1],
    with the same bits (the same RoPE multiply-adds and roundings, the same split and combine code).

    qkv (B, T, (h + 2*n_kv)*hd): the q|k|v projection; cos, sin (B, T, hd) (a stride-0 batch dim
    is fine); slots (T,) int: the cache slots of the T new tokens (shared by the batch), written in
    place with the rotated k and the v (out-of-range slots are not written); k_cache, v_cache
    (B, n_kv, S_cap, hd): the whole caches; mask (B|1, T, W) bool over the window W <= S_cap that
    the queries attend to. T <= ROPE_MAX_T. The remaining arguments and the result are
    tree_attention's. No per-head q/k norm (Qwen3): use rope_and_cache_write for those.

    Why: the RoPE launch (about 1.7 us a layer on the H100, bench/results/profile_step.txt) sits
    between the q|k|v product and the attention on every decode step and verify. Here each split
    program rotates its query rows in registers, and the programs whose split holds a new token's
    slot write that token's k and v before reading the split. Measured, it is not faster: on the
    H100 a SmolLM2 plain step took 0.485 against 0.481 ms with the RoPE launch (c2d81e5,
    bench/results/spec_cost_rope_attn*_c2d81e5.json): under PDL the small launch costs little, and
    the split that owns the new slot now waits on its own writes before it reads. koala.model
    uses it only with KOALA_ROPE_ATTN=1."""
    check_tensor("qkv", qkv, ndim=3, dtypes=FLOATS)
    B, T, Wq = qkv.shape
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(qkv.dtype,), shape=(B, None, None, None))
    _, n_kv, S_cap, hd = k_cache.shape
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(qkv.dtype,), shape=tuple(k_cache.shape))
    if n_heads <= 0 or n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} query heads is not a multiple of n_kv={n_kv}")
    if Wq != (n_heads + 2 * n_kv) * hd:
        raise ValueError(f"qkv width {Wq} is not (n_heads + 2*n_kv) * hd = {(n_heads + 2 * n_kv) * hd}")
    if hd % 2:
        raise ValueError(f"head_dim {hd} must be even for rotate_half RoPE")
    if T > ROPE_MAX_T:
        raise ValueError(f"{T} new tokens: rope_tree_attention takes at most {ROPE_MAX_T}; use "
                         "rope_and_cache_write, then tree_attention")
    check_tensor("cos", cos, ndim=3, dtypes=FLOATS, shape=(B, T, hd))
    check_tensor("sin", sin, ndim=3, dtypes=FLOATS, shape=(B, T, hd))
    check_tensor("slots", slots, ndim=1, dtypes=INTS, shape=(T,))
    check_tensor("mask", mask, ndim=3, dtypes=(torch.bool,), shape=(None, T, None))
    W = mask.shape[2]
    if mask.shape[0] not in (1, B):
        raise ValueError(f"mask batch {mask.shape[0]} must be 1 or B={B}")
    if W > S_cap:
        raise ValueError(f"the mask covers {W} slots, more than the cache's {S_cap}")
    named = (("qkv", qkv), ("cos", cos), ("sin", sin), ("slots", slots), ("k_cache", k_cache),
             ("v_cache", v_cache), ("mask", mask))
    dev = check_device(*named)
    for n, t in named:
        if n != "slots":
            check_last_contiguous(n, t)
    plan = _plan(B, n_heads, n_kv, T, hd, W, qkv.dtype, dev, kv_len, scale, n_splits, block_m,
                 False if defer_combine else fuse_combine)
    if B * T == 0:
        return plan.out
    slots = slots.contiguous()
    m8 = mask.view(torch.uint8)
    single = plan.n_splits == 1
    BLOCK_N = 64 if hd <= 128 and qkv.dtype != torch.float32 else 32
    G = n_heads // n_kv
    _attn_rope_split_kernel[(B * n_kv, triton.cdiv(G * T, plan.BLOCK_M), plan.n_splits)](
        qkv, cos, sin, slots,
        k_cache, v_cache, m8, qkv if plan.kv_len is None else plan.kv_len, plan.o_part, plan.lse,
        plan.out, plan.lse if plan.tickets is None else plan.tickets,
        T, G, n_kv, W, S_cap, plan.n_splits, plan.scale * math.log2(math.e),
        qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        m8.stride(0) if mask.shape[0] > 1 else 0, m8.stride(1),
        *plan.so, *plan.sl,
        plan.out.stride(0), plan.out.stride(1), plan.out.stride(2),
        HD=hd, HALF=hd // 2, BLOCK_D=max(16, next_pow2(hd)), BLOCK_M=plan.BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_T=max(2, next_pow2(T)), SINGLE=single, HAS_KV_LEN=plan.kv_len is not None,
        FUSED=plan.tickets is not None, DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
        UPCAST=interpreting(), USE_GDC=pdl(), num_warps=4, launch_pdl=pdl(),
    )
    return _finish(plan, defer_combine)


def rope_tree_attention_ref(qkv, cos, sin, slots, k_cache, v_cache, n_heads: int, mask, kv_len=None,
                            scale=None):
    """The two steps rope_tree_attention fuses, as PyTorch ops (writes the caches too)."""
    from .rope_cache import rope_and_cache_write_ref
    W = mask.shape[-1]
    q = rope_and_cache_write_ref(qkv, cos, sin, slots, k_cache, v_cache, n_heads, k_cache.shape[1])
    return tree_attention_ref(q, k_cache[:, :, :W], v_cache[:, :, :W], mask, kv_len, scale)


def _split(q, k_cache, v_cache, mask, kv_len, o_part, lse, so, sl, out, tickets, n_splits: int,
           BLOCK_M: int, scale: float):
    """Stage 1 into given buffers: q (B, h, T, hd) (any strides, last unit), caches (B, n_kv, S,
    hd), mask (B|1, T, S) bool; so / sl: the (b, head, t, split) strides of o_part and the (b,
    head, t) strides of lse (with one split: out's, and o_part is out); tickets: the fused
    combine's counters or None."""
    B, h, T, hd = q.shape
    n_kv, S = k_cache.shape[1], k_cache.shape[2]
    single = n_splits == 1
    m8 = mask.view(torch.uint8)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    # fp32 tiles at hd=128, BLOCK_N=64 need 180 KB of shared memory (of 227 KB on an H100)
    BLOCK_N = 64 if hd <= 128 and q.dtype != torch.float32 else 32
    _attn_split_kernel[(B * n_kv, triton.cdiv((h // n_kv) * T, BLOCK_M), n_splits)](
        q, k_cache, v_cache, m8, q if kv_len is None else kv_len, o_part, lse,
        out, lse if tickets is None else tickets,
        T, h // n_kv, n_kv, S, n_splits, scale * math.log2(math.e),
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        m8.stride(0) if mask.shape[0] > 1 else 0, m8.stride(1),
        *so, *sl,
        out.stride(0), out.stride(1), out.stride(2),
        HD=hd, BLOCK_D=max(16, next_pow2(hd)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SINGLE=single,
        HAS_KV_LEN=kv_len is not None, FUSED=tickets is not None, DOT_PRECISION=prec,
        UPCAST=interpreting(), USE_GDC=pdl(), num_warps=4, launch_pdl=pdl(),
    )


def _combine(o_part, lse, out, n_splits: int):
    """Stage 2: o_part (B, h, T, >= n_splits, hd) fp32 and lse (B, h, T, >= n_splits), the
    first n_splits splits of each row combined into out (B, h, T, hd) (a strided view)."""
    B, h, T, _, hd = o_part.shape
    _attn_combine_kernel[(B * h * T,)](
        o_part, lse, out,
        h, T, n_splits,
        *o_part.stride()[:4], *lse.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2),
        HD=hd, BLOCK_D=max(16, next_pow2(hd)), USE_GDC=pdl(),
        num_warps=1, launch_pdl=pdl(),
    )


# Exact tree verification. In exact mode a query's attention is a function of the keys at each
# cache slot it sees (the split kernel's 64-key blocks, 128-slot splits, the combine's fixed
# tile), so a chain verifies with plain decoding's bits: its nodes sit in the slots they would
# hold had they been decoded one by one. A tree's nodes cannot all do that (siblings would share
# a slot). So each node attends in three parts: (a) the splits below the one holding the root's
# slot L, shared by every node and the same as plain decoding's; (b) the next two splits from a
# private copy (TAIL = 256 slots) in which the node's ancestors, in depth order, sit at slots L,
# L + 1, ..., as plain decoding would have written them; (c) the usual combine over all splits.
# Each split is then computed on the same key at the same slot as plain decoding, by the same
# kernel, and empty splits add exact zeros, so the node's output has the same bits.
TAIL = 256


class ExactTail(NamedTuple):
    """A tree verification's layout for exact_tree_attention (koala.model.exact_tree_tail):
    prefix_mask (1, N, S) bool: the slots below the root's split, for every node;
    idx (N, TAIL) int64: the cache slot of each private slot (TAIL slots from the root's split);
    tail_mask (N, 1, TAIL) bool: the private slots each node sees (prefix, then its path);
    splits (2,) int64: the indices of the two splits the private copy replaces."""
    prefix_mask: torch.Tensor
    idx: torch.Tensor
    tail_mask: torch.Tensor
    splits: torch.Tensor


def exact_tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         tail: ExactTail, n_splits: int, block_m: int,
                         scale: float | None = None) -> torch.Tensor:
    """tree_attention for the N nodes of one tree (B = 1) with plain decoding's bits per node,
    given exact_tiles' n_splits and block_m for the window k_cache.shape[2]. q (1, h, N,
    hd); caches (1, n_kv, S, hd). Returns (1, h, N, hd) as tree_attention does. Costs a gather
    of 2 x N x TAIL keys and values and two launches beyond tree_attention's."""
    check_tensor("q", q, ndim=4, dtypes=FLOATS)
    B, h, N, hd = q.shape
    if B != 1:
        raise ValueError(f"exact tree attention verifies one tree (B = 1), got B={B}")
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), shape=(1, None, None, hd))
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), shape=tuple(k_cache.shape))
    n_kv, S = k_cache.shape[1], k_cache.shape[2]
    check_tensor("tail.prefix_mask", tail.prefix_mask, ndim=3, dtypes=(torch.bool,), shape=(1, N, S))
    check_tensor("tail.idx", tail.idx, ndim=2, dtypes=INTS, shape=(N, TAIL))
    check_tensor("tail.tail_mask", tail.tail_mask, ndim=3, dtypes=(torch.bool,), shape=(N, 1, TAIL))
    check_tensor("tail.splits", tail.splits, ndim=1, dtypes=INTS, shape=(2,))
    # exact mode's splits: 128 slots each (one split for a window of <= 128 slots, whose one
    # 64-slot block the private copy's second, masked block leaves unchanged)
    if triton.cdiv(triton.cdiv(S, n_splits), 64) * 64 != 128 and not (n_splits == 1 and S <= 128):
        raise ValueError(f"exact tree attention needs exact mode's 128-slot splits; S={S} with "
                         f"n_splits={n_splits} gives others")
    scale = hd ** -0.5 if scale is None else float(scale)
    dev = q.device
    out = torch.empty((1, N, h, hd), dtype=q.dtype, device=dev).transpose(1, 2)
    # one spare split: the private copy's second split may lie past the window's last
    o_part = torch.empty((1, h, N, n_splits + 1, hd), dtype=torch.float32, device=dev)
    lse = torch.empty((1, h, N, n_splits + 1), dtype=torch.float32, device=dev)
    # (a) every node against the splits below the root's: plain decoding's bits, as for a chain
    _split(q, k_cache, v_cache, tail.prefix_mask, None, o_part, lse, o_part.stride()[:4],
           lse.stride()[:3], out, None, n_splits, block_m, scale)
    # (b) each node (a batch row of its own) against its private copy of the next two splits
    idx = tail.idx.reshape(-1)
    tk = k_cache[0].index_select(1, idx).view(n_kv, N, TAIL, hd).transpose(0, 1)   # (N, n_kv, TAIL, hd)
    tv = v_cache[0].index_select(1, idx).view(n_kv, N, TAIL, hd).transpose(0, 1)
    o_t = torch.empty((N, h, 1, 2, hd), dtype=torch.float32, device=dev)
    lse_t = torch.empty((N, h, 1, 2), dtype=torch.float32, device=dev)
    _split(q.permute(2, 1, 0, 3), tk, tv, tail.tail_mask, None, o_t, lse_t, o_t.stride()[:4],
           lse_t.stride()[:3], out, None, 2, block_m, scale)
    o_part[0].index_copy_(2, tail.splits, o_t[:, :, 0].transpose(0, 1))
    lse[0].index_copy_(2, tail.splits, lse_t[:, :, 0].transpose(0, 1))
    # (c) the combine over the window's splits, with exact mode's tile
    _combine(o_part, lse, out, n_splits)
    return out


def tree_attention_ref(q, k_cache, v_cache, mask, kv_len=None, scale=None):
    """SDPA with the mask (and slots >= kv_len hidden), GQA by repeating the kv heads."""
    B, h, T, hd = q.shape
    n_kv, S = k_cache.shape[1], k_cache.shape[2]
    m = mask
    if kv_len is not None:
        kl = torch.as_tensor(kv_len, device=q.device).reshape(-1, 1, 1)
        m = m & (torch.arange(S, device=q.device) < kl)
    g = h // n_kv
    k = k_cache.repeat_interleave(g, 1)
    v = v_cache.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m.unsqueeze(1), scale=scale)
