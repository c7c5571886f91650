"""One level of a greedy EAGLE tree draft's bookkeeping in one launch.

    tree_expand(ctok, clq, feat, front, prefix_len, pool, start, j, nxt=None)

A tree draft (koala/speculative.py, SpeculativeDecoder._draft_eagle) expands its k best nodes
level by level: the head drafts k children for each, and the pool of drafted nodes grows by their
k*k (k for the root) rows. What a level does besides the head's forward and the top-k:
  * writes the new rows of the pool: token, path score (the parent's plus the child's
    log-probability), parent, and ancestor-or-self row (the parent's row plus the node itself);
  * picks the k best of the new children (the next frontier) and makes the next forward's inputs:
    their tokens, the features they are fed with (their parents' predicted features), their cache
    slots L + pool index, their RoPE position L + j, and the attention mask of the next forward
    (the committed prefix, then the pool's slots of each node's ancestors and itself).
In PyTorch these are about 25 launches a level (gathers, slice copies, a mask built from an arange,
a top-k of k*k scores): on the H100 a tree of 32 nodes at depth 6 spent more on them than on the
head's layers (bench/results/profile_trees_*.txt). Here it is one launch of cdiv(W, BLOCK_W)
programs: each selects the k best children itself (k*k <= 256 scores, cheaper than a second
launch) and writes a column chunk of the mask; program 0 also writes the pool rows and the other
inputs. The pool rows written (start ..) never overlap the parents' rows read (< start), so no
program waits for another. `nxt.front` must not be `front` (the programs read one while program 0
writes the other): the caller alternates two buffers.

Ties between equal scores go to the lower child index (child c = parent row c // k, its c % k-th
choice), as a stable sort of -score does (`tree_expand_ref`, the PyTorch reference).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_device, check_tensor, next_pow2, pdl
from ._tl import pdl_wait
from .topk import MAX_K, _take_largest

BLOCK_W = 1024        # mask columns per program
BLOCK_P = 128         # pool columns per step of program 0's ancestor rows
BLOCK_D = 1024        # feature columns per step of program 0's gather


class DraftPool(NamedTuple):
    """The drafted nodes of one iteration (P = k + (depth - 1) * k * k rows)."""
    tok: torch.Tensor       # (P,) int64: the node's token
    score: torch.Tensor     # (P,) fp32: log-probability of its path from the root
    parent: torch.Tensor    # (P,) int64: its parent's row, -1 for the root's children
    depth: torch.Tensor     # (P,) int64: its depth, 1 for the root's children
    anc: torch.Tensor       # (P, P) bool: row i marks i's ancestors in the pool and i itself


class DraftLevel(NamedTuple):
    """The inputs of the head's forward over the next level's k nodes."""
    front: torch.Tensor     # (k,) int64: the nodes' pool rows
    tok: torch.Tensor       # (k,) int64: their tokens
    feat: torch.Tensor      # (k, D): the features fed with them (their parents' predictions)
    slot: torch.Tensor      # (k,) int64: their cache slots, L + pool row
    pos: torch.Tensor       # (k,) int64: their RoPE position, L + j
    mask: torch.Tensor      # (k, W) bool: the slots each may attend


@triton.jit
def _tree_expand_kernel(
    ctok_ptr, clq_ptr, feat_ptr, front_ptr, L_ptr,                        # this level
    ptok_ptr, pscore_ptr, ppar_ptr, pdep_ptr, panc_ptr,                    # the pool
    nfront_ptr, ntok_ptr, nfeat_ptr, nslot_ptr, npos_ptr, mask_ptr,        # the next level
    start, P, W, D, j,                                                     # sizes
    stride_feat, stride_nfeat,                                             # strides
    K: tl.constexpr, C: tl.constexpr, KK: tl.constexpr, KP: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ROOT: tl.constexpr, NEXT: tl.constexpr, USE_GDC: tl.constexpr,
):
    g = tl.program_id(0)
    pdl_wait(USE_GDC)
    L = tl.load(L_ptr).to(tl.int64)
    # the C children: child c is parent row c // K's (c % K)-th choice
    c = tl.arange(0, KK)
    cm = c < C
    if ROOT:
        par = tl.full((KK,), -1, tl.int64)
        base = tl.zeros((KK,), tl.float32)
        dep = tl.full((KK,), 1, tl.int64)
    else:
        par = tl.load(front_ptr + c // K, mask=cm, other=0).to(tl.int64)
        base = tl.load(pscore_ptr + par, mask=cm, other=0.0)
        dep = tl.load(pdep_ptr + par, mask=cm, other=0) + 1
    score = tl.where(cm, base + tl.load(clq_ptr + c, mask=cm, other=0.0), float("-inf"))
    # the K best children, best first (each program selects them: no second launch)
    s = tl.arange(0, KP)
    sm = s < K
    best = tl.zeros((KP,), tl.int32)
    avail = cm
    for i in tl.static_range(K):
        _, bi, avail = _take_largest(score, c, avail)
        best = tl.where(s == i, bi, best)
    node = start + best                                                   # (KP,) their pool rows
    if NEXT:
        if ROOT:
            bpar = tl.full((KP,), -1, tl.int64)
        else:
            bpar = tl.load(front_ptr + best // K, mask=sm, other=0).to(tl.int64)
        # mask columns g * BLOCK_W ..: the prefix, then each node's ancestors and itself
        col = g * BLOCK_W + tl.arange(0, BLOCK_W)
        rel = col.to(tl.int64) - L                                          # pool row of a column
        in_pool = (rel >= 0) & (rel < P)
        relc = tl.where(in_pool, rel, 0)
        own = relc[None, :] == node[:, None].to(tl.int64)
        if ROOT:
            vis = own
        else:
            anc = tl.load(panc_ptr + bpar[:, None] * P + relc[None, :],
                          mask=sm[:, None] & in_pool[None, :], other=0)
            vis = (anc != 0) | own
        m = (col.to(tl.int64) < L)[None, :] | (in_pool[None, :] & vis)
        tl.store(mask_ptr + s[:, None].to(tl.int64) * W + col[None, :], m,
                 mask=sm[:, None] & (col < W)[None, :])
    if g == 0:
        rows = (start + c).to(tl.int64)
        tl.store(ptok_ptr + rows, tl.load(ctok_ptr + c, mask=cm, other=0), mask=cm)
        tl.store(pscore_ptr + rows, score, mask=cm)
        tl.store(ppar_ptr + rows, par, mask=cm)
        tl.store(pdep_ptr + rows, dep, mask=cm)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = cm[:, None] & (p < P)[None, :]
            own_p = p[None, :].to(tl.int64) == rows[:, None]
            if ROOT:
                a = own_p
            else:
                a = (tl.load(panc_ptr + par[:, None] * P + p[None, :], mask=pm, other=0) != 0) | own_p
            tl.store(panc_ptr + rows[:, None] * P + p[None, :], a, mask=pm)
        if NEXT:
            tl.store(nfront_ptr + s, node.to(tl.int64), mask=sm)
            tl.store(ntok_ptr + s, tl.load(ctok_ptr + best, mask=sm, other=0), mask=sm)
            tl.store(nslot_ptr + s, L + node, mask=sm)
            tl.store(npos_ptr + s, tl.zeros((KP,), tl.int64) + L + j, mask=sm)
            src = (best // K).to(tl.int64)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = sm[:, None] & (d < D)[None, :]
                f = tl.load(feat_ptr + src[:, None] * stride_feat + d[None, :], mask=dm, other=0.0)
                tl.store(nfeat_ptr + s[:, None].to(tl.int64) * stride_nfeat + d[None, :], f, mask=dm)


def _check(ctok, clq, feat, front, prefix_len, pool, start, nxt):
    check_tensor("ctok", ctok, ndim=2, dtypes=(torch.int64,))
    R, k = ctok.shape
    if not 1 <= k <= MAX_K:
        raise ValueError(f"ctok has shape {tuple(ctok.shape)}: each row holds k children, 1 <= k <= {MAX_K}")
    check_tensor("clq", clq, ndim=2, dtypes=(torch.float32,), shape=(R, k))
    check_tensor("feat", feat, ndim=2, shape=(R, None))
    if front is None:
        if R != 1:
            raise ValueError(f"the root's level (front=None) has one row of children, got {R}")
    else:
        check_tensor("front", front, ndim=1, dtypes=(torch.int64,), shape=(R,))
    check_tensor("prefix_len", prefix_len, dtypes=(torch.int64,))
    if prefix_len.numel() != 1:
        raise ValueError(f"prefix_len must hold one value, got shape {tuple(prefix_len.shape)}")
    P = pool.tok.shape[0] if pool.tok.dim() == 1 else -1
    check_tensor("pool.tok", pool.tok, ndim=1, dtypes=(torch.int64,))
    check_tensor("pool.score", pool.score, ndim=1, dtypes=(torch.float32,), shape=(P,))
    check_tensor("pool.parent", pool.parent, ndim=1, dtypes=(torch.int64,), shape=(P,))
    check_tensor("pool.depth", pool.depth, ndim=1, dtypes=(torch.int64,), shape=(P,))
    check_tensor("pool.anc", pool.anc, ndim=2, dtypes=(torch.bool,), shape=(P, P))
    if not (isinstance(start, int) and 0 <= start and start + R * k <= P):
        raise ValueError(f"start={start!r}: the level's {R * k} new rows must fit the pool's {P}")
    for name, t in (("ctok", ctok), ("clq", clq), *(("pool." + f, t) for f, t in zip(DraftPool._fields, pool))):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if feat.stride(-1) != 1:
        raise ValueError(f"feat must have unit stride in its last dim, got strides {feat.stride()}")
    named = [("ctok", ctok), ("clq", clq), ("feat", feat), ("prefix_len", prefix_len),
             *(("pool." + f, t) for f, t in zip(DraftPool._fields, pool))]
    if front is not None:
        named.append(("front", front))
    if nxt is not None:
        D = feat.shape[1]
        check_tensor("nxt.front", nxt.front, ndim=1, dtypes=(torch.int64,), shape=(k,))
        check_tensor("nxt.tok", nxt.tok, ndim=1, dtypes=(torch.int64,), shape=(k,))
        check_tensor("nxt.feat", nxt.feat, ndim=2, dtypes=(feat.dtype,), shape=(k, D))
        check_tensor("nxt.slot", nxt.slot, ndim=1, dtypes=(torch.int64,), shape=(k,))
        check_tensor("nxt.pos", nxt.pos, ndim=1, dtypes=(torch.int64,), shape=(k,))
        check_tensor("nxt.mask", nxt.mask, ndim=2, dtypes=(torch.bool,), shape=(k, None))
        if not nxt.mask.is_contiguous() or nxt.feat.stride(-1) != 1:
            raise ValueError("nxt.mask must be contiguous and nxt.feat unit stride in its last dim")
        if front is not None and nxt.front.data_ptr() == front.data_ptr():
            raise ValueError("nxt.front must not be front: the kernel reads one while it writes the other "
                             "(alternate two buffers)")
        named += [("nxt." + f, t) for f, t in zip(DraftLevel._fields, nxt)]
    check_device(*named)
    return R, k, P


def tree_expand(ctok: torch.Tensor, clq: torch.Tensor, feat: torch.Tensor, front: torch.Tensor | None,
                prefix_len: torch.Tensor, pool: DraftPool, start: int, j: int,
                nxt: DraftLevel | None = None) -> None:
    """One level of a greedy tree draft (module docstring), in place.
    ctok (R, k) int64: each expanded node's k children's tokens, best first; clq (R, k) fp32 their
    log-probabilities; feat (R, D): the head's features of the expanded nodes (what their children
    are fed with); front (R,) int64: the expanded nodes' pool rows, or None for the root (R = 1);
    prefix_len: 0-d int64, the root's slot L; pool: rows start .. start + R*k - 1 are written;
    j: the next forward's RoPE position is L + j (a node of depth d is fed at L + d - 1, so j is
    the depth of the nodes expanded here: 0 for the root); nxt: where to write the next
    forward's inputs (mask (k, W) sets the window W), or None after the last level."""
    R, k, P = _check(ctok, clq, feat, front, prefix_len, pool, start, nxt)
    C = R * k
    W = nxt.mask.shape[1] if nxt is not None else 0
    D = feat.shape[1]
    dummy = pool.tok
    n = nxt if nxt is not None else DraftLevel(dummy, dummy, feat, dummy, dummy, pool.anc)
    grid = (max(1, triton.cdiv(W, BLOCK_W)),)
    _tree_expand_kernel[grid](
        ctok, clq, feat, front if front is not None else dummy, prefix_len,
        pool.tok, pool.score, pool.parent, pool.depth, pool.anc,
        n.front, n.tok, n.feat, n.slot, n.pos, n.mask,
        start, P, W, D, j, feat.stride(0), n.feat.stride(0),
        K=k, C=C, KK=next_pow2(C), KP=next_pow2(k), BLOCK_W=BLOCK_W, BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D,
        ROOT=front is None, NEXT=nxt is not None, USE_GDC=pdl(), num_warps=4, launch_pdl=pdl())


def tree_expand_ref(ctok, clq, feat, front, prefix_len, pool: DraftPool, start: int, j: int,
                    nxt: DraftLevel | None = None) -> None:
    """tree_expand in PyTorch, op by op (what SpeculativeDecoder._draft_eagle did before)."""
    R, k = ctok.shape
    C = R * k
    dev = ctok.device
    P = pool.tok.shape[0]
    L = prefix_len.reshape(())
    if front is None:
        par = torch.full((C,), -1, dtype=torch.long, device=dev)
        score = clq.reshape(-1).clone()
        anc = torch.zeros(C, P, dtype=torch.bool, device=dev)
        dep = torch.ones(C, dtype=torch.long, device=dev)
    else:
        par = front.repeat_interleave(k)
        score = pool.score[par] + clq.reshape(-1)
        anc = pool.anc[par]
        dep = pool.depth[par] + 1
    rows = start + torch.arange(C, device=dev)
    anc[torch.arange(C, device=dev), rows] = True
    best = torch.sort(-score, stable=True).indices[:k]                  # ties: the lower child
    node = start + best
    if nxt is not None:
        W = nxt.mask.shape[1]
        ar = torch.arange(W, device=dev)
        m = (ar < L).unsqueeze(0).expand(k, W).clone()
        cols = L + torch.arange(P, device=dev)
        keep = cols < W
        m[:, cols[keep]] = anc[best][:, keep]
        nxt.mask.copy_(m)
        nxt.front.copy_(node)
        nxt.tok.copy_(ctok.reshape(-1)[best])
        nxt.slot.copy_(L + node)
        nxt.pos.fill_(0).add_(L + j)
        nxt.feat.copy_(feat[best // k])
    pool.tok[start:start + C] = ctok.reshape(-1)
    pool.score[start:start + C] = score
    pool.parent[start:start + C] = par
    pool.depth[start:start + C] = dep
    pool.anc[start:start + C] = anc


class DraftTree(NamedTuple):
    """The tree to verify: the root, then the N-1 most likely pool nodes, parents first."""
    tokens: torch.Tensor    # (N,) int64
    parents: torch.Tensor   # (N,) int64: the parent's tree index, -1 for the root
    depth: torch.Tensor     # (N,) int64: 0 for the root
    anc: torch.Tensor       # (N, N) bool: ancestor-or-self, column 0 (the root) set in every row


@triton.jit
def _select_key(pscore_ptr, pdep_ptr, p, pm):
    """The rerank's key of pool rows p: the path score, less 1e-4 a level (shallower first among
    near-equal scores) and 1e-7 a row (earlier drawn first), as tree_select_ref computes it."""
    s = tl.load(pscore_ptr + p, mask=pm, other=float("-inf"))
    d = tl.load(pdep_ptr + p, mask=pm, other=0).to(tl.float32)
    return s - d * 1e-4 - p.to(tl.float32) * 1e-7


@triton.jit
def _tree_select_kernel(
    ptok_ptr, pscore_ptr, ppar_ptr, pdep_ptr, panc_ptr, root_ptr,      # the pool, the root's token
    tok_ptr, par_ptr, dep_ptr, anc_ptr,                                 # the tree
    sel_ptr, idx_ptr,                                                   # scratch (P,) int32 each
    P, N,                                                               # sizes
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, USE_GDC: tl.constexpr,
):
    pdl_wait(USE_GDC)
    # 1. the N-1 rows of largest key: a row is in if fewer than N-1 rows come before it
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < P
        kp = _select_key(pscore_ptr, pdep_ptr, p, pm)
        rank = tl.zeros((BLOCK_P,), tl.int32)
        for q0 in range(0, P, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            qm = q < P
            kq = _select_key(pscore_ptr, pdep_ptr, q, qm)
            before = qm[None, :] & ((kq[None, :] > kp[:, None]) | ((kq[None, :] == kp[:, None]) & (q[None, :] < p[:, None])))
            rank += tl.sum(before.to(tl.int32), axis=1)
        tl.store(sel_ptr + p, (rank < N - 1).to(tl.int32), mask=pm)
    tl.debug_barrier()
    # 2. their tree indices: 1 + rank by (depth, row), so parents come before children
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < P
        dp = tl.load(pdep_ptr + p, mask=pm, other=0)
        rank = tl.zeros((BLOCK_P,), tl.int32)
        for q0 in range(0, P, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            qm = q < P
            sq = tl.load(sel_ptr + q, mask=qm, other=0) != 0
            dq = tl.load(pdep_ptr + q, mask=qm, other=0)
            before = sq[None, :] & ((dq[None, :] < dp[:, None]) | ((dq[None, :] == dp[:, None]) & (q[None, :] < p[:, None])))
            rank += tl.sum(before.to(tl.int32), axis=1)
        tl.store(idx_ptr + p, 1 + rank, mask=pm)
    # the ancestor matrix starts as column 0 (everyone descends from the root)
    n = tl.arange(0, BLOCK_N)
    for i0 in range(0, N, BLOCK_N):
        i = i0 + n
        for j0 in range(0, N, BLOCK_N):
            jj = j0 + n
            tl.store(anc_ptr + i[:, None] * N + jj[None, :], (jj[None, :] == 0) & (i[:, None] >= 0),
                     mask=(i < N)[:, None] & (jj < N)[None, :])
    tl.debug_barrier()
    # 3. the selected rows' token, depth and parent at their tree index, and their ancestors
    root = tl.load(root_ptr)
    tl.store(tok_ptr, root)
    tl.store(par_ptr, tl.full((), -1, tl.int64))
    tl.store(dep_ptr, tl.zeros((), tl.int64))
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < P
        sp = pm & (tl.load(sel_ptr + p, mask=pm, other=0) != 0)
        ip = tl.load(idx_ptr + p, mask=sp, other=0).to(tl.int64)
        tl.store(tok_ptr + ip, tl.load(ptok_ptr + p, mask=sp, other=0), mask=sp)
        tl.store(dep_ptr + ip, tl.load(pdep_ptr + p, mask=sp, other=0), mask=sp)
        pp = tl.load(ppar_ptr + p, mask=sp, other=-1)
        ipp = tl.load(idx_ptr + pp, mask=sp & (pp >= 0), other=0).to(tl.int64)   # the root: 0
        tl.store(par_ptr + ip, ipp, mask=sp)
        for q0 in range(0, P, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            qm = q < P
            sq = qm & (tl.load(sel_ptr + q, mask=qm, other=0) != 0)
            iq = tl.load(idx_ptr + q, mask=sq, other=0).to(tl.int64)
            a = tl.load(panc_ptr + p[:, None].to(tl.int64) * P + q[None, :],
                        mask=sp[:, None] & sq[None, :], other=0) != 0
            tl.store(anc_ptr + ip[:, None] * N + iq[None, :], a, mask=a & sp[:, None] & sq[None, :])


def tree_select(pool: DraftPool, root: torch.Tensor, N: int) -> DraftTree:
    """The rerank of a drafted pool in one launch of one program: the N-1 rows of largest key
    (_select_key: the path score, ties towards shallower then earlier rows), ordered by
    (depth, row), under the root. root: 0-d int64, the root's token; 2 <= N <= P + 1. A pool
    whose scores never rise from parent to child (a greedy draft's: log-probabilities add up)
    gives an ancestor-closed selection, so every parent is in the tree. tree_select_ref is
    the PyTorch formula."""
    P = pool.tok.shape[0]
    for f, t, dt, shape in (("tok", pool.tok, torch.int64, (P,)), ("score", pool.score, torch.float32, (P,)),
                            ("parent", pool.parent, torch.int64, (P,)), ("depth", pool.depth, torch.int64, (P,)),
                            ("anc", pool.anc, torch.bool, (P, P))):
        check_tensor("pool." + f, t, ndim=len(shape), dtypes=(dt,), shape=shape)
        if not t.is_contiguous():
            raise ValueError(f"pool.{f} must be contiguous")
    check_tensor("root", root, dtypes=(torch.int64,))
    if root.numel() != 1:
        raise ValueError(f"root must hold one token, got shape {tuple(root.shape)}")
    if isinstance(N, bool) or not isinstance(N, int) or not 2 <= N <= P + 1:
        raise ValueError(f"N must be an integer in 2..{P + 1} (the root and at most the pool's {P} rows), got {N!r}")
    dev = check_device(*(("pool." + f, t) for f, t in zip(DraftPool._fields, pool)), ("root", root))
    tree = DraftTree(torch.empty(N, dtype=torch.long, device=dev), torch.empty(N, dtype=torch.long, device=dev),
                     torch.empty(N, dtype=torch.long, device=dev), torch.empty(N, N, dtype=torch.bool, device=dev))
    scratch = torch.empty(2, P, dtype=torch.int32, device=dev)
    _tree_select_kernel[(1,)](pool.tok, pool.score, pool.parent, pool.depth, pool.anc, root,
                              *tree, scratch[0], scratch[1], P, N,
                              BLOCK_P=64, BLOCK_Q=64, BLOCK_N=min(next_pow2(N), 64), USE_GDC=pdl(),
                              num_warps=4, launch_pdl=pdl())
    return tree


def tree_select_ref(pool: DraftPool, root: torch.Tensor, N: int) -> DraftTree:
    """tree_select in PyTorch, op by op (SpeculativeDecoder._rerank's formula)."""
    P = pool.tok.shape[0]
    dev = pool.tok.device
    ar = torch.arange(P, device=dev)
    key = pool.score - 1e-4 * pool.depth - 1e-7 * ar
    sel = torch.sort(-key, stable=True).indices[:N - 1]
    sel = sel[(pool.depth[sel] * P + sel).argsort()]                  # parents before children
    remap = torch.zeros(P + 1, dtype=torch.long, device=dev)          # pool row + 1 -> tree index
    remap[sel + 1] = torch.arange(1, N, device=dev)
    parents = torch.cat([torch.full((1,), -1, dtype=torch.long, device=dev), remap[pool.parent[sel] + 1]])
    anc = torch.zeros(N, N, dtype=torch.bool, device=dev)
    anc[:, 0] = True
    anc[1:, 1:] = pool.anc[sel][:, sel]
    depth = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), pool.depth[sel]])
    return DraftTree(torch.cat([root.reshape(1), pool.tok[sel]]), parents, depth, anc)
