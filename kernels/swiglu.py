"""SwiGLU activation over the fused gate|up projection: y = silu(gu[:, :I]) * gu[:, I:].

In the model this is 3 eager ops (split views, silu, mul: 2 launches and an (M, I) temporary);
here one launch reads 2*M*I and writes M*I elements, computing in fp32 and rounding once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import FLOATS, check_device, check_last_contiguous, check_tensor, pdl
from ._tl import cast_rne, pdl_wait, sigmoid


@triton.jit
def _silu_mul_kernel(
    gu_ptr, y_ptr,                # pointers
    I,                            # sizes
    stride_gm, stride_ym,         # strides (last dim unit stride)
    BLOCK: tl.constexpr, USE_GDC: tl.constexpr,  # constexpr
):
    pdl_wait(USE_GDC)              # before any read of activations or any store
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(gu_ptr + row * stride_gm + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gm + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * sigmoid(g) * u
    tl.store(y_ptr + row * stride_ym + cols, cast_rne(y, y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu (..., 2I) float, unit stride in the last dim -> y (..., I) in gu's dtype."""
    check_tensor("gu", gu, dtypes=FLOATS)
    check_device(("gu", gu))
    if gu.dim() < 1 or gu.shape[-1] % 2:
        raise ValueError(f"gu has shape {tuple(gu.shape)}: the last dim must be 2*I (gate | up)")
    check_last_contiguous("gu", gu)
    I = gu.shape[-1] // 2
    g2 = gu.reshape(-1, 2 * I)                                # (M, 2I)
    y = torch.empty((g2.shape[0], I), dtype=gu.dtype, device=gu.device)
    # 1024 columns per program: I=1536 (SmolLM2) -> 2 programs a row, I=11008 (7B) -> 11, enough
    # programs to fill 132 SMs from M=12 rows on; each thread moves 8 elements (4 warps)
    BLOCK = min(1024, triton.next_power_of_2(max(I, 1)))
    if g2.shape[0] and I:
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(I, BLOCK))](
            g2, y,
            I,
            g2.stride(0), y.stride(0),
            BLOCK=BLOCK, USE_GDC=pdl(), num_warps=4, launch_pdl=pdl(),
        )
    return y.view(*gu.shape[:-1], I)


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    """koala.model.FeedForward's activation, as plain ops."""
    gate, up = gu.split(gu.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up
