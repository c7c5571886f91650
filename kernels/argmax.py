"""Row-wise argmax over a wide last dimension (the vocabulary), in two short launches.

    argmax(x, out=None)  -> int64 (...,): the index of each row's maximum, as torch.argmax(x, -1)
    gumbel_argmax(x, gumbel, temperature, out=None)
                         -> int64 (...,): argmax(x / temperature + gumbel, -1), a draw from
                            softmax(x / temperature) when gumbel holds Gumbel(0, 1) noise

Why: at batch 1 greedy decoding takes one argmax over 49,152 logits per step (and one per drafted
level, and one per verified row). torch's reduction gives such a row to one thread block: 15 us on
the H100 (bench/results/profile_step.txt), 3% of a whole SmolLM2 decode step. Here a first grid of
(rows x chunks) programs reduces BLOCK columns each to a (value, index) pair, and a second grid of
one program per row reduces those pairs: two ~1-2 us launches.

Semantics are torch.argmax's, ties included: the smallest index among equal maxima, and a NaN
counts as larger than every number (the first NaN wins). Each chunk keeps its first maximum; the
second stage keeps the smallest index among the chunks holding the overall maximum, which is the
first maximum of the row. Values are compared in fp32, which is exact for fp16/bf16/fp32 inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOATS, check_device, check_last_contiguous, check_tensor, next_pow2, pdl
from ._tl import pdl_wait

BLOCK = 1024          # columns per first-stage program: 48 programs for a 49,152-entry row
_BIG = tl.constexpr(2 ** 31 - 1)   # an index larger than any real one, for tl.min


@triton.jit
def _first_max(v, idx, valid):
    """(value, index) of the first maximum of v among `valid` entries, NaN counted largest."""
    nan = (v != v) & valid
    has_nan = tl.max(nan.to(tl.int32), axis=0)
    vv = tl.where(valid & (v == v), v, float("-inf"))
    m = tl.max(vv, axis=0)
    hit = tl.where(has_nan > 0, nan, valid & (vv == m))
    i = tl.min(tl.where(hit, idx, _BIG), axis=0)
    m = tl.where(has_nan > 0, float("nan"), m)
    return m, i


@triton.jit
def _argmax_partial_kernel(x_ptr, g_ptr, t_ptr, pv_ptr, pi_ptr, N, P, stride_xm, stride_gm,
                           GUMBEL: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < N
    if GUMBEL:   # the noise and the temperature are not the previous kernel's outputs: load first
        g = tl.load(g_ptr + row.to(tl.int64) * stride_gm + cols, mask=valid, other=0.0)
        t = tl.load(t_ptr).to(tl.float32)
    pdl_wait(USE_GDC)
    v = tl.load(x_ptr + row.to(tl.int64) * stride_xm + cols, mask=valid, other=0.0).to(tl.float32)
    if GUMBEL:
        v = v / t + g
    m, i = _first_max(v, cols, valid)
    tl.store(pv_ptr + row * P + chunk, m)
    tl.store(pi_ptr + row * P + chunk, i)


@triton.jit
def _argmax_final_kernel(pv_ptr, pi_ptr, out_ptr, P, BLOCK_P: tl.constexpr, USE_GDC: tl.constexpr):
    row = tl.program_id(0)
    pdl_wait(USE_GDC)
    r = tl.arange(0, BLOCK_P)
    valid = r < P
    v = tl.load(pv_ptr + row * P + r, mask=valid, other=0.0)
    i = tl.load(pi_ptr + row * P + r, mask=valid, other=_BIG)
    # the partial indices are increasing with r, so the first maximum over chunks is also the
    # smallest index: _first_max over the chunk order, then read that chunk's index
    _, c = _first_max(v, r, valid)
    best = tl.sum(tl.where(r == c, i, 0), axis=0)
    tl.store(out_ptr + row, best.to(tl.int64))


def argmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.argmax(x, dim=-1) in two launches. x (..., N) float, last dim unit stride, rows
    evenly strided (a view is fine); out: an optional int64 tensor of x.shape[:-1] elements to
    write into (a static buffer inside a CUDA graph). Returns int64 (...,)."""
    return _argmax(x, out, None, None)


def gumbel_argmax(x: torch.Tensor, gumbel: torch.Tensor, temperature: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """argmax(x / temperature + gumbel, dim=-1) in argmax's two launches: with Gumbel(0, 1)
    noise, an exact draw from softmax(x / temperature) (the Gumbel-max trick), so a sampled
    draft needs neither its softmax, nor its log, nor the sum with the noise in memory.
    x (..., N) float as argmax's; gumbel fp32 with x's rows and at least N columns (each row
    unit stride; only the first N are read); temperature a one-element fp32 tensor (> 0, read on
    the device, so one CUDA graph serves every temperature). Same ties and NaN as torch.argmax
    of the fp32 sum."""
    check_tensor("gumbel", gumbel, dtypes=(torch.float32,))
    check_tensor("temperature", temperature, dtypes=(torch.float32,))
    if temperature.numel() != 1:
        raise ValueError(f"temperature must hold one value, got shape {tuple(temperature.shape)}")
    check_last_contiguous("gumbel", gumbel)
    if x.dim() < 1:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    rows = x.numel() // max(x.shape[-1], 1)
    g2 = gumbel.reshape(-1, gumbel.shape[-1]) if gumbel.dim() > 0 else gumbel.view(1, 1)
    if g2.shape[0] != rows or g2.shape[1] < x.shape[-1]:
        raise ValueError(f"gumbel has shape {tuple(gumbel.shape)}: it needs {rows} rows of at least "
                         f"{x.shape[-1]} columns (x has shape {tuple(x.shape)})")
    check_device(("x", x), ("gumbel", gumbel), ("temperature", temperature))
    return _argmax(x, out, g2, temperature)


def _argmax(x, out, g2, temperature):
    check_tensor("x", x, dtypes=FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    check_last_contiguous("x", x)
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    M = x2.shape[0]
    if out is None:
        out = torch.empty(x.shape[:-1], dtype=torch.int64, device=x.device)
    else:
        check_tensor("out", out, dtypes=(torch.int64,))
        if out.numel() != M or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous int64 tensor of {M} elements, got shape "
                             f"{tuple(out.shape)}")
    check_device(("x", x), ("out", out))
    if M == 0:
        return out
    P = triton.cdiv(N, BLOCK)
    pv = torch.empty(M * P, dtype=torch.float32, device=x.device)
    pi = torch.empty(M * P, dtype=torch.int32, device=x.device)
    gumbel = g2 is not None
    _argmax_partial_kernel[(M, P)](x2, g2 if gumbel else pv, temperature if gumbel else pv, pv, pi, N, P,
                                   x2.stride(0), g2.stride(0) if gumbel else 0, GUMBEL=gumbel, BLOCK=BLOCK,
                                   USE_GDC=pdl(), num_warps=4, launch_pdl=pdl())
    _argmax_final_kernel[(M,)](pv, pi, out, P, BLOCK_P=next_pow2(P), USE_GDC=pdl(),
                               num_warps=1 if P <= 64 else 4, launch_pdl=pdl())
    return out


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    """What koala ran before: torch's own reduction."""
    return x.argmax(dim=-1)


def gumbel_argmax_ref(x: torch.Tensor, gumbel: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """The same draw in PyTorch, formula by formula (fp32)."""
    N = x.shape[-1]
    return (x.float() / temperature.float() + gumbel.reshape(*x.shape[:-1], -1)[..., :N]).argmax(dim=-1)
