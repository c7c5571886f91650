"""RoPE on q and k plus the KV-cache write, in one launch.

The model's attention does, per layer, between the QKV projection and SDPA: split/view/
transpose, two rotate_half (cat + neg), four mul, two add, and two index_copy_: about 14 eager
launches. Here one launch reads the fused projection row once, writes the rotated k and the v
straight into their cache slots and returns the rotated q in the (B, h, T, hd) layout SDPA wants.

RoPE follows the rotate_half convention of koala.model: with x = (x1 | x2) halves of a head,
  out1 = x1*cos1 - x2*sin1,  out2 = x2*cos2 + x1*sin2,
computed in fp32 and rounded once (the reference rounds after each mul and the add).
With q_norm / k_norm (Qwen3) each q and k head is first RMS-normalised over its head_dim and
scaled by the weight, rounded as koala.model.RMSNorm rounds (normalised value, then the product,
each to the input dtype), so the norm costs no launch of its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOATS, INTS, check_device, check_last_contiguous, check_tensor, next_pow2, pdl
from ._tl import cast_rne, pdl_wait


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, q_ptr,   # pointers
    qn_ptr, kn_ptr,                                                          # QK_NORM: (hd,) weights
    T, S, n_heads, n_kv, eps,                                                # sizes, QK_NORM's eps
    s_qkv_b, s_qkv_t,                                                        # strides (all last dims unit)
    s_cos_b, s_cos_t, s_sin_b, s_sin_t,
    s_kc_b, s_kc_h, s_kc_s, s_vc_b, s_vc_h, s_vc_s,
    s_q_b, s_q_h, s_q_t,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, QK_NORM: tl.constexpr,        # constexpr
    USE_GDC: tl.constexpr,
):
    # cos/sin are per-step inputs (positions), not constants: everything waits
    pdl_wait(USE_GDC)              # before any read of activations or any store
    # one program per (token, head): h query heads then n_kv kv heads; a head is <= 256 values
    bt = tl.program_id(0)
    head = tl.program_id(1)
    b = (bt // T).to(tl.int64)
    t = (bt % T).to(tl.int64)
    o = tl.arange(0, BLOCK_H)
    m = o < HALF
    c1 = tl.load(cos_ptr + b * s_cos_b + t * s_cos_t + o, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + b * s_cos_b + t * s_cos_t + HALF + o, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + b * s_sin_b + t * s_sin_t + o, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + b * s_sin_b + t * s_sin_t + HALF + o, mask=m, other=0.0).to(tl.float32)
    row = qkv_ptr + b * s_qkv_b + t * s_qkv_t
    src = row + head.to(tl.int64) * (2 * HALF)       # q heads then k heads: head j of k sits at h + j
    x1 = tl.load(src + o, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + o, mask=m, other=0.0).to(tl.float32)
    if QK_NORM:
        # RMSNorm over the head: x * rsqrt(mean(x^2) + eps), rounded to the input dtype, times
        # the weight (q heads: q_norm, k heads: k_norm), rounded again
        ss = tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)
        rstd = tl.rsqrt(ss / (2 * HALF) + eps)
        wp = tl.where(head < n_heads, qn_ptr, kn_ptr)
        w1 = tl.load(wp + o, mask=m, other=0.0).to(tl.float32)
        w2 = tl.load(wp + HALF + o, mask=m, other=0.0).to(tl.float32)
        dt = qkv_ptr.dtype.element_ty
        x1 = cast_rne(w1 * cast_rne(x1 * rstd, dt).to(tl.float32), dt).to(tl.float32)
        x2 = cast_rne(w2 * cast_rne(x2 * rstd, dt).to(tl.float32), dt).to(tl.float32)
    # the multiply-adds spelled out: left to the compiler, fp contraction fused a different
    # product of r2 here and in the other kernel, 1 ulp apart in fp32 (found on an H200)
    r1 = tl.fma(x1, c1, -(x2 * s1))
    r2 = tl.fma(x2, c2, x1 * s2)
    if head < n_heads:
        dst = q_ptr + b * s_q_b + head.to(tl.int64) * s_q_h + t * s_q_t
        tl.store(dst + o, cast_rne(r1, q_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF + o, cast_rne(r2, q_ptr.dtype.element_ty), mask=m)
    else:
        j = (head - n_heads).to(tl.int64)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        tl.device_assert((slot >= 0) & (slot < S), "slot out of range")   # only with TRITON_DEBUG=1
        # never write outside the cache. The slot is broadcast to the vector by hand: Triton
        # 3.9's interpreter rejects a mask built as vector & scalar ('mask has unsupported dtype')
        slot_v = o * 0 + slot
        ok = m & (slot_v >= 0) & (slot_v < S)
        kd = k_cache_ptr + b * s_kc_b + j * s_kc_h + slot * s_kc_s
        tl.store(kd + o, cast_rne(r1, k_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(kd + HALF + o, cast_rne(r2, k_cache_ptr.dtype.element_ty), mask=ok)
        vs = row + (n_heads + n_kv + j) * (2 * HALF)
        v1 = tl.load(vs + o, mask=m, other=0.0)
        v2 = tl.load(vs + HALF + o, mask=m, other=0.0)
        vd = v_cache_ptr + b * s_vc_b + j * s_vc_h + slot * s_vc_s
        tl.store(vd + o, cast_rne(v1.to(tl.float32), v_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(vd + HALF + o, cast_rne(v2.to(tl.float32), v_cache_ptr.dtype.element_ty), mask=ok)


def rope_and_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         n_heads: int, n_kv: int, q_norm: torch.Tensor | None = None,
                         k_norm: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """qkv (B, T, (h + 2*n_kv)*hd): the fused projection, rows q | k | v; cos, sin (B, T, hd)
    (a stride-0 batch dim is fine); slots (T,) int cache slots shared by the batch;
    k_cache, v_cache (B, n_kv, S, hd), written in place at the slots (rotated k, v);
    q_norm, k_norm (hd,), both or neither: RMSNorm (eps) over every q and k head before RoPE.
    Returns q (B, h, T, hd) rotated, contiguous, in qkv's dtype. Every last dim needs unit stride.
    Out-of-range slots are not written (and trip a device assert under TRITON_DEBUG=1)."""
    check_tensor("qkv", qkv, ndim=3, dtypes=FLOATS)
    B, T, W = qkv.shape
    if n_heads <= 0 or n_kv <= 0 or W % (n_heads + 2 * n_kv):
        raise ValueError(f"qkv width {W} is not (n_heads + 2*n_kv) * hd with n_heads={n_heads}, n_kv={n_kv}")
    hd = W // (n_heads + 2 * n_kv)
    if hd % 2:
        raise ValueError(f"head_dim {hd} must be even for rotate_half RoPE")
    check_tensor("cos", cos, ndim=3, dtypes=FLOATS, shape=(B, T, hd))
    check_tensor("sin", sin, ndim=3, dtypes=FLOATS, shape=(B, T, hd))
    check_tensor("slots", slots, ndim=1, dtypes=INTS, shape=(T,))
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOATS, shape=(B, n_kv, None, hd))
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOATS, shape=tuple(k_cache.shape))
    check_device(("qkv", qkv), ("cos", cos), ("sin", sin), ("slots", slots),
                 ("k_cache", k_cache), ("v_cache", v_cache))
    for n, t in (("qkv", qkv), ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_contiguous(n, t)
    slots = slots.contiguous()
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together: pass both or neither")
    qk_norm = q_norm is not None
    if qk_norm:
        check_tensor("q_norm", q_norm, ndim=1, dtypes=FLOATS, shape=(hd,))
        check_tensor("k_norm", k_norm, ndim=1, dtypes=FLOATS, shape=(hd,))
        check_device(("qkv", qkv), ("q_norm", q_norm), ("k_norm", k_norm))
        q_norm, k_norm = q_norm.contiguous(), k_norm.contiguous()
    S = k_cache.shape[2]
    q = torch.empty((B, n_heads, T, hd), dtype=qkv.dtype, device=qkv.device)
    if B * T:
        _rope_cache_kernel[(B * T, n_heads + n_kv)](
            qkv, cos, sin, slots, k_cache, v_cache, q,
            q_norm if qk_norm else qkv, k_norm if qk_norm else qkv,
            T, S, n_heads, n_kv, float(eps),
            qkv.stride(0), qkv.stride(1),
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            q.stride(0), q.stride(1), q.stride(2),
            HALF=hd // 2, BLOCK_H=next_pow2(hd // 2), QK_NORM=qk_norm, USE_GDC=pdl(),
            num_warps=1 if hd <= 128 else 2, launch_pdl=pdl(),
        )
    return q


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rms_norm_ref(x, w, eps):
    """koala.model.RMSNorm's PyTorch path: fp32 statistics (fp64 for fp64 x), rounded to x's
    dtype, times w."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_and_cache_write_ref(qkv, cos, sin, slots, k_cache, v_cache, n_heads: int, n_kv: int,
                             q_norm=None, k_norm=None, eps: float = 1e-6):
    """koala.model.Attention's q/k norm (if given), RoPE and KVCache.write, as plain ops (writes
    the caches too)."""
    B, T, W = qkv.shape
    hd = W // (n_heads + 2 * n_kv)
    q, k, v = qkv.split([n_heads * hd, n_kv * hd, n_kv * hd], dim=-1)
    q, k = q.view(B, T, n_heads, hd), k.view(B, T, n_kv, hd)
    if q_norm is not None:
        q, k = _rms_norm_ref(q, q_norm, eps), _rms_norm_ref(k, k_norm, eps)
    q = q.transpose(1, 2)
    k = k.transpose(1, 2)
    v = v.view(B, T, n_kv, hd).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
    return q
