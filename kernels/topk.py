"""Row-wise top-k over a wide last dimension (the vocabulary) with the log-softmax of the chosen
entries, in two short launches.

    topk_logprobs(x, k, out=None) -> (idx int64 (..., k), logp fp32 (..., k))
        idx: the k largest entries of each row, largest first, ties to the lower index;
        logp: log_softmax(x, -1) at idx, in fp32.

Why: a greedy EAGLE tree ranks each expanded node's children by their log-probabilities. In
PyTorch that is `log_softmax(x.float())` (a cast, a softmax kernel and an fp32 (rows, V) copy)
then `topk` (a radix select of five to eight launches for k <= 16 over 49,152 columns) then a
gather: on the H100 (bench/results/profile_step.txt, a tree of 32 nodes) these took about 300 of
the draft's 1,678 us of kernel time. Here no row is ever written back:
  * stage 1, a grid of (rows x chunks) programs of BLOCK columns: each keeps its chunk's k largest
    (value, index) pairs, and its max and sum of exp(x - max) for the log-sum-exp;
  * stage 2, one program per row: merges the chunks' sums into the row's log-sum-exp and picks
    the row's k largest among the chunks' candidates.
The k largest of a row are among the union of every chunk's k largest, so the merge is exact.
Both stages order (value, index) the same way, largest value first and the lower index among
equal values, so ties resolve as a stable sort of -x does (`topk_logprobs_ref`). Values are
compared in fp32, exact for fp16 / bf16 / fp32 inputs; the log-sum-exp is fp32 (its rounding
differs from torch's one-pass log_softmax by a few ulp: the test's tolerance comes from the fp64
reference). Rows must hold finite values or -inf; NaN and +inf give unspecified picks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOATS, check_device, check_last_contiguous, check_tensor, next_pow2, pdl
from ._tl import pdl_wait

BLOCK = 1024          # columns per first-stage program: 48 programs for a 49,152-entry row
MAX_K = 16            # the widest top-k a tree drafts (koala.speculative: top_k <= 16)
_BIG = tl.constexpr(2 ** 31 - 1)   # an index larger than any real one, for tl.min


@triton.jit
def _take_largest(v, idx, avail):
    """(value, index) of the largest available entry, the lower index among equal values, and
    `avail` without it. With nothing available: (-inf, _BIG) and `avail` unchanged."""
    vv = tl.where(avail, v, float("-inf"))
    m = tl.max(vv, axis=0)
    i = tl.min(tl.where(avail & (vv == m), idx, _BIG), axis=0)
    return m, i, avail & (idx != i)


@triton.jit
def _topk_partial_kernel(x_ptr, cv_ptr, ci_ptr, cm_ptr, cs_ptr,   # pointers
                         N, P, stride_xm,                          # sizes, strides
                         K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < N
    pdl_wait(USE_GDC)
    v = tl.load(x_ptr + row.to(tl.int64) * stride_xm + cols, mask=valid, other=float("-inf")).to(tl.float32)
    # the chunk's log-sum-exp terms; a chunk of -inf only gives (-inf, 0)
    m = tl.max(v, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(valid, tl.exp(v - m_safe), 0.0), axis=0)
    out = (row * P + chunk).to(tl.int64)
    tl.store(cm_ptr + out, m)
    tl.store(cs_ptr + out, s)
    # the chunk's K largest, one selection after another
    slot = tl.arange(0, KP)
    vals = tl.full((KP,), float("-inf"), tl.float32)
    idxs = tl.full((KP,), _BIG, tl.int32)
    avail = valid
    for j in tl.static_range(K):
        mj, ij, avail = _take_largest(v, cols, avail)
        vals = tl.where(slot == j, mj, vals)
        idxs = tl.where(slot == j, ij, idxs)
    tl.store(cv_ptr + out * KP + slot, vals)
    tl.store(ci_ptr + out * KP + slot, idxs)


@triton.jit
def _topk_final_kernel(cv_ptr, ci_ptr, cm_ptr, cs_ptr, oi_ptr, ov_ptr,   # pointers
                       P,                                                   # sizes
                       K: tl.constexpr, KP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                       USE_GDC: tl.constexpr):
    row = tl.program_id(0)
    pdl_wait(USE_GDC)
    base = row.to(tl.int64) * P
    p = tl.arange(0, BLOCK_P)
    pm = p < P
    m = tl.load(cm_ptr + base + p, mask=pm, other=float("-inf"))
    s = tl.load(cs_ptr + base + p, mask=pm, other=0.0)
    mx = tl.max(m, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    lse = mx_safe + tl.log(tl.sum(s * tl.exp(m - mx_safe), axis=0))    # -inf for a row of -inf
    c = tl.arange(0, BLOCK_C)
    cm = c < P * KP
    v = tl.load(cv_ptr + base * KP + c, mask=cm, other=float("-inf"))
    i = tl.load(ci_ptr + base * KP + c, mask=cm, other=_BIG)
    avail = cm & (i != _BIG)
    for j in tl.static_range(K):
        mj, ij, avail = _take_largest(v, i, avail)
        tl.store(oi_ptr + row.to(tl.int64) * K + j, ij.to(tl.int64))
        tl.store(ov_ptr + row.to(tl.int64) * K + j, mj - lse)


def topk_logprobs(x: torch.Tensor, k: int, out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The k largest entries of each row of x (..., N) and their log-softmax values, in two
    launches. x float, last dim unit stride, rows evenly strided (a view is fine); 1 <= k <=
    min(N, 16). out: optional (idx int64, logp fp32) contiguous tensors of x.shape[:-1] + (k,)
    to write into (static buffers inside a CUDA graph). Returns (idx, logp): idx int64 (..., k),
    largest first, ties to the lower index; logp fp32 (..., k) = log_softmax(x.float(), -1) at
    idx."""
    check_tensor("x", x, dtypes=FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    check_last_contiguous("x", x)
    N = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(N, MAX_K):
        raise ValueError(f"k must be an integer in 1..{min(N, MAX_K)} (at most {MAX_K} and the row's "
                         f"{N} entries), got {k!r}")
    x2 = x.reshape(-1, N)
    M = x2.shape[0]
    shape = (*x.shape[:-1], k)
    if out is None:
        idx = torch.empty(shape, dtype=torch.int64, device=x.device)
        logp = torch.empty(shape, dtype=torch.float32, device=x.device)
    else:
        idx, logp = out
        for name, t, dt in (("out[0]", idx, torch.int64), ("out[1]", logp, torch.float32)):
            check_tensor(name, t, dtypes=(dt,))
            if t.numel() != M * k or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous {dt} tensor of {M * k} elements "
                                 f"({M} rows of k={k}), got shape {tuple(t.shape)}")
        check_device(("out[0]", idx), ("out[1]", logp))
    check_device(("x", x), ("out", idx))
    if M == 0:
        return idx, logp
    P = triton.cdiv(N, BLOCK)
    KP = next_pow2(k)
    cv = torch.empty(M * P * KP, dtype=torch.float32, device=x.device)
    ci = torch.empty(M * P * KP, dtype=torch.int32, device=x.device)
    cm = torch.empty(M * P, dtype=torch.float32, device=x.device)
    cs = torch.empty(M * P, dtype=torch.float32, device=x.device)
    _topk_partial_kernel[(M, P)](x2, cv, ci, cm, cs, N, P, x2.stride(0), K=k, KP=KP, BLOCK=BLOCK,
                                 USE_GDC=pdl(), num_warps=4, launch_pdl=pdl())
    _topk_final_kernel[(M,)](cv, ci, cm, cs, idx, logp, P, K=k, KP=KP, BLOCK_P=next_pow2(P),
                             BLOCK_C=next_pow2(P * KP), USE_GDC=pdl(),
                             num_warps=1 if P * KP <= 256 else 4, launch_pdl=pdl())
    return idx, logp


def topk_logprobs_ref(x: torch.Tensor, k: int):
    """The same in PyTorch: a stable sort of -x (ties to the lower index) and log_softmax in fp32."""
    xf = x.float()
    idx = torch.sort(-xf, dim=-1, stable=True).indices[..., :k]
    return idx, torch.log_softmax(xf, dim=-1).gather(-1, idx)
