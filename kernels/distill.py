"""Distillation loss for training draft heads: row-wise KL(teacher || draft) over the vocabulary,
its gradient and top-1 agreement, in one launch.

    kl_div_rows(draft, teacher, rows=None, grad=True) -> (kl, grad, agree)
        draft   (N, V) float: the head's logits
        teacher (M, V) float: the target's logits; row i of the draft is compared with
                teacher[rows[i]] (rows (N,) int; None: M == N and rows[i] = i)
        kl      (N,)  fp32: sum_v p_v (log p_v - log q_v), p = softmax(teacher row), q = softmax(draft row)
        grad    (N, V) in draft's dtype: d kl_i / d draft_i = q - p (None when grad=False)
        agree   (N,)  bool: argmax(draft row) == argmax(teacher row), torch.argmax's first-index rule
    fused_kl(draft, teacher, rows) -> (kl, agree): the same as an autograd function (backward
        scales the saved gradient by the incoming one).

Why: the training step of a head compares (N, 49,152) logits with the target's for N ~ 10^4
positions per term. The PyTorch formula (train/losses.py `_kl`, the reference here) casts both to
fp32, takes two log-softmaxes, an exp, a difference and a product, and keeps several fp32 (N, V)
tensors for its backward pass (or recomputes them under checkpointing); with the teacher rows
gathered into a copy first and an argmax of each for the statistics, a Medusa step spent ~60% of
its GPU time there (bench.train_profile on the H100). Here one program per row reads its draft and
teacher rows twice (pass 1: both log-sum-exps online and both argmaxes; pass 2: the KL sum and the
gradient) and writes the gradient once: ~5 N V element accesses in all, no fp32 copy, no gather.

Numerics: everything in fp32 from the loaded values, as the reference does after its casts; only
the summation order differs. Launched without PDL: it runs between torch ops in a training step,
never in a decode chain.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOATS, INTS, check_device, check_last_contiguous, check_tensor
from .argmax import _first_max

BLOCK = 2048     # columns per loop iteration (24 for a 49,152-entry vocabulary)


@triton.jit
def _kl_rows_kernel(d_ptr, t_ptr, rows_ptr, kl_ptr, g_ptr, agree_ptr, V,
                    stride_d, stride_t, stride_g,
                    BLOCK: tl.constexpr, HAS_ROWS: tl.constexpr, WRITE_GRAD: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        r = tl.load(rows_ptr + i).to(tl.int64)
    else:
        r = i
    d_row = d_ptr + i * stride_d
    t_row = t_ptr + r * stride_t
    offs = tl.arange(0, BLOCK)
    # pass 1: running max and sum of exp (rescaled when the max grows), and the first maximum
    m_d = float("-inf")
    s_d = 0.0
    m_t = float("-inf")
    s_t = 0.0
    best_d = float("-inf")
    arg_d = 0
    best_t = float("-inf")
    arg_t = 0
    for start in range(0, V, BLOCK):
        cols = start + offs
        valid = cols < V
        d = tl.load(d_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        bm, bi = _first_max(d, cols, valid)
        take = bm > best_d                       # strict: an equal later maximum is not first
        arg_d = tl.where(take, bi, arg_d)
        best_d = tl.where(take, bm, best_d)
        bm, bi = _first_max(t, cols, valid)
        take = bm > best_t
        arg_t = tl.where(take, bi, arg_t)
        best_t = tl.where(take, bm, best_t)
        new_d = tl.maximum(m_d, tl.max(d, axis=0))
        s_d = s_d * tl.exp(m_d - new_d) + tl.sum(tl.exp(d - new_d), axis=0)
        m_d = new_d
        new_t = tl.maximum(m_t, tl.max(t, axis=0))
        s_t = s_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(t - new_t), axis=0)
        m_t = new_t
    lse_d = m_d + tl.log(s_d)
    lse_t = m_t + tl.log(s_t)
    # pass 2: the KL terms and the gradient q - p
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        valid = cols < V
        d = tl.load(d_row + cols, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=valid, other=0.0).to(tl.float32)
        lq = d - lse_d
        lp = t - lse_t
        p = tl.exp(lp)
        acc += tl.where(valid, p * (lp - lq), 0.0)
        if WRITE_GRAD:
            g = tl.exp(lq) - p
            tl.store(g_ptr + i * stride_g + cols, g.to(g_ptr.dtype.element_ty), mask=valid)
    tl.store(kl_ptr + i, tl.sum(acc, axis=0))
    tl.store(agree_ptr + i, (arg_d == arg_t).to(tl.int8))


def kl_div_rows(draft: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor | None = None,
                grad: bool = True):
    """See the module docstring. draft (N, V) and teacher (M, V) float with unit stride in the
    last dim (evenly strided rows: a view is fine); rows (N,) int32/int64 in [0, M), or None."""
    check_tensor("draft", draft, ndim=2, dtypes=FLOATS)
    check_tensor("teacher", teacher, ndim=2, dtypes=FLOATS)
    check_last_contiguous("draft", draft)
    check_last_contiguous("teacher", teacher)
    N, V = draft.shape
    if teacher.shape[1] != V:
        raise ValueError(f"draft {tuple(draft.shape)} and teacher {tuple(teacher.shape)}: vocabularies differ")
    if V == 0:
        raise ValueError("the vocabulary dimension is empty")
    if rows is None:
        if teacher.shape[0] != N:
            raise ValueError(f"without rows, teacher must have draft's {N} rows, got {teacher.shape[0]}")
    else:
        check_tensor("rows", rows, ndim=1, dtypes=INTS)
        if rows.shape[0] != N:
            raise ValueError(f"rows has {rows.shape[0]} entries for {N} draft rows")
        check_device(("draft", draft), ("teacher", teacher), ("rows", rows))
        rows = rows.contiguous()
    check_device(("draft", draft), ("teacher", teacher))
    dev = draft.device
    kl = torch.empty(N, dtype=torch.float32, device=dev)
    agree = torch.empty(N, dtype=torch.int8, device=dev)
    g = torch.empty((N, V), dtype=draft.dtype, device=dev) if grad else None
    if N:
        _kl_rows_kernel[(N,)](draft, teacher, rows if rows is not None else kl, kl,
                              g if g is not None else kl, agree, V,
                              draft.stride(0), teacher.stride(0), g.stride(0) if g is not None else 0,
                              BLOCK=BLOCK, HAS_ROWS=rows is not None, WRITE_GRAD=grad, num_warps=8)
    return kl, g, agree.bool()


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, draft, teacher, rows):
        kl, g, agree = kl_div_rows(draft, teacher, rows, grad=draft.requires_grad)
        ctx.save_for_backward(g)
        ctx.mark_non_differentiable(agree)
        return kl, agree

    @staticmethod
    def backward(ctx, g_kl, _g_agree):
        (g,) = ctx.saved_tensors
        # multiplied in fp32 and rounded once into g's dtype (the scale itself rounded to bf16 would
        # cost 2^-9 of every gradient), without an fp32 (N, V) temporary
        return torch.mul(g, g_kl.float()[:, None], out=torch.empty_like(g)), None, None


def fused_kl(draft: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor | None = None):
    """Differentiable in draft (the teacher is a constant). Returns kl (N,) fp32, agree (N,) bool."""
    if teacher.requires_grad:
        raise ValueError("the teacher logits must not require grad: the fused KL has no teacher gradient")
    return _FusedKL.apply(draft, teacher, rows)


def kl_div_rows_ref(draft: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor | None = None):
    """The plain PyTorch formula (fp32): kl (N,), agree (N,) bool; autograd gives the gradient."""
    t = teacher if rows is None else teacher[rows]
    logq = torch.log_softmax(draft.float(), dim=-1)
    logp = torch.log_softmax(t.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl, draft.argmax(-1) == t.argmax(-1)
