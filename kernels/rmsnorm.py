"""RMSNorm: y = w * (x * rsqrt(mean(x^2) + eps)), the mean and scaling in fp32.

Numerics follow koala.model.RMSNorm exactly: normalise in fp32, round to x.dtype, then multiply
by the weight (in the promoted dtype of x and w). One program per row; a row of D <= 8192
elements fits in registers, so x is read once and y written once: 2*M*D*bytes of traffic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOATS, check_device, check_last_contiguous, check_tensor, next_pow2, pdl
from ._tl import cast_rne, pdl_wait


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, y_ptr,          # pointers
    D, eps,                       # sizes
    stride_xm, stride_ym,         # strides (last dim is unit stride)
    BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr,  # constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)   # a constant: before the wait
    pdl_wait(USE_GDC)              # before any read of activations or any store
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    # round to x's dtype before the weight, as the reference does (bit-identical in bf16)
    xn = cast_rne(x * rstd, x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + cols, cast_rne(xn * w, y_ptr.dtype.element_ty), mask=mask)


def _num_warps(D: int) -> int:
    # 4 warps hold up to 2048 fp32 per program (16 per thread); wider rows get 8 or 16 warps so a
    # thread never holds more than 32 values (D=4096 -> 8 warps, 16 values each)
    return 4 if D <= 2048 else (8 if D <= 8192 else 16)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) float, unit stride in the last dim; w (D,). Returns y (..., D) in
    promote_types(x.dtype, w.dtype) (= x.dtype when the weight has x's dtype, as in the model)."""
    check_tensor("x", x, dtypes=FLOATS)
    check_tensor("w", w, ndim=1, dtypes=FLOATS)
    if x.dim() < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)}: last dims differ")
    check_device(("x", x), ("w", w))
    check_last_contiguous("x", x)
    check_last_contiguous("w", w)
    D = w.shape[0]
    if D > 65536:
        raise ValueError(f"D={D} > 65536: a row no longer fits one program")
    x2 = x.reshape(-1, D)                                   # (M, D): a view when x's rows are evenly strided
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)
    M = x2.shape[0]
    if M:
        _rms_norm_kernel[(M,)](
            x2, w, y,
            D, float(eps),
            x2.stride(0), y.stride(0),
            BLOCK_D=next_pow2(D), USE_GDC=pdl(), num_warps=_num_warps(D), launch_pdl=pdl(),
        )
    return y.view(x.shape)


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """koala.model.RMSNorm.forward, as plain ops."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, s_ptr, y_ptr,               # pointers
    D, eps,                                          # sizes
    stride_xm, stride_rm, stride_sm, stride_ym,      # strides (last dim unit stride)
    BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr,    # constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)   # a constant: before the wait
    pdl_wait(USE_GDC)              # before any read of activations or any store
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
    # the residual sum is rounded to its dtype first, as `x + r` in PyTorch is
    s = cast_rne(x + r, s_ptr.dtype.element_ty)
    tl.store(s_ptr + row * stride_sm + cols, s, mask=mask)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / D + eps)
    xn = cast_rne(sf * rstd, s_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + cols, cast_rne(xn * w, y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float):
    """The residual add and the next norm in one launch: returns (s = x + r, rms_norm(s, w, eps)).
    x, r (..., D) of one dtype, unit last stride; w (D,). Saves one launch and one read of s per
    norm: 2 per decoder layer (60 launches a SmolLM2 step)."""
    check_tensor("x", x, dtypes=FLOATS)
    check_tensor("r", r, dtypes=(x.dtype,), shape=tuple(x.shape))
    if r.shape != x.shape:
        raise ValueError(f"r {tuple(r.shape)} and x {tuple(x.shape)} differ")
    check_tensor("w", w, ndim=1, dtypes=FLOATS)
    if x.dim() < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)}: last dims differ")
    check_device(("x", x), ("r", r), ("w", w))
    for n, t in (("x", x), ("r", r), ("w", w)):
        check_last_contiguous(n, t)
    D = w.shape[0]
    if D > 65536:
        raise ValueError(f"D={D} > 65536: a row no longer fits one program")
    x2, r2 = x.reshape(-1, D), r.reshape(-1, D)
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](
            x2, r2, w, s, y,
            D, float(eps),
            x2.stride(0), r2.stride(0), s.stride(0), y.stride(0),
            BLOCK_D=next_pow2(D), USE_GDC=pdl(), num_warps=_num_warps(D), launch_pdl=pdl(),
        )
    return s.view(x.shape), y.view(x.shape)


def add_rms_norm_ref(x, r, w, eps: float):
    s = x + r
    return s, rms_norm_ref(s, w, eps)
