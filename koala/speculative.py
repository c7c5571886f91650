"""Drafting and verification: one speculative iteration over static device buffers.

Terms (used the same way everywhere in koala):
  root      the last token already chosen but not yet in the target's KV cache (position L)
  tree      N nodes: node 0 is the root, every other node a drafted token; a chain is a tree
            whose nodes each have one child. parents (N,), depth (N,), anc (N, N) ancestor-or-self
  accepted  drafted tokens the target agrees with, along one root-to-node path
  bonus     the target's own token after the last accepted node: every iteration yields it, so
            an iteration adds accepted + 1 tokens; tau is their mean
  q         the draft's (warped) distribution over a node's children; p the target's

An iteration, all on the device with fixed shapes (so CUDA can replay it as two graphs):
  draft:  [EAGLE: catch the head's cache up on the tokens accepted last time, with the target's
          features] -> build the tree (Medusa: a static sparse tree from the heads' top-k or
          without-replacement samples; EAGLE: EAGLE-2's dynamic tree: expand the top_k most
          likely nodes per level, rerank every drafted node by its path probability, keep N-1)
  verify: one target forward over the tree under the tree mask -> acceptance (greedy: the
          longest path matching the target's argmax; sampling: recursive rejection sampling
          over each node's children in draw order) -> keep the accepted path in the KV cache ->
          write the new tokens and their count to static buffers.
The host reads that count and those tokens once per iteration (the only sync).

Greedy output equals plain greedy decoding; sampled output is distributed as the target's:
a chain is standard speculative sampling (accept with min(1, p/q), else resample from
norm(max(0, p - q))); a tree applies it recursively to children drawn from q without
replacement (Gumbel-top-k), renormalising q after each rejected sibling.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from .errors import HeadMismatchError, KoalaError
from .graphs import capture, window, windows
from .model import (Transformer, _Fast, argmax_last, causal_mask, draft_exact_default, exact_tree_tail,
                    not_exact, tree_mask)
from .sampling import SamplerState, graph_mode, warp_probs

NEG = -1e30


# sampled chains draft by Gumbel-max over the draft logits (one launch pair a level) and the
# acceptance kernel forms q from them; "0" keeps the warped probabilities (A/B timing, tests)
_SAMPLED_LOGITS = os.environ.get("KOALA_SAMPLED_LOGITS", "1") != "0"
# greedy trees on the fused path rank their drafts with kernels/topk.py, and EAGLE trees keep
# their pool and rerank with kernels/tree_draft.py (KOALA_FUSED_TREE=1). Opt-in until timed on a
# GPU: built and tested under the interpreter and compiled for sm_90 offline on 2026-12-07, when
# no device machine could be started (`bash scripts/gpu_suite.sh fused-tree` is the A/B)
_FUSED_TREE = os.environ.get("KOALA_FUSED_TREE", "0") not in ("", "0")


def _at(x, i):
    """x[i] for a 0-d index tensor without a host sync (plain indexing would call .item())."""
    return x.index_select(0, i.reshape(1)).squeeze(0)


def resolve_draft(draft, loaded):
    """draft: a DraftConfig (untrained head), a head directory, 'default', or a head module."""
    from pathlib import Path

    from .heads import DraftConfig, EagleHead, MedusaHead, load_head
    if isinstance(draft, (MedusaHead, EagleHead)):
        return draft
    if isinstance(draft, DraftConfig):
        return draft.build(loaded)
    if draft == "default" or draft in ("default-eagle", "default-medusa"):
        from .loading import DEFAULT_TARGET
        if loaded.name != DEFAULT_TARGET:
            raise HeadMismatchError(f"draft='default' is the head shipped for {DEFAULT_TARGET}; "
                                    f"for {loaded.name!r} pass a head directory or a DraftConfig")
        kind = "medusa" if draft == "default-medusa" else "eagle"
        path = Path(__file__).resolve().parent / "default_heads" / kind
        if not (path / "config.json").is_file():
            raise KoalaError(f"no shipped default head at {path}: train one with python -m train, "
                             "or pass a DraftConfig for an untrained head")
        return load_head(path, loaded)
    if isinstance(draft, (str, Path)):
        return load_head(draft, loaded)
    raise KoalaError(f"draft must be None, a DraftConfig, a head directory or 'default', got {draft!r}")


def medusa_tree(n_heads: int, size: int, depth: int, top_k: int):
    """A sparse static tree of `size` nodes (root included) for Medusa: nodes are (rank, ...)
    paths, chosen best-first by an assumed acceptance that falls with rank and depth (as
    Medusa's tuned trees do). Returns parents (N,), depth (N,), rank (N,) as lists."""
    import heapq
    acc = [0.6 / (r + 1) ** 1.5 for r in range(top_k)]
    nodes = [((), 1.0)]
    heap = [(-acc[0], (0,))]
    seen = set()
    while heap and len(nodes) < size:
        negp, path = heapq.heappop(heap)
        if path in seen:
            continue
        seen.add(path)
        nodes.append((path, -negp))
        if len(path) < min(depth, n_heads):
            heapq.heappush(heap, (negp * acc[0], path + (0,)))
        if path[-1] + 1 < top_k:
            heapq.heappush(heap, (negp / acc[path[-1]] * acc[path[-1] + 1], path[:-1] + (path[-1] + 1,)))
    nodes.sort(key=lambda n: (len(n[0]), n[0]))
    index = {p: i for i, (p, _) in enumerate(nodes)}
    parents = [-1] + [index[p[:-1]] for p, _ in nodes[1:]]
    return parents, [len(p) for p, _ in nodes], [p[-1] if p else 0 for p, _ in nodes]


class SpeculativeDecoder:
    def __init__(self, model: Transformer, head, mode: str = "chain", depth: int | None = None,
                 tree_size: int = 32, top_k: int = 4, use_graph: bool = False, pipeline: bool | None = None,
                 draft_vocab: int | None | str = "head", exact_trees: bool | None = None,
                 draft_exact: bool | None = None):
        from .heads import EagleHead
        self.model, self.head = model, head
        self.eagle = isinstance(head, EagleHead)
        if mode not in ("chain", "tree"):
            raise KoalaError(f"mode must be 'chain' or 'tree', got {mode!r}")
        H = None if self.eagle else head.config.n_heads
        if not depth and mode == "chain":
            depth = head.config.chain_depth      # the head's measured-fastest depth, or None
        depth = depth or (H if H else (5 if mode == "chain" else 6))
        if not isinstance(depth, int) or depth < 1 or depth > 16:
            raise KoalaError(f"depth must be an integer in 1..16, got {depth!r}")
        if H is not None and depth > H:
            raise KoalaError(f"a Medusa head with {H} heads drafts at most {H} tokens deep; got depth={depth}")
        if mode == "chain":
            tree_size, top_k = depth + 1, 1
        if not isinstance(tree_size, int) or not 2 <= tree_size <= 128:
            raise KoalaError(f"tree_size must be an integer in 2..128 (nodes, root included), got {tree_size!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= min(16, model.config.vocab_size):
            raise KoalaError(f"top_k must be an integer in 1..16, got {top_k!r}")
        self.mode, self.depth, self.N, self.k = mode, depth, tree_size, top_k
        # exact_trees (None: KOALA_EXACT_TREES=1): trees verify in exact mode too, each node's
        # attention through exact_tree_attention, so bf16 greedy trees give plain decoding's
        # tokens as chains do; the verify then runs the per-row GEMV for every node (slower)
        if exact_trees is None:
            exact_trees = os.environ.get("KOALA_EXACT_TREES", "0") == "1"
        self.exact_trees = bool(exact_trees)
        # drafts decide speed, never output, so the head drafts outside exact mode (draft_exact
        # None: KOALA_DRAFT_EXACT, default off): on the H100 at ef7b9f1 an EAGLE draft took 15.5
        # against 16.4 us a layer at depth 1 and 64.7 against 68.0 at depth 4
        # (bench/results/spec_cost_draft_exact*_ef7b9f1.json). draft_exact=True (or
        # KOALA_DRAFT_EXACT=1) keeps chains' drafts in exact mode; trees with exact_trees never are
        if draft_exact is None:
            draft_exact = draft_exact_default()
        self.draft_exact = bool(draft_exact)
        if self.exact_trees and os.environ.get("KOALA_FUSED_COMBINE", "0") == "1":
            # plain decoding would combine the attention's splits in the split kernel, in another
            # order than exact_tree_attention's combine launch
            raise KoalaError("exact_trees needs the attention's separate combine launch: unset "
                             "KOALA_FUSED_COMBINE (or set it to 0)")
        # draft from the head's most frequent tokens only ("head": its config's draft_vocab)
        if draft_vocab == "head":
            draft_vocab = head.config.draft_vocab
        elif isinstance(draft_vocab, str):
            raise KoalaError(f"draft_vocab must be 'head', None or a positive integer, got {draft_vocab!r}")
        head.set_draft_vocab(draft_vocab)
        self.draft_vocab = None if head.vocab_ids is None else head.draft_vocab_size   # None: all V
        # this decoder's own vocabulary tensors: another decoder on the same head may set its own,
        # and graphs captured here read these (use_vocab puts them back before each decode)
        self._vocab = head.draft_vocab_state()
        self.use_graph = use_graph
        # keep the next iteration queued on the device while the host reads the last one's tokens
        # (KOALA_PIPELINE=0 or pipeline=False: one iteration at a time)
        self.pipeline = (os.environ.get("KOALA_PIPELINE", "1") != "0") if pipeline is None else bool(pipeline)
        dev = model.device
        self.dev = dev
        V, D = model.config.vocab_size, model.config.dim
        S = model.max_len
        if self.eagle:
            # pool of drafted nodes: top_k children of the root, then top_k^2 per further level
            self.P = top_k + (depth - 1) * top_k * top_k
            if self.N - 1 > self.P:
                raise KoalaError(f"tree_size={tree_size} exceeds the {self.P + 1} nodes that depth={depth} "
                                 f"and top_k={top_k} can draft")
            if self.N < depth + 1:
                raise KoalaError(f"tree_size={tree_size} cannot hold a path of depth={depth}: use tree_size >= {depth + 1}")
            head.setup_cache(1, S + self.P + depth + 1)
        else:
            parents, dep, rank = medusa_tree(H, tree_size, depth, top_k)
            if len(parents) < tree_size:
                raise KoalaError(f"tree_size={tree_size} exceeds the {len(parents)} nodes that depth={depth} "
                                 f"and top_k={top_k} allow")
            self.m_parents = torch.tensor(parents, device=dev)
            self.m_depth = torch.tensor(dep, device=dev)
            self.m_rank = torch.tensor(rank, device=dev)
            self.m_anc = self._ancestors(parents)
            self.m_row = (self.m_depth - 1).clamp_min(0)     # the head that drafts each node
            self.m_is_root = self.m_depth == 0
            self.depth = max(dep)
        self.C = self.k if self.eagle else max(rank) + 1   # most children of any node
        # a chain: node i at depth i, the child of node i-1 (EAGLE's chain mode; Medusa's tree of
        # one child a node)
        self.chain = mode == "chain" and (self.eagle or parents == list(range(-1, len(parents) - 1)))
        # working slots beyond the committed text: the tree, and the EAGLE head's drafted pool
        self.max_new_per_step = self.depth + 1 + self.N + (self.P if self.eagle else 0)
        self.windows = windows(model.max_len)   # the attention windows of its graphs
        if self.eagle and mode == "chain":  # the chain's shape is fixed: node i's parent is i-1
            n = self.N
            self.c_parents = torch.arange(-1, n - 1, device=dev)
            self.c_depth = torch.arange(n, device=dev)
            self.c_anc = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        # ---- state carried between iterations (device)
        self.L = torch.zeros((), dtype=torch.long, device=dev)          # committed target tokens
        self.root = torch.zeros((), dtype=torch.long, device=dev)       # token at position L
        self.h_prev = torch.zeros(D, dtype=model.dtype, device=dev)     # Medusa: hidden at L-1
        d1 = self.depth + 1
        self.cu_tok = torch.zeros(d1, dtype=torch.long, device=dev)     # EAGLE catch-up tokens
        self.cu_feat = torch.zeros(d1, D, dtype=model.dtype, device=dev)  # and target features
        self.cu_n = torch.ones((), dtype=torch.long, device=dev)        # how many are valid
        self.out = torch.zeros(d1 + 1, dtype=torch.long, device=dev)    # [count, tokens...]
        # index vectors made once, so that no graph launches an arange for them
        self.ar_d1 = torch.arange(d1, device=dev)
        self.ar_N = torch.arange(self.N, device=dev)
        self.slot_range = torch.arange(S + self.max_new_per_step + 1, device=dev)   # mask columns
        self.sampler = SamplerState(dev)
        self.greedy = True
        self._true = torch.ones((), dtype=torch.bool, device=dev)
        self.noise_gumbel = torch.zeros(self.depth + 1, V, device=dev)  # draft draws
        self.noise_u = torch.zeros(self.depth + 1, max(self.k, 8), device=dev)  # acceptance draws
        self.noise_bonus = torch.ones(V, device=dev)                    # Exp(1) for the bonus token
        self.tree: dict | None = None
        self._chain_ix = None    # a fused EAGLE chain's indices, made by the draft, read by the verify
        self.graphs: dict[tuple[str, int], tuple] = {}   # (graph mode, window) -> draft, verify graphs
        self.pool = None

    # ------------------------------------------------------------------ helpers
    def _ancestors(self, parents):
        n = len(parents)
        anc = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                anc[i, j] = True
                j = parents[j]
        return anc.to(self.dev)

    def _logq(self, logits):
        """Log of the draft's distribution used to draft: warped like the target's when sampling."""
        if self.greedy:
            return F.log_softmax(logits.float(), -1)
        q = warp_probs(logits, self.sampler)
        return torch.log(q.clamp_min(1e-38)).masked_fill(q == 0, NEG)

    def _children(self, logq, noise, k):
        """k children per row of logq (R, V): top-k (greedy) or k draws without replacement
        (Gumbel-top-k) in draw order. Returns tokens (R, k) and their log q (R, k)."""
        key = logq if self.greedy else logq + noise[..., : logq.shape[-1]]
        if k == 1:   # a chain: the fused argmax, not torch's one-block top-k over the vocabulary
            tok = argmax_last(key).unsqueeze(-1)
        else:
            _, tok = key.topk(k, dim=-1)
        return tok, logq.gather(-1, tok)

    # ------------------------------------------------------------------ draft
    def _medusa_logits(self):
        """(depth, Vd): the logits of the heads that draft (the first `depth`; a head of 4 heads
        drafting a depth-1 chain, as the shipped one does, runs one), from h_prev, over the draft
        vocabulary. On CUDA their K ResBlocks run as K launches of kernels/medusa.py and the
        shared LM head as one GEMM over the depth rows."""
        from .heads import MedusaHead
        head, d = self.head, self.depth
        stock = type(head).forward is MedusaHead.forward   # a subclass's own forward is respected
        if self._fast() and head.proj is None and stock:
            from kernels.medusa import medusa_resblocks
            if getattr(self, "_medusa_w", None) is None:   # frozen at inference: stack once
                self._medusa_w = tuple(t.detach()[:d].contiguous() for t in head.resblock_weights())
            feats = medusa_resblocks(self.h_prev.view(1, -1), *self._medusa_w)[:, 0]   # (d, D)
            # cuBLAS for the d-row LM head: kernels/linear.py's GEMV handles rows one after
            # another (41 us at 4 rows on the H100 against 23 for cuBLAS, linear.json)
            return head.draft_project(feats)
        return head.draft_logits(self.h_prev.view(1, 1, -1), d)[:, 0, 0]

    def _draft_medusa(self):
        # indices into the draft vocabulary until the ranking is done, then the target's ids
        head = self.head
        logits = self._medusa_logits()                                    # (depth, Vd)
        q_logits = self._q_logits()
        if self.greedy:   # a ranking needs no normalisation: the top-k of the logits themselves
            if self.k == 1:
                rank_tok = argmax_last(logits).unsqueeze(-1)
            elif self._fast() and _FUSED_TREE:   # two launches (kernels/topk.py), not torch.topk's 5-8
                from kernels.topk import topk_logprobs
                rank_tok = topk_logprobs(logits, self.k)[0]
            else:
                rank_tok = logits.topk(self.k, dim=-1).indices                # (H, k)
        elif q_logits:   # a chain: Gumbel-max draws, q left to the kernel (over the draft vocabulary)
            from kernels.argmax import gumbel_argmax
            rank_tok = gumbel_argmax(logits, self.noise_gumbel[: logits.shape[0]], self.sampler.temperature).unsqueeze(-1)
        else:
            logq = self._logq(logits)                                     # (H, Vd)
            rank_tok, _ = self._children(logq, self.noise_gumbel[: logq.shape[0]], self.k)
        rank_tok = head.to_token_ids(rank_tok)
        d = self.m_depth
        tok = rank_tok[self.m_row, self.m_rank]                           # (N,)
        tok = torch.where(self.m_is_root, self.root, tok)
        Q = None                                                          # greedy acceptance needs no q
        if q_logits:
            Q = logits                                                    # chain level j ~ head j's row j
        elif not self.greedy:
            q = head.to_full_probs(logq.exp())                            # children of depth-j nodes ~ head j
            Q = q[d.clamp_max(q.shape[0] - 1)]                            # (N, V)
        return dict(tokens=tok, parents=self.m_parents, depth=d, anc=self.m_anc, Q=Q, q_logits=q_logits,
                    q_ids=head.vocab_index if q_logits else None)

    def _catch_up(self, W):
        """Run the EAGLE head over the cu_n entries accepted last iteration (positions
        L-cu_n .. L-1, padded to depth+1); returns the feature predicted for position L (1, D)
        and the logits of the root's children over the draft vocabulary (1, Vd)."""
        d1 = self.depth + 1
        if self._fast() and self.chain:
            # the catch-up's and the verify's indices and the chain's token buffer in one launch
            # (kernels/chain_index.py): L does not change before the verify reads them
            from kernels.chain_index import chain_indices
            ix = self._chain_ix = chain_indices(self.L, self.N, W, cu_n=self.cu_n, d1=d1, root=self.root)
            pos, mask, row = ix.cu_pos, ix.cu_mask, ix.cu_row
        else:
            self._chain_ix = None
            pos = (self.L - self.cu_n) + self.ar_d1
            mask, row = (self.slot_range[:W] <= pos[:, None]).unsqueeze(0), (self.cu_n - 1).view(1)
        lg, f = self.head.draft_step_at(self.cu_tok.view(1, -1), self.cu_feat.view(1, d1, -1), pos.view(1, -1),
                                        pos, mask, row)
        return f, lg

    def _draft_eagle_chain(self, W):
        """A chain needs no scores, pool or rerank: each level is one head forward and an argmax
        (or a Gumbel-max draw from the warped q)."""
        L = self.L
        f, lg = self._catch_up(W)                                         # (1, D), (1, V)
        ix = self._chain_ix
        # on the fused path the drafted tokens go straight into the chain's buffer, whose root
        # the index launch wrote: no concatenation
        buf = ix.tokens if ix is not None else None
        toks, Qs = [self.root.view(1)], []
        ar = self.slot_range[:W]
        head = self.head
        q_logits = self._q_logits()
        for j in range(self.depth):
            direct = buf is not None and head.vocab_ids is None
            out = buf[j + 1:j + 2] if direct else None
            if self.greedy:
                t = argmax_last(lg, out=out)                              # (1,) in the draft vocabulary
            elif q_logits:
                # one launch pair: a Gumbel-max draw from softmax(lg / T); the acceptance kernel
                # forms q from these logits itself (kernels/spec_sample.py, q_logits), over the
                # draft vocabulary through head.vocab_index when the head has one
                from kernels.argmax import gumbel_argmax
                Qs.append(lg)
                t = gumbel_argmax(lg, self.noise_gumbel[j:j + 1], self.sampler.temperature, out=out)
            else:
                logq = self._logq(lg)
                Qs.append(head.to_full_probs(logq.exp()))
                t = argmax_last(logq + self.noise_gumbel[j:j + 1, : logq.shape[-1]], out=out)
            if not direct:
                t = head.to_token_ids(t)
                if buf is not None:
                    buf[j + 1:j + 2].copy_(t)
            toks.append(t)
            if j < self.depth - 1:  # the node at depth j+1 is fed at position and slot L+j
                p = (L + j).view(1)
                lg, f = head.draft_step(t.view(1, 1), f.view(1, 1, -1), p.view(1, 1), p,
                                        (ar <= L + j).view(1, 1, W))
                lg, f = lg[0], f[0]
        if q_logits:   # the draft logits of levels 0..N-2: all the kernel reads
            Q = Qs[0] if len(Qs) == 1 else torch.cat(Qs)
        else:
            Q = torch.cat(Qs + [Qs[-1][:1]]) if Qs else None              # (N, V): a leaf has no children
        return dict(tokens=buf if buf is not None else torch.cat(toks), parents=self.c_parents,
                    depth=self.c_depth, anc=self.c_anc, Q=Q, q_logits=q_logits,
                    q_ids=head.vocab_index if q_logits else None)

    def _draft_eagle(self, W):
        if self.mode == "chain":
            return self._draft_eagle_chain(W)
        if self.greedy and self._fast() and _FUSED_TREE:
            return self._draft_eagle_tree_fused(W)
        return self._draft_eagle_tree(W)

    def _draft_eagle_tree(self, W):
        """A tree in PyTorch ops (sampling, and the reference of _draft_eagle_tree_fused): the
        root's k children, then level by level the k children of each of the k most likely
        nodes of the level before, then the rerank."""
        head, L, k = self.head, self.L, self.k
        f_root, lg_root = self._catch_up(W)                               # (1, D) predicts f_L
        logq_root = self._logq(lg_root)                                   # (1, V)
        # 2. expand level by level
        P = self.P
        ar_P = torch.arange(P, device=self.dev)
        pool_tok = torch.zeros(P, dtype=torch.long, device=self.dev)
        pool_score = torch.full((P,), NEG, device=self.dev)
        pool_parent = torch.full((P,), -1, dtype=torch.long, device=self.dev)   # -1 = the root
        pool_anc = torch.zeros(P, P, dtype=torch.bool, device=self.dev)
        # q of every expanded node, for sampling's acceptance only (a P x V buffer: 64 MB for
        # SmolLM2's vocabulary at P = 328, so greedy drafting does without it)
        pool_Q = None if self.greedy else torch.zeros(P, self.model.config.vocab_size, device=self.dev)
        tok, lq = self._children(logq_root, self.noise_gumbel[0:1], k)    # (1, k)
        tok = head.to_token_ids(tok)
        score = lq[0] if self.greedy else lq[0].cummin(0).values
        pool_tok[:k], pool_score[:k] = tok[0], score
        pool_anc[:k, :k] = torch.eye(k, dtype=torch.bool, device=self.dev)
        frontier = torch.arange(k, device=self.dev)                      # (k,) pool indices
        parent_feat = f_root.expand(k, -1)                               # feature fed with each
        start = k
        for j in range(1, self.depth):
            slots = L + frontier
            posj = (L + j - 1).expand(k)
            lg, feat = head.draft_step(pool_tok[frontier].view(1, k), parent_feat.view(1, k, -1), posj.view(1, k),
                                       slots, tree_mask(L, L + ar_P, pool_anc[frontier], W))
            logq = self._logq(lg[0])                                      # (k, Vd)
            if pool_Q is not None:
                pool_Q[frontier] = head.to_full_probs(logq.exp())
            ctok, clq = self._children(logq, self.noise_gumbel[j:j + 1], k)   # (k, k)
            ctok = head.to_token_ids(ctok)
            if not self.greedy:
                clq = clq.cummin(-1).values          # siblings in draw order: scores never rise
            cscore = pool_score[frontier].unsqueeze(1) + clq               # (k, k)
            # this level's k*k children fill pool rows start .. end-1 (slices: no index kernels)
            end = start + k * k
            pool_tok[start:end] = ctok.reshape(-1)
            pool_score[start:end] = cscore.reshape(-1)
            par = frontier.view(k, 1).expand(k, k).reshape(-1)            # each child's parent
            pool_parent[start:end] = par
            pool_anc[start:end] = pool_anc[par]
            pool_anc[start:end, start:end].diagonal().fill_(True)         # ancestor-or-self
            # the next frontier: the k most likely of this level's k*k children
            best = cscore.reshape(-1).topk(k).indices
            frontier = best + start
            parent_feat = feat[0][best // k]
            start = end
        root_Q = None if pool_Q is None else head.to_full_probs(logq_root.exp())
        return self._rerank(pool_tok, pool_score, pool_parent, pool_anc, pool_Q, root_Q)

    def _draft_eagle_tree_fused(self, W):
        """A greedy tree on the fused path: each level is the head's forward over the k nodes of
        the frontier, one top-k with log-probabilities over each row (kernels/topk.py) and one
        launch for the pool and the next forward's inputs (kernels/tree_draft.py), where the
        PyTorch levels above take about 30 launches, then the rerank in one launch (about 25 in
        PyTorch). Same tree, ties aside: equal scores go to the lower child index here
        (torch.topk leaves their order unspecified)."""
        from kernels.topk import topk_logprobs
        from kernels.tree_draft import DraftLevel, DraftPool, tree_expand, tree_select
        head, L, k, P, dev = self.head, self.L, self.k, self.P, self.dev
        f_root, lg_root = self._catch_up(W)                               # (1, D), (1, Vd)
        D = f_root.shape[-1]
        pool = DraftPool(torch.empty(P, dtype=torch.long, device=dev), torch.empty(P, device=dev),
                         torch.empty(P, dtype=torch.long, device=dev), torch.empty(P, dtype=torch.long, device=dev),
                         torch.empty(P, P, dtype=torch.bool, device=dev))   # every row written below
        # two buffers of the next forward's inputs, alternating (a level reads one, writes the other)
        levels = [DraftLevel(torch.empty(k, dtype=torch.long, device=dev), torch.empty(k, dtype=torch.long, device=dev),
                             torch.empty(k, D, dtype=f_root.dtype, device=dev),
                             torch.empty(k, dtype=torch.long, device=dev), torch.empty(k, dtype=torch.long, device=dev),
                             torch.empty(k, W, dtype=torch.bool, device=dev)) for _ in range(2)]
        tok, lq = topk_logprobs(lg_root, k)                               # (1, k)
        tree_expand(head.to_token_ids(tok), lq, f_root, None, L, pool, 0, 0,
                    levels[0] if self.depth > 1 else None)
        start = k
        for j in range(1, self.depth):
            lv = levels[(j - 1) % 2]
            lg, feat = head.draft_step(lv.tok.view(1, k), lv.feat.view(1, k, D), lv.pos.view(1, k), lv.slot,
                                       lv.mask.view(1, k, W))
            ctok, clq = topk_logprobs(lg[0], k)                           # (k, k)
            tree_expand(head.to_token_ids(ctok), clq, feat[0], lv.front, L, pool, start, j,
                        levels[j % 2] if j < self.depth - 1 else None)
            start += k * k
        t = tree_select(pool, self.root, self.N)                          # the rerank, one launch
        return dict(tokens=t.tokens, parents=t.parents, depth=t.depth, anc=t.anc, Q=None)

    def _rerank(self, pool_tok, pool_score, pool_parent, pool_anc, pool_Q=None, root_Q=None):
        """The tree to verify: the root and the N-1 most likely drafted nodes (ancestor-closed:
        a child never scores above its parent; ties broken towards shallower, earlier-drawn
        nodes), parents before children. Sampling: pool_Q (P, V) the q of every pool node's
        children, root_Q (1, V) the root's."""
        P = self.P
        ar_P = torch.arange(P, device=self.dev)
        depth_pool = pool_anc.sum(-1)                                     # 1 for level-1 nodes
        key = pool_score - 1e-4 * depth_pool - 1e-7 * ar_P
        sel = key.topk(self.N - 1).indices
        sel = sel[(depth_pool[sel] * P + sel).argsort()]                 # parents before children
        remap = torch.zeros(P + 1, dtype=torch.long, device=self.dev)    # pool index -> tree index
        remap[sel + 1] = torch.arange(1, self.N, device=self.dev)
        parents = torch.cat([torch.full((1,), -1, device=self.dev, dtype=torch.long),
                             remap[pool_parent[sel] + 1]])
        parents[1:] = torch.where(pool_parent[sel] < 0, 0, parents[1:])
        anc = torch.zeros(self.N, self.N, dtype=torch.bool, device=self.dev)
        anc[:, 0] = self._true
        anc[1:, 1:] = pool_anc[sel][:, sel]
        depth = torch.cat([torch.zeros(1, dtype=torch.long, device=self.dev), depth_pool[sel]])
        tokens = torch.cat([self.root.view(1), pool_tok[sel]])
        Q = None if pool_Q is None else torch.cat([root_Q, pool_Q[sel]])
        return dict(tokens=tokens, parents=parents, depth=depth, anc=anc, Q=Q)

    @contextmanager
    def _exact(self):
        """Batch-invariant kernels (koala.model._Fast.exact) while this decoder runs: they make a
        chain's bf16 verification bit-identical to one-token steps, because a chain's nodes sit in
        the same cache slots as plainly decoded tokens would. A tree's nodes do not (a depth-2
        node may sit at slot L+7), so attention sums its keys in another order and no kernel
        choice makes trees bit-exact in bf16 by itself; they keep the faster cuBLAS verification
        unless exact_trees, whose attention gives each node its ancestors at plain decoding's
        slots (kernels/tree_attention.py, exact_tree_attention)."""
        saved = _Fast.exact
        _Fast.exact = saved and (self.mode == "chain" or self.exact_trees)
        try:
            yield
        finally:
            _Fast.exact = saved

    def draft(self, W):
        # the draft decides speed, not output: outside exact mode unless draft_exact (chains)
        with not_exact() if (self.exact_trees and not self.chain) or not self.draft_exact else nullcontext():
            self.tree = self._draft_eagle(W) if self.eagle else self._draft_medusa()

    # ------------------------------------------------------------------ verify
    def verify(self, W):
        t = self.tree
        N, L, d1 = self.N, self.L, self.depth + 1
        ar = self.ar_N
        if self.chain and self._fast():
            # an EAGLE draft's index launch made them; a Medusa chain makes both in one launch
            if self.eagle:
                ix = self._chain_ix
            else:
                from kernels.chain_index import chain_indices
                ix = chain_indices(L, N, W)
            slots = pos = ix.slots
            mask = ix.mask
        else:
            slots = L + ar
            if self.chain:   # node i sits at depth i and slot L + i and sees the slots up to its own
                pos, mask = slots, (self.slot_range[:W] <= slots[:, None]).unsqueeze(0)
            else:
                pos, mask = L + t["depth"], tree_mask(L, slots, t["anc"], W)
        tail = None
        if not self.chain and self.exact_trees and _Fast.exact:
            tail = exact_tree_tail(L, slots, t["depth"], t["anc"], W)
        logits, hidden = self.model(t["tokens"].view(1, N), pos.view(1, N), slots, mask, tail=tail)
        logits, hidden = logits[0], hidden[0]
        fast = self._fast()
        dpos = self.ar_d1
        if fast and self.chain and (self.greedy or not self.sampler.truncate):
            # a chain on the fused path: acceptance in one launch (greedy) or three (speculative
            # sampling, kernels/spec_sample.py), then one launch for the state. Its accepted nodes
            # already sit in consecutive cache slots, so there is nothing to compact.
            from kernels.accept import commit_step
            if self.greedy:
                from kernels.accept import accept_greedy
                a, _, bonus, _ = accept_greedy(t["tokens"], t["parents"], t["depth"], argmax_last(logits),
                                               self.depth)
            else:
                from kernels.spec_sample import accept_sampling_chain
                a, bonus = accept_sampling_chain(logits, t["Q"], t["tokens"], self.noise_u[:, 0],
                                                 self.noise_bonus, self.sampler.temperature,
                                                 q_logits=t.get("q_logits", False), q_ids=t.get("q_ids"))
            commit_step(a, None, bonus, None, hidden, self.L, self.root, self.out,
                        self.cu_feat if self.eagle else self.h_prev, self.cu_tok if self.eagle else None,
                        self.cu_n if self.eagle else None, chain_tokens=t["tokens"])
            return
        if self.greedy and fast:
            from kernels.accept import accept_greedy
            choice = argmax_last(logits)
            a, path, bonus, newtok = accept_greedy(t["tokens"], t["parents"], t["depth"], choice, self.depth)
        else:
            if self.greedy:
                best, bonus = self._accept_greedy(t, logits)
            else:
                best, bonus = self._accept_sampling(t, logits)
            # the accepted path root -> best, in depth order, padded with best
            on_path = _at(t["anc"], best)                                     # (N,)
            order = torch.where(on_path, t["depth"], N + ar).argsort()[:d1]
            a = on_path.sum() - 1                                              # accepted drafted tokens
            path = torch.where(dpos <= a, order, best)
            toks = t["tokens"][path]
            newtok = torch.where(dpos < a, toks.roll(-1), bonus)              # x_{L+1..L+a}, bonus
        if fast:  # every layer's k and v in one launch, then the state in one more
            from kernels.accept import commit_step, compact_kv
            compact_kv(self._cache_table(), path, a, L)
            commit_step(a, path, bonus, newtok, hidden, self.L, self.root, self.out,
                        self.cu_feat if self.eagle else self.h_prev, self.cu_tok if self.eagle else None,
                        self.cu_n if self.eagle else None)
            return
        self.model.keep_cache(L + path, L + dpos)
        self.out[0] = a + 1
        self.out[1:] = newtok
        if self.eagle:
            self.cu_tok.copy_(newtok)
            self.cu_feat.copy_(hidden[path])
            self.cu_n.copy_(a + 1)
        else:
            self.h_prev.copy_(_at(hidden, _at(path, a)))
        self.L.add_(a + 1)
        self.root.copy_(bonus)

    def _q_logits(self):
        """A sampled chain whose acceptance is kernels/spec_sample.py's (fused path, temperature
        only): draft by Gumbel-max over the logits and hand the kernel those logits, not q, and for
        a draft vocabulary its token -> column map, not q scattered onto all V tokens
        (KOALA_SAMPLED_LOGITS=0: the probabilities over all V, as before)."""
        return (not self.greedy and self.chain and not self.sampler.truncate and self._fast()
                and _SAMPLED_LOGITS)

    def _fast(self):
        return _Fast.on and (self.dev.type == "cuda" or _Fast.cpu)

    def _cache_table(self):
        if getattr(self, "_table", None) is None:
            from kernels.accept import make_cache_table
            caches = [c for layer in self.model.layers for c in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]
            self._table = make_cache_table(caches)
        return self._table

    def _accept_greedy(self, t, logits):
        choice = logits.argmax(-1)                                        # (N,)
        ok = t["tokens"] == choice[t["parents"].clamp_min(0)]
        ok = ok | (torch.arange(self.N, device=self.dev) == 0)
        acc = ~(t["anc"] & ~ok.unsqueeze(0)).any(-1)                      # every node on its path ok
        best = (acc * (t["depth"] + 1) * 1024 - torch.arange(self.N, device=self.dev)).argmax()
        return best, _at(choice, best)

    def _accept_sampling(self, t, logits):
        p_all = warp_probs(logits, self.sampler)                          # (N, V)
        N = self.N
        kids = torch.where(t["parents"].unsqueeze(0) == torch.arange(N, device=self.dev).unsqueeze(1),
                           torch.arange(N, device=self.dev).unsqueeze(0), N)   # (N, N): child j of i
        C = self.C
        kids = kids.sort(-1).values[:, :C]                                 # children in draw order, N = none
        cur = torch.zeros((), dtype=torch.long, device=self.dev)
        p, q = p_all[0], t["Q"][0]
        done = torch.zeros((), dtype=torch.bool, device=self.dev)
        tokens = torch.cat([t["tokens"], t["tokens"][:1]])                 # index N -> a dummy
        for level in range(self.depth):
            moved = torch.zeros((), dtype=torch.bool, device=self.dev)
            nxt = cur
            for j in range(C):
                c = _at(kids[:, j], cur)
                valid = (c < N) & ~done & ~moved
                x = _at(tokens, c)
                px, qx = _at(p, x), _at(q, x)
                acc = valid & (self.noise_u[level, j] * qx < px)           # u < min(1, p/q)
                rej = valid & ~acc
                resid = (p - q).clamp_min(0)
                rs = resid.sum()
                p = torch.where(rej & (rs > 0), resid / rs.clamp_min(1e-30), p)
                q2 = q.index_fill(0, x.view(1), 0.0)
                qs = q2.sum()
                q = torch.where(rej, q2 / qs.clamp_min(1e-30), q)
                nxt = torch.where(acc, c, nxt)
                moved = moved | acc
            cur = nxt
            p = torch.where(moved, _at(p_all, cur.clamp_max(N - 1)), p)
            q = torch.where(moved, _at(t["Q"], cur.clamp_max(N - 1)), q)
            done = done | ~moved
        bonus = argmax_last(p / self.noise_bonus)                         # exponential race
        return cur, bonus

    # ------------------------------------------------------------------ graphs and loop
    def _run(self, W, ev=None):
        """One iteration (draft, verify, accept) at window W; ev: three CUDA events recorded
        around the draft and the verification (graphs only)."""
        if not self.use_graph:
            with self._exact():
                self.draft(W)
                self.verify(W)
            return
        # greedy and sampling trace different code (argmax vs draws, Q or none), and so do
        # sampling with and without top-k / top-p (warp_probs): one graph each
        key = (graph_mode(self.greedy, self.sampler.truncate), W)
        if key not in self.graphs:
            with self._exact():
                self.graphs[key] = self._capture(W)
        gd, gv = self.graphs[key]
        ev[0].record()
        gd.replay()
        ev[1].record()
        gv.replay()
        ev[2].record()

    def _capture(self, W):
        state = [x.clone() for x in (self.L, self.root, self.h_prev, self.cu_tok, self.cu_feat, self.cu_n)]
        def reset():
            self.L.fill_(max(0, W - self.max_new_per_step - 1)); self.cu_n.fill_(1)
        (gd, gv), self.pool = capture([lambda: self.draft(W), lambda: self.verify(W)], reset, self.pool)
        for x, v in zip((self.L, self.root, self.h_prev, self.cu_tok, self.cu_feat, self.cu_n), state):
            x.copy_(v)
        return gd, gv

    def _result_slots(self):
        """Two (host buffer, completion event, timing events) slots, made once per decoder: the
        host reads one iteration's [count, tokens] while the next one runs."""
        if getattr(self, "_slots", None) is None:
            cuda = self.dev.type == "cuda"
            self._slots = [(torch.zeros(self.out.shape, dtype=self.out.dtype, pin_memory=cuda),
                            torch.cuda.Event() if cuda else None,
                            [torch.cuda.Event(enable_timing=True) for _ in range(3)] if self.use_graph else None)
                           for _ in range(2)]
        return self._slots

    def use_vocab(self):
        """Put this decoder's draft vocabulary back on its head (another decoder may share it)."""
        self.head.restore_draft_vocab(self._vocab)

    def window(self, L: int) -> int:
        """The attention window of an iteration whose committed length is at most L: it must hold
        the L slots and the iteration's drafted ones (capped at the cache's length)."""
        S = self.model.max_len
        return window(self.windows, min(L + self.max_new_per_step + 1, S))

    def decode(self, prompt_ids, first, hidden, params, gen, out, stats, primed: bool = False):
        """Continue after the prefill of the prompt, whose last logits gave `first`;
        hidden (1, T, D), T >= n, holds the target's features of the prompt in its first n rows.
        primed: an EAGLE head's cache already holds the prompt (the graphed prefill filled it)."""
        n = len(prompt_ids)
        self.use_vocab()
        self.greedy = params.greedy
        self.sampler.set(params)
        dev = self.dev
        self.L.fill_(n)
        self.root.fill_(first)
        if self.eagle:
            # the head reads the whole prompt once (eager: variable length); the last position is
            # left to the first iteration's catch-up
            self._eagle_prefill(prompt_ids, hidden[0], n, first, primed)
        else:
            self.h_prev.copy_(hidden[0, n - 1])
        Lh = n
        per_step, draft_s, verify_s = [], 0.0, 0.0
        cuda = dev.type == "cuda"
        d1 = self.depth + 1
        slots = self._result_slots()
        inflight = []
        launches = 0

        def launch(bound):
            """Queue one iteration whose committed length is at most `bound`."""
            nonlocal launches
            buf, done, ev = slots[launches % 2]
            launches += 1
            if not self.greedy:
                self.noise_gumbel.exponential_(generator=gen).clamp_min_(1e-30).log_().neg_()  # Gumbel
                self.noise_u.uniform_(generator=gen)
                self.noise_bonus.exponential_(generator=gen).clamp_min_(1e-30)
            self._run(self.window(bound), ev)
            buf.copy_(self.out, non_blocking=cuda)
            if done is not None:
                done.record()
            inflight.append((buf, done, ev))

        launch(Lh)
        while True:
            # a second iteration goes in before the host waits for the first, while the cache has
            # room for both and the first cannot end the answer by length alone (an EOS may still
            # end it: that queued iteration is then discarded, its work unused)
            if (self.pipeline and len(inflight) == 1 and Lh + 2 * d1 + self.max_new_per_step < self.model.max_len
                    and len(out.ids) + d1 < out.max_new):
                launch(Lh + d1)
            buf, done, ev = inflight.pop(0)
            if done is not None:
                done.synchronize()
            res = buf.tolist()                                             # the one sync
            if ev is not None:
                draft_s += ev[0].elapsed_time(ev[1]) / 1e3
                verify_s += ev[1].elapsed_time(ev[2]) / 1e3
            cnt = res[0]
            per_step.append(cnt - 1)
            Lh += cnt
            stats.target_forwards += 1
            if out.add(res[1:1 + cnt]):
                break
            if not inflight:
                launch(Lh)
        for _, done, _ in inflight:            # a discarded iteration: let it finish before reuse
            if done is not None:
                done.synchronize()
        stats.accepted_per_step = per_step
        produced = sum(a + 1 for a in per_step)
        stats.tau = produced / max(1, len(per_step))
        if self.mode == "chain":
            stats.alpha = [
                sum(a >= i for a in per_step) / max(1, sum(a >= i - 1 for a in per_step)) for i in (1, 2, 3)
                if i <= self.depth]
        stats.draft_s = draft_s if self.use_graph else None
        stats.verify_s = verify_s if self.use_graph else None

    def _eagle_prefill(self, prompt_ids, hidden, n, first, primed=False):
        """Head cache for positions 0..n-2 (tokens x_1..x_{n-1} with features f_0..f_{n-2}),
        unless `primed` (already filled); position n-1 (token `first`, feature f_{n-1}) is the
        first iteration's catch-up."""
        dev = self.dev
        if n > 1 and not primed:   # the ids go to the device only when the head reads them here
            toks = torch.tensor(prompt_ids[1:n], device=dev).view(1, -1)
            pos = torch.arange(n - 1, device=dev)
            with not_exact():   # the head's cache decides drafts only, so speed, not output
                self.head.prime(toks, hidden[: n - 1].view(1, n - 1, -1), pos.view(1, -1), pos,
                                causal_mask(pos, self.window(n)))
        self.cu_tok.zero_(); self.cu_tok[0] = first
        self.cu_feat.zero_(); self.cu_feat[0] = hidden[n - 1]
        self.cu_n.fill_(1)
