"""Fused Medusa/KOALA ResBlock stacks: H heads x K layers of y <- y + SiLU(y W^T + b).

The unfused head costs 3 launches per (head, layer) (addmm, silu, add): 24 for H=4, K=2. Layer
k+1 needs every column of layer k's output, so a layer cannot start before the previous one has
finished on all programs; this module therefore launches once per layer, each launch doing all H
heads: K launches in all (2 for K=2, 12x fewer). Between layers y stays in fp32 (an (H, M, D)
scratch of 4*H*M*D bytes, 9 KB at H=4, M=1, D=576), so the result is closer to exact than the
reference, which rounds to the weights' dtype three times per layer.

Each program computes a (BLOCK_M, BLOCK_N) tile of one head's layer output with tl.dot over
D in BLOCK_K steps: at decode M is 1..64 rows, so the work is reading W (D*D per head and layer,
0.66 MB in bf16 at D=576, 33.5 MB at D=4096) and the tile sizes choose how many programs share
that read (see _config).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (FLOATS, check_device, check_last_contiguous, check_tensor, interpreting,
                      next_pow2, pdl)
from ._tl import cast_rne, dot_acc, pdl_wait, sigmoid


@triton.jit
def _resblock_layer_kernel(
    y_ptr, w_ptr, b_ptr, out_ptr,                    # pointers
    M, D,                                            # sizes
    s_y_h, s_y_m, s_w_h, s_w_n, s_b_h, s_o_h, s_o_m,  # strides (all last dims unit)
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,  # constexpr
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr,
):
    # an MMA kernel (BLOCK_M >= 16, W streamed over a pipelined K loop), not a GEMV: it waits at
    # the start; layer k+1 reads layer k's output, so the wait also orders the K launches
    pdl_wait(USE_GDC)              # before any read of activations or any store
    h = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    m0 = tl.program_id(2) * BLOCK_M
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    y_rows = y_ptr + h * s_y_h + rm[:, None] * s_y_m           # (BLOCK_M, 1)
    w_cols = w_ptr + h * s_w_h + rn[None, :] * s_w_n           # (1, BLOCK_N): W^T's columns
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + rk
        a = tl.load(y_rows + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < D), other=0.0)
        w = tl.load(w_cols + kk[:, None], mask=(kk[:, None] < D) & (rn[None, :] < D), other=0.0)
        # y is fed to the product in W's dtype, as the reference's addmm does
        acc = dot_acc(a.to(w.dtype), w, acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + h * s_b_h + rn, mask=rn < D, other=0.0).to(tl.float32)[None, :]
    out_mask = (rm[:, None] < M) & (rn[None, :] < D)
    res = tl.load(y_rows + rn[None, :], mask=out_mask, other=0.0).to(tl.float32)
    y = res + acc * sigmoid(acc)
    tl.store(out_ptr + h * s_o_h + rm[:, None] * s_o_m + rn[None, :],
             cast_rne(y, out_ptr.dtype.element_ty), mask=out_mask)


def _config(M: int, D: int, H: int):
    """Tile sizes keyed on the sizes. One tile row block covers M <= 64 (tl.dot wants >= 16 rows).
    Narrow column blocks spread the weight read over many SMs: D=576, H=4, BLOCK_N=32 -> 72
    programs; D=4096 -> BLOCK_N=64, 256 programs of 512 KB of W each."""
    BLOCK_M = min(64, max(16, next_pow2(M)))
    BLOCK_N = 32 if D <= 2048 else 64
    BLOCK_K = 64 if BLOCK_M <= 32 else 32
    num_warps = 4
    return BLOCK_M, BLOCK_N, BLOCK_K, num_warps


def medusa_resblocks(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, D); W (H, K, D, D) nn.Linear weights (out, in) of head h's layer k; b (H, K, D) or
    None. Every last dim needs unit stride; all float, x and W of one dtype.
    Returns (H, M, D) in x's dtype (written into `out` when given, e.g. a static graph buffer):
    for each head, y = x; y = y + silu(y @ W[h, k].T + b[h, k]) for k = 0..K-1. K launches."""
    check_tensor("x", x, ndim=2, dtypes=FLOATS)
    M, D = x.shape
    check_tensor("W", W, ndim=4, dtypes=(x.dtype,), shape=(None, None, D, D))
    H, K = W.shape[:2]
    if b is not None:
        check_tensor("b", b, ndim=3, dtypes=FLOATS, shape=(H, K, D))
    if K < 1 or H < 1:
        raise ValueError(f"W has shape {tuple(W.shape)}: need at least one head and one layer")
    named = [("x", x), ("W", W)] + ([("b", b)] if b is not None else [])
    check_device(*named)
    for n, t in named:
        check_last_contiguous(n, t)
    if out is None:
        out = torch.empty((H, M, D), dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, ndim=3, dtypes=FLOATS, shape=(H, M, D))
        check_device(("x", x), ("out", out))
        check_last_contiguous("out", out)
    if M == 0:
        return out
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps = _config(M, D, H)
    grid = (H, triton.cdiv(D, BLOCK_N), triton.cdiv(M, BLOCK_M))
    # fp32 inputs: exact fp32 products, not TF32 (which would be 10x the reference's error)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    scratch = torch.empty((min(K - 1, 2), H, M, D), dtype=torch.float32, device=x.device)
    src, s_src_h, s_src_m = x, 0, x.stride(0)          # layer 0 reads x for every head
    for k in range(K):
        dst = out if k == K - 1 else scratch[k % 2]    # ping-pong: a layer never overwrites its input
        Wk = W[:, k]                                   # (H, D, D) view
        bk = b[:, k] if b is not None else Wk          # dummy pointer when there is no bias
        _resblock_layer_kernel[grid](
            src, Wk, bk, dst,
            M, D,
            s_src_h, s_src_m, Wk.stride(0), Wk.stride(1), bk.stride(0), dst.stride(0), dst.stride(1),
            HAS_BIAS=b is not None, DOT_PRECISION=prec, UPCAST=interpreting(),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, USE_GDC=pdl(),
            num_warps=num_warps, launch_pdl=pdl(),
        )
        src, s_src_h, s_src_m = dst, dst.stride(0), dst.stride(1)
    return out


def medusa_resblocks_ref(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The unfused head: a loop over heads and layers of F.linear, silu, add (3 launches each)."""
    H, K = W.shape[:2]
    outs = []
    for h in range(H):
        y = x
        for k in range(K):
            y = y + F.silu(F.linear(y, W[h, k], None if b is None else b[h, k]))
        outs.append(y)
    return torch.stack(outs)
