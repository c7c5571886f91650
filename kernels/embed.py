"""A decode step's inputs in one launch: token embeddings and the RoPE rows of their positions.

    embed_rope(tokens, positions, emb, cos_table, sin_table, features=None)
        -> x (B, T, D) = emb[tokens]   (or (B, T, 2D) = [emb[tokens]; features] for an EAGLE head)
           cos, sin (B, T, hd) = the tables' rows at positions, cast to x's dtype

Why: before the first layer a step ran an embedding gather, two table gathers and two fp32 ->
bf16 casts (and for an EAGLE head a cast and a concatenation more): five to seven tiny PyTorch
launches per forward, each about a microsecond of launch plus its own run under a CUDA graph,
and each a break in the chain of PDL kernels (kernels/_common.py), so the first layer's weight
loads could not start early. Every speculative iteration runs two such forwards (the head's
and the target's) and drafts run one per level.

Nothing is computed: a gather and a round-to-nearest-even cast, the same bits as the PyTorch
reference (`embed_rope_ref`), so exact mode's guarantees are untouched. One program per token
row. Token ids and positions are not range-checked on the device (a CUDA graph cannot raise):
an id outside [0, V) gives a zero row, as does a position outside the tables; the host function
checks shapes and dtypes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOATS, INTS, check_device, check_last_contiguous, check_tensor, next_pow2, pdl
from ._tl import cast_rne, pdl_wait

BLOCK_D = 1024   # embedding columns per loop step of a program


@triton.jit
def _embed_rope_kernel(
    tok_ptr, pos_ptr, emb_ptr, feat_ptr, cos_t_ptr, sin_t_ptr,   # pointers (inputs)
    x_ptr, cos_ptr, sin_ptr,                                     # pointers (outputs)
    V, S, D, HD,                                                 # sizes
    s_emb, s_feat, s_x, s_tab,                                   # row strides
    HAS_FEAT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HD: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    pdl_wait(USE_GDC)              # tokens and positions are written by earlier kernels
    r = tl.program_id(0).to(tl.int64)
    tok = tl.load(tok_ptr + r).to(tl.int64)
    pos = tl.load(pos_ptr + r).to(tl.int64)
    tok_bad = ((tok < 0) | (tok >= V)).to(tl.int32)   # masks are built as vectors below: the
    pos_bad = ((pos < 0) | (pos >= S)).to(tl.int32)   # interpreter refuses a scalar bool in one
    tok = tl.where(tok_bad > 0, 0, tok)
    pos = tl.where(pos_bad > 0, 0, pos)
    out = x_ptr + r * s_x
    for d0 in range(0, D, BLOCK_D):
        o = d0 + tl.arange(0, BLOCK_D)
        m = o < D
        e = tl.load(emb_ptr + tok * s_emb + o, mask=m & ((o * 0 + tok_bad) == 0), other=0.0)
        tl.store(out + o, cast_rne(e.to(tl.float32), x_ptr.dtype.element_ty), mask=m)
        if HAS_FEAT:
            f = tl.load(feat_ptr + r * s_feat + o, mask=m, other=0.0)
            tl.store(out + D + o, cast_rne(f.to(tl.float32), x_ptr.dtype.element_ty), mask=m)
    h = tl.arange(0, BLOCK_HD)
    mh = h < HD
    mp = mh & ((h * 0 + pos_bad) == 0)
    c = tl.load(cos_t_ptr + pos * s_tab + h, mask=mp, other=0.0)
    s = tl.load(sin_t_ptr + pos * s_tab + h, mask=mp, other=0.0)
    tl.store(cos_ptr + r * HD + h, cast_rne(c.to(tl.float32), cos_ptr.dtype.element_ty), mask=mh)
    tl.store(sin_ptr + r * HD + h, cast_rne(s.to(tl.float32), sin_ptr.dtype.element_ty), mask=mh)


def embed_rope(tokens: torch.Tensor, positions: torch.Tensor, emb: torch.Tensor,
               cos_table: torch.Tensor, sin_table: torch.Tensor,
               features: torch.Tensor | None = None, dtype: torch.dtype | None = None):
    """tokens (B, T) int; positions (B, T) int; emb (V, D) float, unit-stride rows; cos_table,
    sin_table (S, hd) float (koala.model.Rotary's fp32 tables); features (B, T, D) float or None.
    dtype: the outputs' dtype (default emb's). Returns x (B, T, D), or (B, T, 2D) holding
    [emb[tokens]; features] when features are given, and cos, sin (B, T, hd), each row cast from
    the table's row at its position. One launch."""
    check_tensor("tokens", tokens, ndim=2, dtypes=INTS)
    B, T = tokens.shape
    check_tensor("positions", positions, ndim=2, dtypes=INTS, shape=(B, T))
    check_tensor("emb", emb, ndim=2, dtypes=FLOATS)
    V, D = emb.shape
    check_tensor("cos_table", cos_table, ndim=2, dtypes=FLOATS)
    check_tensor("sin_table", sin_table, ndim=2, dtypes=FLOATS, shape=tuple(cos_table.shape))
    if cos_table.stride() != sin_table.stride():
        raise ValueError(f"cos_table and sin_table must have the same strides, got {cos_table.stride()} "
                         f"and {sin_table.stride()}")
    S, hd = cos_table.shape
    named = [("tokens", tokens), ("positions", positions), ("emb", emb), ("cos_table", cos_table),
             ("sin_table", sin_table)]
    if features is not None:
        check_tensor("features", features, ndim=3, dtypes=FLOATS, shape=(B, T, D))
        named.append(("features", features))
    check_device(*named)
    for n, t in named[2:]:        # tokens and positions may be any view: they are flattened below
        check_last_contiguous(n, t)
    dt = dtype or emb.dtype
    dev = tokens.device
    tok2 = tokens.reshape(-1)
    pos2 = positions.reshape(-1)
    if not tok2.is_contiguous():
        tok2 = tok2.contiguous()
    if not pos2.is_contiguous():
        pos2 = pos2.contiguous()
    feat2 = None
    if features is not None:
        feat2 = features.reshape(B * T, D)     # a view when the rows are evenly strided
    width = 2 * D if features is not None else D
    x = torch.empty((B * T, width), dtype=dt, device=dev)
    cos = torch.empty((B * T, hd), dtype=dt, device=dev)
    sin = torch.empty((B * T, hd), dtype=dt, device=dev)
    if B * T:
        _embed_rope_kernel[(B * T,)](
            tok2, pos2, emb, feat2 if feat2 is not None else emb, cos_table, sin_table,
            x, cos, sin,
            V, S, D, hd,
            emb.stride(0), feat2.stride(0) if feat2 is not None else 0, x.stride(0), cos_table.stride(0),
            HAS_FEAT=features is not None, BLOCK_D=min(BLOCK_D, next_pow2(D)), BLOCK_HD=next_pow2(hd),
            USE_GDC=pdl(), num_warps=4 if D >= 512 else 1, launch_pdl=pdl(),
        )
    return x.view(B, T, width), cos.view(B, T, hd), sin.view(B, T, hd)


def embed_rope_ref(tokens, positions, emb, cos_table, sin_table, features=None, dtype=None):
    """What koala.model ran before: an embedding gather, two table gathers and their casts (and
    for an EAGLE head the features' cast and a concatenation)."""
    dt = dtype or emb.dtype
    x = torch.nn.functional.embedding(tokens, emb).to(dt)
    if features is not None:
        x = torch.cat([x, features.to(dt)], dim=-1)
    return x, cos_table[positions].to(dt), sin_table[positions].to(dt)
