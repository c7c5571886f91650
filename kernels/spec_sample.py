"""Speculative sampling's acceptance along a drafted chain, in three short launches.

    accept_sampling_chain(logits, q, tokens, u, noise, temperature, a_out=None, bonus_out=None,
                          q_logits=False)  -> (accepted, bonus): int64 scalars

Terms (koala/speculative.py uses the same): the chain has N = d + 1 nodes; node 0 is the root
(the last accepted token) and node j + 1 holds the drafted token tokens[j + 1], drawn from the
draft's distribution q[j] (V probabilities, already warped). The target's logits[j] (V) give its
next-token distribution after node j, p[j] = softmax(logits[j] / temperature). Speculative
sampling accepts drafted token x = tokens[j + 1] when u[j] * q[j, x] < p[j, x] (u uniform in
[0, 1), i.e. with probability min(1, p/q)), level after level until the first rejection; `accepted`
is the number of leading drafted tokens accepted (0..d). The bonus token is then drawn from the
residual max(0, p[a] - q[a]) renormalised (a = accepted < d; from p[a] itself should the residual
vanish, p = q), or from p[d] when every draft was accepted. The draw is an exponential race:
argmax over v of w[v] / noise[v] with noise ~ Exp(1) is an exact sample from w / sum(w), and needs
no normalisation, no sort and no host synchronisation.

Why a kernel: the PyTorch version (SpeculativeDecoder._accept_sampling, which also serves trees)
is some 70 operations over the 49,152-entry vocabulary at chain depth 1, each its own launch; in
a CUDA graph they made a sampled iteration's verify 0.14 ms longer than a greedy one on the H200
(bench/results/mtbench_sampling_prefill_graphs_86f5fbf.json). Here:
  1. (rows x chunks) programs reduce BLOCK columns of each row to a running max and sum of exp;
  2. (chunks) programs each combine those into every row's softmax constants, decide the
     acceptance (a handful of gathers), and race their own chunk of the bonus row: the first
     maximum of residual / noise, the largest residual, and the first maximum of p / noise;
  3. one program picks the race's winner over chunks (smallest index among equal keys, as
     torch.argmax) and writes both results.
Temperature-only warping: top-k / top-p sampling keeps the PyTorch path.
q_logits=True: q holds the draft's raw logits instead of its probabilities, and q[j] =
softmax(q_logits[j] / temperature) is formed here (launch 1 reduces those rows too), so a sampled
draft that draws by Gumbel-max (kernels/argmax.py, gumbel_argmax) never materialises its q.
q_ids (V,) int32: q's columns are a draft vocabulary of Vq tokens (koala.heads DraftHead.set_draft_vocab)
and q_ids[v] is token v's column there, or -1 (q = 0: the draft never proposes v). Both kernels then
read q through that map, so a draft over a subset never scatters its q onto all V tokens.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOATS, INTS, check_device, check_last_contiguous, check_tensor, next_pow2, pdl
from ._tl import pdl_wait

BLOCK = 2048                        # columns a program: 24 chunks for SmolLM2's 49,152 tokens
_BIG = tl.constexpr(2 ** 31 - 1)


@triton.jit
def _row_stats_kernel(logits_ptr, q_ptr, t_ptr, m_ptr, s_ptr, N, V, VQ, P, stride_l, stride_q,
                      BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    """Rows 0..N-1: the target's logits (V columns); rows N.. (q_logits only): the draft's
    logits (VQ columns; a chunk past them stores max -inf and sum 0)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    pdl_wait(USE_GDC)
    t = tl.load(t_ptr).to(tl.float32)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < tl.where(row < N, V, VQ)
    # both branches fp32: the two tensors' dtypes may differ (bf16 logits, fp32 probabilities q),
    # and Triton needs one type for x after the branch (the CPU interpreter does not check that)
    if row < N:
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_l + cols, mask=valid, other=float("-inf")).to(tl.float32)
    else:
        x = tl.load(q_ptr + (row - N).to(tl.int64) * stride_q + cols, mask=valid, other=float("-inf")).to(tl.float32)
    x = x / t
    m = tl.max(x, axis=0)
    # a draft row's chunk past its VQ columns holds no value: max -inf, sum 0 (no -inf - -inf)
    s = tl.sum(tl.where(valid, tl.exp(x - tl.where(m > float("-inf"), m, 0.0)), 0.0), axis=0)
    tl.store(m_ptr + row * P + chunk, m)
    tl.store(s_ptr + row * P + chunk, s)


@triton.jit
def _softmax_consts(m_ptr, s_ptr, N, P, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """Every row's max M (BLOCK_N,) and sum of exp(x - M) S, combined over the chunks."""
    r = tl.arange(0, BLOCK_N)[:, None]
    c = tl.arange(0, BLOCK_P)[None, :]
    ok = (r < N) & (c < P)
    m = tl.load(m_ptr + r * P + c, mask=ok, other=-1e30)          # finite: no inf - inf
    s = tl.load(s_ptr + r * P + c, mask=ok, other=0.0)
    M = tl.max(m, axis=1)
    S = tl.sum(tl.where(ok, s * tl.exp(m - M[:, None]), 0.0), axis=1)
    return M, S


@triton.jit
def _race_kernel(logits_ptr, q_ptr, tok_ptr, u_ptr, e_ptr, t_ptr, m_ptr, s_ptr,
                 a_ptr, rv_ptr, ri_ptr, rmax_ptr, pv_ptr, pi_ptr,
                 ids_ptr, N, V, P, stride_l, stride_q, stride_u,
                 Q_LOGITS: tl.constexpr, Q_IDS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                 USE_GDC: tl.constexpr):
    chunk = tl.program_id(0)
    pdl_wait(USE_GDC)
    t = tl.load(t_ptr).to(tl.float32)
    M, S = _softmax_consts(m_ptr, s_ptr, N, P, BLOCK_N, BLOCK_P)
    if Q_LOGITS:   # the draft rows' constants, stored after the target's N rows
        MQ, SQ = _softmax_consts(m_ptr + N * P, s_ptr + N * P, N - 1, P, BLOCK_N, BLOCK_P)
    # acceptance at every level j = 0..N-2: drafted token tokens[j+1] against p[j] and q[j]
    j = tl.arange(0, BLOCK_N)
    lev = j < N - 1
    x = tl.load(tok_ptr + j + 1, mask=lev, other=0)
    lx = tl.load(logits_ptr + j.to(tl.int64) * stride_l + x, mask=lev, other=0.0).to(tl.float32)
    px = tl.exp(tl.where(lev, lx / t - M, float("-inf"))) / tl.where(lev, S, 1.0)   # 0 off the chain
    if Q_IDS:   # the drafted token's column in the draft vocabulary (-1: outside it, q = 0)
        xq = tl.load(ids_ptr + x, mask=lev, other=-1)
    else:
        xq = x
    inq = lev & (xq >= 0)
    qx = tl.load(q_ptr + j.to(tl.int64) * stride_q + xq, mask=inq, other=0.0).to(tl.float32)
    if Q_LOGITS:
        qx = tl.exp(tl.where(inq, qx / t - MQ, float("-inf"))) / tl.where(lev, SQ, 1.0)
    u = tl.load(u_ptr + j * stride_u, mask=lev, other=0.0)
    rejected = lev & ~(u * qx < px)
    a = tl.min(tl.where(rejected, j, N - 1), axis=0)           # first rejected level, else d
    if chunk == 0:
        tl.store(a_ptr, a.to(tl.int64))
    Ma = tl.sum(tl.where(j == a, M, 0.0), axis=0)
    Sa = tl.sum(tl.where(j == a, S, 0.0), axis=0)
    # this chunk of the bonus row a: residual (a < d) and p itself, each raced against the noise
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < V
    la = tl.load(logits_ptr + a.to(tl.int64) * stride_l + cols, mask=valid, other=float("-inf"))
    p = tl.exp(la.to(tl.float32) / t - Ma) / Sa
    e = tl.load(e_ptr + cols, mask=valid, other=1.0)
    has_q = (cols * 0 + a) < N - 1                              # (BLOCK,): a block, not a scalar
    if Q_IDS:
        cq = tl.load(ids_ptr + cols, mask=valid & has_q, other=-1)
    else:
        cq = cols
    inq = valid & has_q & (cq >= 0)
    q = tl.load(q_ptr + a.to(tl.int64) * stride_q + cq, mask=inq, other=0.0).to(tl.float32)
    if Q_LOGITS:
        MQa = tl.sum(tl.where(j == a, MQ, 0.0), axis=0)
        SQa = tl.sum(tl.where(j == a, SQ, 0.0), axis=0)
        q = tl.exp(tl.where(inq, q / t - MQa, float("-inf"))) / tl.where(SQa > 0, SQa, 1.0)
    resid = tl.where(valid & has_q, tl.maximum(p - q, 0.0), 0.0)
    kr = tl.where(valid, resid / e, -1.0)
    kp = tl.where(valid, p / e, -1.0)
    vr = tl.max(kr, axis=0)
    vp = tl.max(kp, axis=0)
    tl.store(rv_ptr + chunk, vr)
    tl.store(ri_ptr + chunk, tl.min(tl.where(kr == vr, cols, _BIG), axis=0))
    tl.store(rmax_ptr + chunk, tl.max(resid, axis=0))
    tl.store(pv_ptr + chunk, vp)
    tl.store(pi_ptr + chunk, tl.min(tl.where(kp == vp, cols, _BIG), axis=0))


@triton.jit
def _pick_kernel(rv_ptr, ri_ptr, rmax_ptr, pv_ptr, pi_ptr, bonus_ptr, P,
                 BLOCK_P: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    c = tl.arange(0, BLOCK_P)
    ok = c < P
    use_resid = tl.max(tl.load(rmax_ptr + c, mask=ok, other=0.0), axis=0) > 0.0
    vr = tl.load(rv_ptr + c, mask=ok, other=-1.0)
    vp = tl.load(pv_ptr + c, mask=ok, other=-1.0)
    v = tl.where(use_resid, vr, vp)
    i = tl.where(use_resid, tl.load(ri_ptr + c, mask=ok, other=_BIG), tl.load(pi_ptr + c, mask=ok, other=_BIG))
    best = tl.max(v, axis=0)
    # chunks hold increasing columns: the smallest index among the chunks at the maximum
    tl.store(bonus_ptr, tl.min(tl.where(ok & (v == best), i, _BIG), axis=0).to(tl.int64))


def accept_sampling_chain(logits: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, u: torch.Tensor,
                          noise: torch.Tensor, temperature: torch.Tensor,
                          a_out: torch.Tensor | None = None, bonus_out: torch.Tensor | None = None,
                          q_logits: bool = False, q_ids: torch.Tensor | None = None):
    """logits (N, V) float (the target's, unwarped), q (>= N-1, V) fp32 draft probabilities
    (q_logits=True: the draft's unwarped logits, any float dtype, softmaxed here at temperature;
    q_ids (V,) int32: q has Vq columns instead, a draft vocabulary, and q_ids maps tokens to them),
    tokens (N,) int (tokens[0] the root), u (>= N-1,) fp32 uniforms (a strided view is fine),
    noise (V,) fp32 Exp(1) draws, temperature a one-element fp32 tensor (> 0). Returns
    (accepted, bonus) as 0-dim int64 tensors (a_out / bonus_out if given: static buffers)."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOATS)
    check_tensor("q", q, ndim=2, dtypes=FLOATS if q_logits else (torch.float32,))
    check_tensor("tokens", tokens, ndim=1, dtypes=INTS)
    check_tensor("u", u, ndim=1, dtypes=(torch.float32,))
    check_tensor("noise", noise, ndim=1, dtypes=(torch.float32,))
    check_tensor("temperature", temperature, dtypes=(torch.float32,))
    for name, t in (("logits", logits), ("q", q), ("noise", noise)):
        check_last_contiguous(name, t)
    N, V = logits.shape
    if N < 1 or V < 1:
        raise ValueError(f"logits must be (N >= 1, V >= 1), got {tuple(logits.shape)}")
    Vq = V
    if q_ids is not None:
        check_tensor("q_ids", q_ids, ndim=1, dtypes=(torch.int32,), shape=(V,))
        if not q_ids.is_contiguous():
            raise ValueError("q_ids must be contiguous")
        Vq = q.shape[1]
        if not 1 <= Vq <= V:
            raise ValueError(f"q must have 1 to V = {V} columns (a draft vocabulary), got {tuple(q.shape)}")
    if q.shape[1] != Vq or q.shape[0] < N - 1 or tokens.shape[0] != N or u.shape[0] < N - 1 or noise.shape[0] != V:
        raise ValueError(f"shapes disagree: logits {tuple(logits.shape)}, q {tuple(q.shape)}, tokens "
                         f"{tuple(tokens.shape)}, u {tuple(u.shape)}, noise {tuple(noise.shape)}")
    if temperature.numel() != 1:
        raise ValueError(f"temperature must hold one value, got shape {tuple(temperature.shape)}")
    if not tokens.is_contiguous():
        raise ValueError("tokens must be contiguous")
    dev = logits.device
    a_out = torch.empty((), dtype=torch.int64, device=dev) if a_out is None else a_out
    bonus_out = torch.empty((), dtype=torch.int64, device=dev) if bonus_out is None else bonus_out
    for name, t in (("a_out", a_out), ("bonus_out", bonus_out)):
        check_tensor(name, t, dtypes=(torch.int64,))
        if t.numel() != 1:
            raise ValueError(f"{name} must hold one int64, got shape {tuple(t.shape)}")
    check_device(("logits", logits), ("q", q), ("tokens", tokens), ("u", u), ("noise", noise),
                 ("temperature", temperature), ("a_out", a_out), ("bonus_out", bonus_out),
                 *((("q_ids", q_ids),) if q_ids is not None else ()))
    P = triton.cdiv(V, BLOCK)
    f32 = dict(dtype=torch.float32, device=dev)
    stat_rows = N + (N - 1 if q_logits else 0)      # the draft's rows after the target's
    m, s = torch.empty(stat_rows * P, **f32), torch.empty(stat_rows * P, **f32)
    rv, rmax, pv = torch.empty(P, **f32), torch.empty(P, **f32), torch.empty(P, **f32)
    ri, pi = torch.empty(P, dtype=torch.int32, device=dev), torch.empty(P, dtype=torch.int32, device=dev)
    q_rows = q if q.shape[0] > 0 else q.new_zeros(1, Vq)
    u_vec = u if u.shape[0] > 0 else u.new_zeros(1)
    BN, BP = next_pow2(N), next_pow2(P)
    _row_stats_kernel[(stat_rows, P)](logits, q_rows, temperature, m, s, N, V, Vq, P, logits.stride(0),
                                      q_rows.stride(0), BLOCK=BLOCK, USE_GDC=pdl(), num_warps=4,
                                      launch_pdl=pdl())
    _race_kernel[(P,)](logits, q_rows, tokens, u_vec, noise, temperature, m, s, a_out, rv, ri, rmax, pv, pi,
                       tokens if q_ids is None else q_ids, N, V, P, logits.stride(0), q_rows.stride(0),
                       u_vec.stride(0), Q_LOGITS=q_logits, Q_IDS=q_ids is not None, BLOCK=BLOCK, BLOCK_N=BN, BLOCK_P=BP, USE_GDC=pdl(), num_warps=4, launch_pdl=pdl())
    _pick_kernel[(1,)](rv, ri, rmax, pv, pi, bonus_out, P, BLOCK_P=BP, USE_GDC=pdl(), num_warps=1,
                       launch_pdl=pdl())
    return a_out, bonus_out


def accept_sampling_chain_ref(logits, q, tokens, u, noise, temperature, q_logits: bool = False,
                              q_ids=None):
    """The same in PyTorch, formula by formula (float32)."""
    N, V = logits.shape
    if q_logits:
        q = torch.softmax(q.float() / temperature.float(), dim=-1)
    if q_ids is not None:   # onto all V tokens, zero outside the draft vocabulary
        ids = q_ids.long()
        q = torch.where(ids >= 0, q[:, ids.clamp_min(0)], 0.0)
    d = N - 1
    p = torch.softmax(logits.float() / temperature.float(), dim=-1)              # (N, V)
    j = torch.arange(d, device=logits.device)
    x = tokens[1:].long()
    rejected = ~(u[:d] * q[j, x] < p[j, x])
    a = torch.where(rejected.any(), rejected.int().argmax(), torch.tensor(d, device=logits.device)) \
        if d > 0 else torch.zeros((), dtype=torch.long, device=logits.device)
    pa = p[a]
    resid = (pa - q[a.clamp_max(max(q.shape[0] - 1, 0))]).clamp_min(0) if d > 0 else torch.zeros_like(pa)
    use_resid = (a < d) & (resid.max() > 0)
    w = torch.where(use_resid, resid, pa)
    return a.long(), (w / noise).argmax().long()
