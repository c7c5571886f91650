"""Greedy acceptance over a drafted token tree, and the KV-cache compaction that follows it.

Terms (one definition for the library):
  * the tree: N nodes in topological order (a parent's index is below its children's); node 0 is
    the root, the last token already accepted; node i > 0 holds a drafted token and sits at
    depth[i] >= 1 below the root.
  * target_choice[i]: the target's greedy token after the prefix ending at node i.
  * a node is accepted when every node on its path from the root (itself included, the root
    excluded) holds the token its parent's target_choice names; the accepted path is the deepest
    accepted node's path (ties: the lowest node index), accept_len its depth (0..max_depth).
  * the bonus token: target_choice at the deepest accepted node, the target's own next token,
    which the step emits after the accepted draft tokens.

accept_greedy does it in one launch of one program per sequence: every node walks up its
ancestors (max_depth gathers from the inputs, nothing written in between, so no barrier), a
max-reduction picks the deepest accepted node, and one more walk gathers its path and tokens.
compact_kv then moves the accepted path's cache entries to consecutive slots for every layer's
k and v in one launch, through a table of the caches' base addresses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import FLOATS, INTS, check_device, check_last_contiguous, check_tensor, next_pow2, pdl
from ._tl import pdl_wait


@triton.jit
def _accept_greedy_kernel(
    draft_ptr, parents_ptr, depth_ptr, target_ptr,            # pointers (inputs)
    len_ptr, path_ptr, bonus_ptr, tokens_ptr,                 # pointers (outputs)
    N,                                                        # sizes
    s_draft, s_par, s_dep, s_tgt, s_path, s_tok,              # strides (per sequence; 0 = shared)
    MAX_DEPTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,  # constexpr
    USE_GDC: tl.constexpr,
):
    pdl_wait(USE_GDC)              # before any read of activations or any store
    bid = tl.program_id(0).to(tl.int64)
    draft_ptr += bid * s_draft
    parents_ptr += bid * s_par
    depth_ptr += bid * s_dep
    target_ptr += bid * s_tgt
    node = tl.arange(0, BLOCK_N)
    valid = node < N
    dep = tl.load(depth_ptr + node, mask=valid, other=0)
    ok = valid & (dep <= MAX_DEPTH)
    cur = node
    # walk every node up to the root; a node deeper than MAX_DEPTH is excluded above
    for _ in range(MAX_DEPTH):
        real = ok & (cur > 0)
        par = tl.load(parents_ptr + cur, mask=real, other=0)
        tok = tl.load(draft_ptr + cur, mask=real, other=0)
        tgt = tl.load(target_ptr + par, mask=real, other=0)
        ok = ok & ((cur <= 0) | (tok == tgt))
        cur = tl.where(real, par, 0).to(cur.dtype)
    # deepest accepted node, ties to the lowest index; the root (depth 0) always qualifies
    key = tl.where(ok, dep.to(tl.int64) * BLOCK_N + (BLOCK_N - 1 - node), -1)
    best_key = tl.max(key, axis=0)
    best = BLOCK_N - 1 - best_key % BLOCK_N
    n_acc = best_key // BLOCK_N
    bonus = tl.load(target_ptr + best)
    # gather the path: path[d] = the ancestor at depth d, tokens[d-1] = its token; the slots past
    # accept_len keep the deepest node (path) and the bonus (tokens)
    j = tl.arange(0, BLOCK_P)
    path = tl.zeros((BLOCK_P,), tl.int64) + best
    toks = tl.zeros((BLOCK_P,), tl.int64) + bonus.to(tl.int64)
    c = best
    for _ in range(MAX_DEPTH):
        d = tl.load(depth_ptr + c).to(tl.int64)
        t = tl.load(draft_ptr + c).to(tl.int64)
        on = (j == d) & (d > 0)
        path = tl.where(on, c, path)
        toks = tl.where((j == d - 1) & (d > 0), t, toks)
        c = tl.maximum(tl.load(parents_ptr + c).to(tl.int64), 0)
    path = tl.where(j == 0, 0, path)
    tl.store(path_ptr + bid * s_path + j, path, mask=j <= MAX_DEPTH)
    tl.store(tokens_ptr + bid * s_tok + j, toks, mask=j <= MAX_DEPTH)
    tl.store(len_ptr + bid, n_acc)
    tl.store(bonus_ptr + bid, bonus.to(tl.int64))


def _seq_view(name, t, N, B):
    """(N,) shared or (B, N) per sequence -> (tensor, per-sequence stride)."""
    if t.dim() == 1:
        check_tensor(name, t, shape=(N,))
        return t, 0
    check_tensor(name, t, ndim=2, shape=(B, N))
    return t, t.stride(0)


def accept_greedy(draft_tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor,
                  target_choice: torch.Tensor, max_depth: int):
    """draft_tokens (N,) or (B, N) int: node tokens (node 0, the root, is not checked);
    parents (N,) or (B, N) int, -1 at the root; depth (N,) or (B, N) int; target_choice (N,) or
    (B, N) int: the target's argmax at each node; max_depth: the tree's depth (a Python int, so
    the outputs have static shapes for graph capture). Nodes must be in topological order.
    Returns (accept_len () int64, path (max_depth+1,) int64 node indices from the root padded
    with the last, bonus () int64, tokens (max_depth+1,) int64: the accepted draft tokens then
    the bonus, padded with the bonus) -- each with a leading (B,) for batched inputs."""
    check_tensor("target_choice", target_choice, dtypes=INTS)
    if target_choice.dim() not in (1, 2):
        raise ValueError(f"target_choice must be (N,) or (B, N), got {tuple(target_choice.shape)}")
    batched = target_choice.dim() == 2
    B, N = (target_choice.shape if batched else (1, target_choice.shape[0]))
    if N < 1:
        raise ValueError("the tree needs at least the root node")
    if not 0 <= int(max_depth) < N:
        raise ValueError(f"max_depth={max_depth} must be in [0, N-1={N - 1}]")
    views = {}
    for name, t in (("draft_tokens", draft_tokens), ("parents", parents), ("depth", depth),
                    ("target_choice", target_choice)):
        check_tensor(name, t, dtypes=INTS)
        views[name] = _seq_view(name, t, N, B)
        check_last_contiguous(name, t)
    check_device(("target_choice", target_choice), ("draft_tokens", draft_tokens),
                 ("parents", parents), ("depth", depth))
    dev = target_choice.device
    P = int(max_depth) + 1
    n_acc = torch.empty(B, dtype=torch.int64, device=dev)
    bonus = torch.empty(B, dtype=torch.int64, device=dev)
    path = torch.empty(B, P, dtype=torch.int64, device=dev)
    toks = torch.empty(B, P, dtype=torch.int64, device=dev)
    (d, sd), (p, sp), (dp, sdp), (tg, stg) = (views[k] for k in
                                              ("draft_tokens", "parents", "depth", "target_choice"))
    # one program per sequence: N <= a few hundred nodes fit one program's registers
    _accept_greedy_kernel[(B,)](
        d, p, dp, tg,
        n_acc, path, bonus, toks,
        N,
        sd, sp, sdp, stg, path.stride(0), toks.stride(0),
        MAX_DEPTH=int(max_depth), BLOCK_N=next_pow2(N), BLOCK_P=next_pow2(P), USE_GDC=pdl(),
        num_warps=1 if N <= 128 else 4, launch_pdl=pdl(),
    )
    if not batched:
        return n_acc[0], path[0], bonus[0], toks[0]
    return n_acc, path, bonus, toks


def accept_greedy_ref(draft_tokens, parents, depth, target_choice, max_depth: int):
    """Vectorised PyTorch reference for one sequence ((N,) inputs): the same outputs."""
    N = target_choice.shape[0]
    dev = target_choice.device
    par = parents.long().clamp(min=0)
    match = torch.ones(N, dtype=torch.bool, device=dev)
    match[1:] = draft_tokens[1:] == target_choice[par[1:]]
    ok = match.clone()
    anc = torch.arange(N, device=dev)
    for _ in range(max_depth):                       # pull every node's ancestors' verdicts
        anc = par[anc]
        ok &= match[anc]
    ok &= depth.long() <= max_depth
    key = torch.where(ok, depth.long() * N + (N - 1 - torch.arange(N, device=dev)), -1)
    best_key = key.max()
    best = N - 1 - best_key % N
    n_acc = best_key // N
    chain = [best]
    for _ in range(max_depth):
        chain.append(par[chain[-1]])
    chain = torch.stack(chain).flip(0)               # (max_depth+1,) root ... best, root repeated first
    path = torch.full((max_depth + 1,), 0, dtype=torch.int64, device=dev) + best
    idx = torch.arange(max_depth + 1, device=dev)
    path = torch.where(idx <= n_acc, chain[(idx + max_depth - n_acc).clamp(max=max_depth)], path)
    bonus = target_choice[best].long()
    toks = torch.where(idx < n_acc, draft_tokens.long()[path[(idx + 1).clamp(max=max_depth)]], bonus)
    return n_acc, path, bonus, toks


# ---------------------------------------------------------------------------------------------
# KV-cache compaction


@dataclass
class CacheTable:
    """Base addresses of many caches of one shape/strides/dtype (e.g. every layer's k and v),
    built once next to the static caches so compact_kv moves all of them in one launch.
    `tensors` keeps the caches alive; a cache reallocated later needs a new table."""
    ptrs: torch.Tensor              # (L,) int64 data_ptr()s, on the caches' device
    tensors: list                   # the L caches (B, nkv, S, hd), kept alive
    shape: tuple
    strides: tuple


def make_cache_table(caches) -> CacheTable:
    """caches: a sequence of tensors (B, nkv, S, hd), identical shapes, strides, dtype, device."""
    caches = list(caches)
    if not caches:
        raise ValueError("no caches given")
    ref = caches[0]
    check_tensor("caches[0]", ref, ndim=4, dtypes=FLOATS)
    check_last_contiguous("caches[0]", ref)
    for i, c in enumerate(caches):
        if c.shape != ref.shape or c.stride() != ref.stride() or c.dtype != ref.dtype or c.device != ref.device:
            raise ValueError(f"caches[{i}] {tuple(c.shape)} {c.stride()} {c.dtype} {c.device} differs "
                             f"from caches[0] {tuple(ref.shape)} {ref.stride()} {ref.dtype} {ref.device}")
    check_device(("caches[0]", ref))
    ptrs = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64, device=ref.device)
    return CacheTable(ptrs, caches, tuple(ref.shape), tuple(ref.stride()))


@triton.jit
def _compact_kv_kernel(
    ptrs_ptr, ref_ptr, path_ptr, len_ptr, prefix_ptr,         # pointers
    n_kv, HD,                                                 # sizes
    s_b, s_h, s_s, s_path,                                    # strides
    P: tl.constexpr, BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr,  # constexpr
):
    pdl_wait(USE_GDC)              # before any read of activations or any store
    # program (cache c, sequence b * n_kv + head); it moves the P path rows one after another in
    # increasing order: row i reads slot L+path[i] >= L+i, never a slot an earlier row wrote
    # (those are < L+i), so the in-place move needs no barrier and no scratch copy
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_kv).to(tl.int64)
    hh = (bh % n_kv).to(tl.int64)
    base = tl.load(ptrs_ptr + c).to(tl.pointer_type(ref_ptr.dtype.element_ty))
    base += b * s_b + hh * s_h
    L = tl.load(prefix_ptr + b).to(tl.int64)
    n = tl.load(len_ptr + b).to(tl.int64)
    o = tl.arange(0, BLOCK_D)
    for i in range(1, P):                                     # row 0 is the root: already at L
        src = tl.load(path_ptr + b * s_path + i).to(tl.int64)
        m = (o < HD) & ((o * 0 + i) <= n) & ((o * 0 + src) != i)
        row = tl.load(base + (L + src) * s_s + o, mask=m)
        tl.store(base + (L + i) * s_s + o, row, mask=m)


def compact_kv(table: CacheTable, path: torch.Tensor, accept_len: torch.Tensor,
               prefix_len) -> None:
    """For every cache in table and every sequence: slot L + path[i] -> slot L + i for
    1 <= i <= accept_len (L = prefix_len, the slot of the tree's root). path (P,) or (B, P) as
    accept_greedy returns it (topological: path[i] >= i); accept_len () or (B,); prefix_len an
    int, a 0-d or a (B,) int tensor (a tensor keeps it inside a CUDA graph). In place, one launch."""
    B, nkv, S, hd = table.shape
    check_tensor("path", path, dtypes=INTS)
    if path.dim() == 1:
        path = path.unsqueeze(0).expand(B, -1)
    check_tensor("path", path, ndim=2, shape=(B, None))
    check_last_contiguous("path", path)
    P = path.shape[1]
    if P > S:
        raise ValueError(f"path has {P} entries but the cache only {S} slots")
    check_tensor("accept_len", accept_len, dtypes=INTS)
    accept_len = accept_len.reshape(-1).expand(B).contiguous()
    if not isinstance(prefix_len, torch.Tensor):
        prefix_len = torch.tensor(int(prefix_len), device=path.device)
    check_tensor("prefix_len", prefix_len, dtypes=INTS)
    prefix_len = prefix_len.reshape(-1).expand(B).contiguous()
    check_device(("path", path), ("accept_len", accept_len), ("prefix_len", prefix_len),
                 ("caches", table.tensors[0]))
    _compact_kv_kernel[(len(table.tensors), B * nkv)](
        table.ptrs, table.tensors[0], path, accept_len, prefix_len,
        nkv, hd,
        table.strides[0], table.strides[1], table.strides[2], path.stride(0),
        P=P, BLOCK_D=next_pow2(hd), USE_GDC=pdl(), num_warps=1 if hd <= 128 else 2,
        launch_pdl=pdl(),
    )


def compact_kv_ref(caches, path, accept_len, prefix_len) -> None:
    """koala.model.KVCache.keep over every cache, for one sequence's path (P,) (B = 1 or paths
    shared by the batch)."""
    n = int(accept_len)
    L = int(prefix_len)
    src = L + path[: n + 1].long()
    dst = L + torch.arange(n + 1, device=path.device)
    for c in caches:
        c.index_copy_(2, dst, c.index_select(2, src))


# ---------------------------------------------------------------------------------------------
# The step's commit: the decoder's state after an accepted path, in one launch


@triton.jit
def _commit_step_kernel(
    len_ptr, path_ptr, bonus_ptr, tok_ptr, hid_ptr,           # pointers (this step's results)
    L_ptr, root_ptr, out_ptr, feat_ptr, cu_tok_ptr, cu_n_ptr,  # pointers (the decoder's state)
    D, s_hid, s_feat,                                         # sizes, row strides
    P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    CHAIN: tl.constexpr, ALL_ROWS: tl.constexpr, USE_GDC: tl.constexpr,
):
    pdl_wait(USE_GDC)              # before any read of activations or any store
    n = tl.load(len_ptr).to(tl.int64)
    bonus = tl.load(bonus_ptr).to(tl.int64)
    j = tl.arange(0, BLOCK_P)
    jm = j < P
    if CHAIN:      # node j sits at depth j: the accepted drafts are nodes 1..n, then the bonus
        nxt = tl.load(tok_ptr + j + 1, mask=jm & (j < n), other=0).to(tl.int64)
        toks = tl.where(j < n, nxt, bonus)
    else:
        toks = tl.load(tok_ptr + j, mask=jm, other=0).to(tl.int64)
    tl.store(out_ptr + 1 + j, toks, mask=jm)
    tl.store(out_ptr, n + 1)
    if ALL_ROWS:   # EAGLE: the accepted tokens with their target features, for the head's catch-up
        tl.store(cu_tok_ptr + j, toks, mask=jm)
        tl.store(cu_n_ptr, n + 1)
        for r in range(P):
            if CHAIN:
                src = tl.minimum(n, r)
            else:
                src = tl.load(path_ptr + r).to(tl.int64)
            for d0 in range(0, D, BLOCK_D):
                o = d0 + tl.arange(0, BLOCK_D)
                m = o < D
                tl.store(feat_ptr + r * s_feat + o, tl.load(hid_ptr + src * s_hid + o, mask=m), mask=m)
    else:          # Medusa: the hidden state of the deepest accepted node
        if CHAIN:
            src = n
        else:
            src = tl.load(path_ptr + n).to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            o = d0 + tl.arange(0, BLOCK_D)
            m = o < D
            tl.store(feat_ptr + o, tl.load(hid_ptr + src * s_hid + o, mask=m), mask=m)
    tl.store(L_ptr, tl.load(L_ptr) + n + 1)
    tl.store(root_ptr, bonus)


def commit_step(accept_len, path, bonus, tokens, hidden, L, root, out, feat, cu_tok=None, cu_n=None,
                chain_tokens=None):
    """A speculative step's bookkeeping after acceptance, one launch instead of about a dozen
    small PyTorch ops. accept_len (), path (P,), bonus (), tokens (P,): accept_greedy's outputs
    (or the sampling path's, same meaning; every path entry < hidden's rows); hidden (N, D) the
    verified rows' features. For a chain (node j at depth j) pass path=None, tokens=None and
    chain_tokens (N,), the chain's nodes: the path is then 0..accept_len padded with accept_len
    and the tokens nodes 1..accept_len then the bonus. The decoder state, 0-d or 1-d tensors
    written in place:
      out (P + 1,) <- [accept_len + 1, tokens...];  L += accept_len + 1;  root <- bonus;
      EAGLE (cu_tok and cu_n given): cu_tok <- tokens, cu_n <- accept_len + 1,
        feat (P, D) <- hidden[path] (the accepted rows, padded as path is);
      Medusa (neither given): feat (D,) <- hidden[path[accept_len]].
    Run it after compact_kv, which reads L."""
    eagle = cu_tok is not None
    chain = chain_tokens is not None
    if eagle != (cu_n is not None):
        raise ValueError("cu_tok and cu_n go together (EAGLE) or are both None (Medusa)")
    if chain != (path is None) or chain != (tokens is None):
        raise ValueError("pass either path and tokens, or chain_tokens alone (a chain)")
    for name, t in (("accept_len", accept_len), ("bonus", bonus), ("L", L), ("root", root)):
        check_tensor(name, t, dtypes=(torch.int64,))
        if t.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(t.shape)}")
    check_tensor("out", out, ndim=1, dtypes=(torch.int64,))
    P = out.shape[0] - 1
    if chain:
        check_tensor("chain_tokens", chain_tokens, ndim=1, dtypes=(torch.int64,))
        if chain_tokens.shape[0] < P:
            raise ValueError(f"chain_tokens has {chain_tokens.shape[0]} nodes, fewer than the {P} out holds")
    else:
        check_tensor("path", path, ndim=1, dtypes=(torch.int64,), shape=(P,))
        check_tensor("tokens", tokens, ndim=1, dtypes=(torch.int64,), shape=(P,))
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOATS)
    D = hidden.shape[1]
    if eagle:
        check_tensor("feat", feat, ndim=2, dtypes=(hidden.dtype,), shape=(P, D))
        check_tensor("cu_tok", cu_tok, ndim=1, dtypes=(torch.int64,), shape=(P,))
        check_tensor("cu_n", cu_n, dtypes=(torch.int64,))
    else:
        check_tensor("feat", feat, ndim=1, dtypes=(hidden.dtype,), shape=(D,))
    named = [("hidden", hidden), ("accept_len", accept_len), ("bonus", bonus), ("L", L), ("root", root),
             ("out", out), ("feat", feat)]
    named += [("chain_tokens", chain_tokens)] if chain else [("path", path), ("tokens", tokens)]
    if eagle:
        named += [("cu_tok", cu_tok), ("cu_n", cu_n)]
    check_device(*named)
    for n, t in named:
        if t.dim():
            check_last_contiguous(n, t)
    tok = chain_tokens if chain else tokens
    _commit_step_kernel[(1,)](
        accept_len, tok if chain else path, bonus, tok, hidden,
        L, root, out, feat, cu_tok if eagle else L, cu_n if eagle else L,
        D, hidden.stride(0), feat.stride(0) if eagle else 0,
        P=P, BLOCK_P=next_pow2(P), BLOCK_D=min(1024, next_pow2(D)), CHAIN=chain, ALL_ROWS=eagle,
        USE_GDC=pdl(), num_warps=4, launch_pdl=pdl(),
    )


def commit_step_ref(accept_len, path, bonus, tokens, hidden, L, root, out, feat, cu_tok=None, cu_n=None,
                    chain_tokens=None):
    """The PyTorch ops commit_step replaces (koala.speculative before it)."""
    if chain_tokens is not None:
        P = out.shape[0] - 1
        j = torch.arange(P, device=out.device)
        path = torch.minimum(j, accept_len)
        tokens = torch.where(j < accept_len, chain_tokens[(j + 1).clamp_max(chain_tokens.shape[0] - 1)], bonus)
    out[0] = accept_len + 1
    out[1:] = tokens
    if cu_tok is not None:
        cu_tok.copy_(tokens)
        feat.copy_(hidden[path])
        cu_n.copy_(accept_len + 1)
    else:
        feat.copy_(hidden[path[accept_len]])
    L.add_(accept_len + 1)
    root.copy_(bonus)


@triton.jit
def _commit_token_kernel(nxt_ptr, out_ptr, step_ptr, token_ptr, pos_ptr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)              # before any read of activations or any store
    t = tl.load(nxt_ptr).to(tl.int64)
    s = tl.load(step_ptr)
    tl.store(out_ptr + s, t)
    tl.store(token_ptr, t)
    tl.store(pos_ptr, tl.load(pos_ptr) + 1)
    tl.store(step_ptr, s + 1)


def commit_token(nxt, out, step, token, pos):
    """A plain decode step's bookkeeping in one launch (four PyTorch ops before):
    out[step] <- nxt; token <- nxt; pos += 1; step += 1. nxt, step, token, pos hold one int64
    each (any shape); out (n,) int64, step < n (not checked on the device)."""
    for name, t in (("nxt", nxt), ("step", step), ("token", token), ("pos", pos)):
        check_tensor(name, t, dtypes=(torch.int64,))
        if t.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(t.shape)}")
    check_tensor("out", out, ndim=1, dtypes=(torch.int64,))
    check_device(("out", out), ("nxt", nxt), ("step", step), ("token", token), ("pos", pos))
    _commit_token_kernel[(1,)](nxt, out, step, token, pos, USE_GDC=pdl(), num_warps=1, launch_pdl=pdl())


def commit_token_ref(nxt, out, step, token, pos):
    out.index_copy_(0, step.view(1), nxt.view(1))
    token.copy_(nxt.view(token.shape))
    pos.add_(1)
    step.add_(1)
