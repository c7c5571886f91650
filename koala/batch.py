"""Batch size > 1: several prompts decoded together, plainly or on a chain of drafts, greedily or
by speculative sampling (SpeculativeGenerator.generate_batch).

Every row accepts its own prefix of the drafts, so rows advance by different amounts. The rows
share one slot space (the model writes a step's T tokens at the same T cache slots in every row,
kernels and CUDA graphs unchanged), and each row keeps a mask of the slots that hold its text:
a prompt shorter than the longest leaves pad slots, and a rejected draft leaves a hole. A query
attends only its row's valid slots, so a row computes what it would alone; only the order in
which attention sums its keys differs (other slots), as with trees: in fp32 the tokens equal
those of `generate` (the tests check it), in bf16 a near-tie may resolve otherwise.

A step uses depth + 1 slots whatever it accepts, so a batch needs the longest prompt plus
(depth + 1) x max_new_tokens slots (the EAGLE head 2 x depth more per step for its drafted
levels), rounded up to a power of two. The batch has caches of its own; the generator's batch-1
caches and their CUDA graphs are left as they were. On CUDA each iteration (draft, verify,
accept, the EAGLE head's catch-up) is one CUDA graph per attention window; the prefill runs
eagerly. Chains only: trees are batch 1 for now. Sampling is speculative sampling row by row:
each draft is kept with probability min(1, p/q), the first rejected one is replaced from the
residual, so every row's tokens are distributed as the target's own samples (tested against
the exact distribution), though not the same draws as `generate` with the same seed.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext

import torch

from .errors import ContextLengthError, KoalaError
from .graphs import bucket, capture, window, windows
from .model import KVCache, argmax_last, draft_exact_default, not_exact
from .sampling import SamplerState, SamplingParams, draw_noise, sample, warp_probs


@contextmanager
def _swapped_caches(stack, caches):
    """Give a CachedStack (the target or an EAGLE head) the batch's KV caches for the block, then
    put its own back (the same tensors, so the batch-1 decoders' captured graphs stay valid)."""
    saved = [layer.attention.kv_cache for layer in stack.layers]
    try:
        for layer, c in zip(stack.layers, caches):
            layer.attention.kv_cache = c
        yield
    finally:
        for layer, c in zip(stack.layers, saved):
            layer.attention.kv_cache = c


def _span_mask(valid, cols, start, hi):
    """(B, Q, L) attention mask: each row's valid slots (valid (B, L)), plus for query i the slots
    start .. start + hi[i] (start a 0-d device tensor, hi (Q,)): a step's own tokens, causally,
    or a drafted level and the scratch levels before it. cols: arange(L)."""
    rel = cols[None, :] - start                                         # (1, L)
    own = (rel >= 0) & (rel <= hi[:, None])                             # (Q, L)
    return valid[:, None, :] | own[None]


class BatchDecoder:
    """Decoding of B prompts at once: plain (head None) or a chain of `depth` drafts from a
    Medusa or EAGLE head, greedy or sampled. run() reports each row's new tokens to done_fn and
    returns its accepted-per-step list.

    After the prefill (eager: its shapes follow the prompts) every iteration reads and writes
    only static device buffers: the rows' last tokens and positions, the next free slot s0 (a
    0-d tensor), the valid-slot masks, the target's last features (EAGLE: the head's first-draft
    logits and feature, its own valid mask and next slot), and noise drawn before the iteration.
    So on CUDA an iteration is one CUDA graph per (sampling mode, target window, head window),
    replayed; elsewhere the same code runs eagerly. The host only counts slots (an iteration
    uses depth + 1 target slots and 2 x depth head slots, whatever it accepts) to pick the
    window, and reads the accepted counts and tokens once per iteration. The caches, buffers and
    graphs belong to the decoder and are reused by later calls of the same batch size and cache
    size or less (generate_batch keeps the last decoder)."""

    def __init__(self, model, head=None, depth: int = 1, use_graph: bool | None = None,
                 pipeline: bool | None = None, draft_exact: bool | None = None):
        from .heads import EagleHead
        self.model, self.head = model, head
        # the head's forwards outside exact mode unless draft_exact, as SpeculativeDecoder's
        # (None: KOALA_DRAFT_EXACT, default off): drafts decide speed, never output
        self.draft_exact = draft_exact_default() if draft_exact is None else bool(draft_exact)
        self.eagle = isinstance(head, EagleHead)
        self.depth = depth if head is not None else 0
        # the head's draft vocabulary when this decoder was made (its buffers are sized by it)
        self.vocab_ids = head.vocab_ids if head is not None else None
        if head is not None and not self.eagle and self.depth > head.config.n_heads:
            raise KoalaError(f"a Medusa head with {head.config.n_heads} heads drafts at most "
                             f"{head.config.n_heads} tokens deep; got depth={depth}")
        self.use_graph = model.device.type == "cuda" if use_graph is None else use_graph
        # queue the next iteration before reading the last one's tokens (as the batch-1 decoder
        # does); opt-in until timed: KOALA_BATCH_PIPELINE=1 or pipeline=True
        self.pipeline = (os.environ.get("KOALA_BATCH_PIPELINE", "0") not in ("", "0")) if pipeline is None \
            else bool(pipeline)
        self.shape = None                 # (B, S, Sh) of the allocated caches and buffers
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.sampler = SamplerState(model.device)

    def slots_needed(self, longest_prompt: int, max_new: int) -> tuple[int, int]:
        """(target slots, EAGLE head slots) a batch needs."""
        d1 = self.depth + 1
        target = longest_prompt + d1 * max_new
        head = longest_prompt + (d1 + max(0, self.depth - 1)) * max_new if self.eagle else 0
        return target, head

    def _alloc(self, B: int, S: int, Sh: int):
        """Caches and state buffers for B rows, S target slots, Sh head slots. A later call of
        the same B that fits in them reuses them, and the graphs captured over them; otherwise
        they are replaced, and the graphs go with them."""
        if self.shape is not None and self.shape[0] == B and self.shape[1] >= S and self.shape[2] >= Sh:
            return
        model, head, dev = self.model, self.head, self.model.device
        self.graphs, self.pool = {}, None
        self.shape = None
        self.caches = []                                                  # free the old first
        cfg = model.stack_config()
        self.caches = [KVCache(B, cfg.n_kv_heads, S, cfg.head_dim, model.dtype, dev) for _ in model.layers]
        self.hcaches = []
        if self.eagle:
            hc = head.stack_config()
            self.hcaches = [KVCache(B, hc.n_kv_heads, Sh, hc.head_dim, head.dtype, dev) for _ in head.layers]
        D, V, d = cfg.dim, cfg.vocab_size, self.depth
        long = dict(dtype=torch.long, device=dev)
        self.B = B
        self.rows = torch.arange(B, device=dev)
        self.at = torch.arange(d + 1, device=dev)
        self.cols = torch.arange(max(S, Sh), device=dev)
        self.last = torch.zeros(B, **long)                                # each row's last token
        self.pos = torch.zeros(B, **long)                                 # its position
        self.s0 = torch.zeros((), **long)                                 # next free target slot
        self.valid = torch.zeros(B, S, dtype=torch.bool, device=dev)      # slots holding row text
        self.h_last = torch.zeros(B, D, dtype=model.dtype, device=dev)    # target feature of `last`
        # an iteration's results, one contiguous (B, 1 + T) buffer (so one copy brings them to the
        # host): each row's accepted count, then its emitted tokens
        self.result = torch.zeros(B, d + 2, **long)
        self.acc, self.emitted = self.result[:, 0], self.result[:, 1:]
        self.nz_draft = torch.ones(B, max(d, 1), V, device=dev)           # Exp(1) noise, drafts
        self.nz_u = torch.zeros(B, max(d, 1), device=dev)                 # U(0, 1), acceptance
        self.nz_final = torch.ones(B, V, device=dev)                      # Exp(1), the new token
        self.state = [self.last, self.pos, self.s0, self.valid, self.h_last, self.result]
        if self.eagle:
            # head logits of the first draft, over its draft vocabulary
            self.lg = torch.zeros(B, head.draft_vocab_size, dtype=head.dtype, device=dev)
            self.f = torch.zeros(B, head.stack_config().dim, dtype=head.dtype, device=dev)
            self.hvalid = torch.zeros(B, Sh, dtype=torch.bool, device=dev)
            self.hs0 = torch.zeros((), **long)
            self.state += [self.lg, self.f, self.hvalid, self.hs0]
        self.shape = (B, S, Sh)

    @torch.inference_mode()
    def warm(self, B: int, longest_prompt: int, max_new: int, params: SamplingParams) -> int:
        """Allocate what a batch of B prompts of up to longest_prompt tokens and max_new new
        tokens needs, and capture the graph of every window it can reach (the head's window never
        trails the target's: the head takes 2 x depth slots a step, the target depth + 1), so
        that such calls capture nothing. The iterations run on placeholder state (the next call's
        prefill resets it). Returns the number of graphs captured."""
        self.params, self.gen = params, None
        self.sampler.set(params)
        S, Sh = self.slots_needed(longest_prompt, max_new)
        self._alloc(B, bucket(S), bucket(Sh) if self.eagle else 0)
        if not self.use_graph:
            return 0
        T = self.depth + 1
        per_step_h = max(0, self.depth - 1) + T
        n = len(self.graphs)
        with _swapped_caches(self.model, self.caches), \
                (_swapped_caches(self.head, self.hcaches) if self.eagle else nullcontext()):
            for L in windows(self.shape[1]):
                for Lh in (windows(self.shape[2]) if self.eagle else [0]):
                    if (self.eagle and Lh < L) or (self.params.graph_mode, L, Lh) in self.graphs:
                        continue
                    self.valid.zero_()
                    self.s0.fill_(L - T)             # the last step this window serves
                    if self.eagle:
                        self.hvalid.zero_()
                        self.hs0.fill_(Lh - per_step_h)
                    self._step(L, Lh)
        return len(self.graphs) - n

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], max_new: int, done_fn, params: SamplingParams | None = None,
            generator: torch.Generator | None = None):
        """prompts: token id lists; done_fn(b, new_ids) -> True when row b is finished (it sees
        the new ids of one step); params: greedy by default, else speculative sampling of every
        row (generator: its noise). Returns each row's accepted-per-step list (one entry per target
        forward the row took part in after the prefill)."""
        self.params = params or SamplingParams()
        self.gen = generator
        self.sampler.set(self.params)
        B = len(prompts)
        Pmax = max(len(p) for p in prompts)
        S, Sh = self.slots_needed(Pmax, max_new)
        self._alloc(B, bucket(S), bucket(Sh) if self.eagle else 0)
        with _swapped_caches(self.model, self.caches), \
                (_swapped_caches(self.head, self.hcaches) if self.eagle else nullcontext()):
            return self._run(prompts, Pmax, done_fn)

    def _prefill(self, prompts, Pmax):
        """The prompts (right-padded, pad slots masked), eagerly; sets the state for the first
        iteration and returns the first new tokens (B,)."""
        model, head, dev = self.model, self.head, self.model.device
        B = len(prompts)
        n = torch.tensor([len(p) for p in prompts], device=dev)
        ar = torch.arange(Pmax, device=dev)
        tokens = torch.zeros(B, Pmax, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p, device=dev)
        self.valid.zero_()
        self.valid[:, :Pmax] = ar[None, :] < n[:, None]
        mask = (ar[None, :] <= ar[:, None])[None] & self.valid[:, None, :Pmax]   # (B, Pmax, Pmax)
        with not_exact():   # every path reads the cache this writes: no other forward to match
            _, hidden = model(tokens, ar.expand(B, Pmax), ar, mask, logits_index=ar[-1:])
        self.h_last.copy_(hidden[self.rows, n - 1])
        first = self._choose(model.output(self.h_last))                  # (B,)
        self.last.copy_(first)
        self.pos.copy_(n)                                                # position of `last`
        self.s0.fill_(Pmax)
        if self.eagle:
            self.hvalid.zero_()
            self.hs0.zero_()
            if Pmax > 1:     # head entries of positions 0..n-2: (x_{t+1}, f_t)
                T = Pmax - 1
                self.hvalid[:, :T] = ar[None, :T] < (n - 1)[:, None]
                hmask = (ar[None, :T] <= ar[:T, None])[None] & self.hvalid[:, None, :T]
                with not_exact():
                    head.prime(tokens[:, 1:], hidden[:, :T], ar[:T].expand(B, T), ar[:T], hmask)
                self.hs0.fill_(T)
            # the first catch-up: position n-1 (token `first`, feature f_{n-1}), one entry a row
            with self._drafting():
                self._catch_up(first[:, None], self.h_last[:, None], (n - 1)[:, None],
                               torch.zeros(B, dtype=torch.long, device=dev), bucket(Pmax))
        return first

    def _run(self, prompts, Pmax, done_fn):
        B, d = len(prompts), self.depth
        T = d + 1
        hstep = max(0, d - 1) + T                                        # head slots an iteration takes
        firsts = self._prefill(prompts, Pmax).tolist()
        finished = [done_fn(b, [firsts[b]]) for b in range(B)]
        per_step: list[list[int]] = [[] for _ in range(B)]
        S, Sh = self.shape[1], self.shape[2]
        wins, hwins = windows(S), (windows(Sh) if self.eagle else None)   # once, not per iteration
        cuda = self.model.device.type == "cuda"
        bufs = self._result_buffers(B, T, cuda)
        s0, hs0 = Pmax, (max(Pmax - 1, 0) + 1 if self.eagle else 0)    # the host's counts of the slots
        inflight, launched = [], 0

        def launch():
            """Queue one iteration, and the copy of its results to a host buffer."""
            nonlocal s0, hs0, launched
            L = window(wins, min(s0 + T, S))
            Lh = window(hwins, min(hs0 + hstep, Sh)) if self.eagle else 0
            self._draw_noise()
            self._step(L, Lh)
            buf, ev = bufs[launched % 2]
            launched += 1
            buf.copy_(self.result, non_blocking=cuda)       # contiguous both: a plain async copy
            if ev is not None:
                ev.record()
            inflight.append((buf, ev))
            s0 += T
            hs0 += hstep

        if not all(finished):
            launch()
        while inflight:
            # pipelined: the next iteration goes in before the host reads this one's tokens (its
            # inputs are all on the device); the cache has room for it, since every row is done
            # after at most max_new - 1 iterations. If this one finishes the batch, it is wasted.
            if self.pipeline and len(inflight) == 1 and s0 + T <= S and (not self.eagle or hs0 + hstep <= Sh):
                launch()
            buf, ev = inflight.pop(0)
            if ev is not None:
                ev.synchronize()
            res = buf.tolist()                                           # the iteration's one sync
            for b in range(B):
                if not finished[b]:
                    a = res[b][0]
                    per_step[b].append(a)
                    finished[b] = done_fn(b, res[b][1:a + 2])
            if all(finished):
                break
            if not inflight:
                launch()
        for _, ev in inflight:                # a discarded iteration: let it finish before reuse
            if ev is not None:
                ev.synchronize()
        return per_step

    def _result_buffers(self, B, T, cuda):
        """Two (host buffer (B, 1 + T): accepted count, tokens; completion event) pairs."""
        key = (B, T, cuda)
        if getattr(self, "_bufs_key", None) != key:
            self._bufs = [(torch.zeros(B, 1 + T, dtype=torch.long, pin_memory=cuda),
                           torch.cuda.Event() if cuda else None) for _ in range(2)]
            self._bufs_key = key
        return self._bufs

    # ---- one iteration over the static buffers: eager, or a CUDA graph per window
    def _step(self, L, Lh):
        if not self.use_graph:
            self._iterate(L, Lh)
            return
        key = (self.params.graph_mode, L, Lh)
        if key not in self.graphs:
            saved = [t.clone() for t in self.state]

            def reset():
                for t, s in zip(self.state, saved):
                    t.copy_(s)
            (g,), self.pool = capture([lambda: self._iterate(L, Lh)], reset, self.pool)
            reset()      # capturing ran the iteration: back to the state before it
            self.graphs[key] = g
        self.graphs[key].replay()

    def _draw_noise(self):
        """The iteration's randomness, drawn before it (so a captured graph replays fresh draws),
        in a fixed order: draft samples, acceptance uniforms, the new tokens."""
        if self.params.greedy:
            return
        g = self.gen
        if self.depth:
            self.nz_draft.exponential_(generator=g).clamp_min_(1e-30)
            self.nz_u.uniform_(generator=g)
        self.nz_final.exponential_(generator=g).clamp_min_(1e-30)

    def _iterate(self, L, Lh):
        """Draft (B, d) tokens, verify them with the rows' last tokens at slots s0 .. s0+d in one
        forward over the first L slots, accept each row's prefix, and advance the state."""
        model, head = self.model, self.head
        B, d = self.B, self.depth
        T, at, rows = d + 1, self.at, self.rows
        if d == 0:
            drafts, Q = self.last.new_zeros(B, 0), None
        elif self.eagle:
            with self._drafting():
                drafts, Q = self._draft_eagle(Lh)
        else:
            with self._drafting():
                logits = head.draft_logits(self.h_last[:, None], d)[:, :, 0]  # (d, B, Vd)
            drafts, Q = self._draft(logits.transpose(0, 1), self.nz_draft[:, :d])  # (B, d), (B, d, V)
        step = torch.cat([self.last[:, None], drafts], dim=1)            # (B, T)
        slots = self.s0 + at
        mask = _span_mask(self.valid[:, :L], self.cols[:L], self.s0, at)
        logits, hidden = model(step, self.pos[:, None] + at, slots, mask)
        acc, new_last = self._accept(drafts, Q, logits)                   # (B,), (B,)
        self.valid.scatter_(1, slots.expand(B, T), at[None, :] <= acc[:, None])  # fed + accepted
        self.h_last.copy_(hidden[rows, acc])
        emitted = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)      # drafts[:acc], then
        emitted.scatter_(1, acc[:, None], new_last[:, None])             # the target's token
        if self.eagle:   # head entries for positions pos .. pos+acc: (x_{pos+j+1}, f_{pos+j})
            with self._drafting():
                self._catch_up(emitted, hidden, self.pos[:, None] + at, acc, Lh)
        self.pos.add_(acc + 1)
        self.s0.add_(T)
        self.last.copy_(new_last)
        self.acc.copy_(acc)
        self.emitted.copy_(emitted)

    def _drafting(self):
        """The context of the head's forwards: exact mode off unless draft_exact."""
        return nullcontext() if self.draft_exact else not_exact()

    # ---- greedy choice or sampling (speculative sampling, per row, on a chain)
    def _choose(self, logits):
        """The target's token from logits (..., V): argmax, or a sample of its warped p (fresh
        noise: the prefill's, eager)."""
        if self.params.greedy:
            return argmax_last(logits)
        return sample(warp_probs(logits, self.sampler), draw_noise(logits.shape, self.gen, logits.device))

    def _draft(self, logits, noise):
        """Draft tokens (the target's ids) from the head's logits over its draft vocabulary
        (B, k, Vd): argmax, or samples of the warped q (returned too, over all V, (B, k, V), for the
        acceptance test) with noise (B, k, V)."""
        head = self.head
        if self.params.greedy:
            return head.to_token_ids(argmax_last(logits)), None
        q = warp_probs(logits, self.sampler)                             # over the draft vocabulary
        return head.to_token_ids(sample(q, noise[..., : q.shape[-1]])), head.to_full_probs(q)

    def _accept(self, drafts, Q, logits):
        """Each row's accepted drafts (B,) and its next token (B,) from the verify logits
        (B, d+1, V). Greedy: the longest prefix equal to the target's argmax, then its argmax.
        Sampling: draft j is kept with probability min(1, p_j(x) / q_j(x)) while all before it
        were; at the first rejection the token comes from the residual max(p - q, 0),
        normalised, else (all kept) from p_d: the output is distributed as the target's."""
        B, d = drafts.shape
        rows = self.rows
        if self.params.greedy:
            g = argmax_last(logits)                                      # (B, d+1)
            acc = (drafts == g[:, :d]).long().cumprod(dim=1).sum(dim=1)
            return acc, g.gather(1, acc[:, None])[:, 0]
        p = warp_probs(logits, self.sampler)                             # (B, d+1, V)
        if d == 0:
            return drafts.new_zeros(B), sample(p[:, 0], self.nz_final)
        px = p[:, :d].gather(-1, drafts[..., None])[..., 0]              # (B, d)
        qx = Q.gather(-1, drafts[..., None])[..., 0]
        acc = (self.nz_u[:, :d] * qx < px).long().cumprod(dim=1).sum(dim=1)   # u < p/q, in order
        p_a = p[rows, acc]                                               # (B, V)
        resid = (p_a - Q[rows, acc.clamp_max(d - 1)]).clamp_min(0)
        rs = resid.sum(-1, keepdim=True)
        rejected = (acc < d)[:, None]
        dist = torch.where(rejected & (rs > 0), resid / rs.clamp_min(1e-30), p_a)
        return acc, sample(dist, self.nz_final)

    def _catch_up(self, toks, feats, positions, idx, Lh):
        """Write the head entries (toks (B, T), features (B, T, D)) at head slots hs0 .. hs0+T-1,
        valid up to index idx (B,) of each row, attending over the first Lh head slots; keeps the
        head's logits and feature at idx (the first draft's logits and f for the next position)
        and advances hs0."""
        B, T = toks.shape
        at = self.at[:T]
        slots = self.hs0 + at
        mask = _span_mask(self.hvalid[:, :Lh], self.cols[:Lh], self.hs0, at)
        lg, f = self.head.draft_step(toks, feats, positions, slots, mask)
        self.hvalid.scatter_(1, slots.expand(B, T), at[None, :] <= idx[:, None])
        self.lg.copy_(lg[self.rows, idx])
        self.f.copy_(f[self.rows, idx])
        self.hs0.add_(T)

    def _draft_eagle(self, Lh):
        """A chain of depth d from the catch-up's logits and feature: level j's token is fed at
        position pos + j (`pos` is the position of the rows' last token) into scratch slot
        hs0 + j, seeing the scratch levels before it, never valid afterwards (the next catch-up
        writes the true entries after them)."""
        toks, qs = [], []
        lg, f = self.lg, self.f
        hv, cols = self.hvalid[:, :Lh], self.cols[:Lh]
        for j in range(self.depth):
            t, q = self._draft(lg[:, None], self.nz_draft[:, j:j + 1])  # (B, 1), (B, 1, V) or None
            t = t[:, 0]
            toks.append(t)
            qs.append(q)
            if j < self.depth - 1:
                m = _span_mask(hv, cols, self.hs0, self.at[j:j + 1])     # (B, 1, Lh): slots hs0..hs0+j
                lg, f = self.head.draft_step(t[:, None], f[:, None], (self.pos + j)[:, None],
                                             (self.hs0 + j).view(1), m)
                lg, f = lg[:, 0], f[:, 0]
        if self.depth > 1:
            self.hs0.add_(self.depth - 1)
        Q = None if self.params.greedy else torch.cat(qs, dim=1)        # (B, d, V)
        return torch.stack(toks, dim=1), Q


def _decoder(gen, head, depth):
    """The generator's batch decoder for this head and depth (the last one made, or a new one)."""
    dec = gen._batch_decoder
    if head is not None:
        gen.spec.use_vocab()          # the generator's own draft vocabulary (the head may be shared)
    vocab = head.vocab_ids if head is not None else None
    if (dec is None or dec.head is not head or dec.depth != (depth if head is not None else 0)
            or dec.vocab_ids is not vocab):
        dec = gen._batch_decoder = None     # the old one's caches go before the new one's come
        dec = gen._batch_decoder = BatchDecoder(gen.model, head, depth, use_graph=gen.use_cuda_graph,
                                                draft_exact=gen.spec.draft_exact if head is not None else None)
    return dec


def _check_depth(gen, head, depth):
    if head is not None and gen.spec.mode != "chain":
        raise KoalaError("generate_batch drafts chains only: build the generator with mode='chain' "
                         "(trees are batch 1 for now)")
    if depth is None:
        depth = gen.spec.depth if gen.spec is not None else 0
    if head is not None and (not isinstance(depth, int) or not 1 <= depth <= 16):
        raise KoalaError(f"depth must be an integer in 1..16, got {depth!r}")
    return depth


def warmup_batch(gen, batch_size: int, prompt_tokens: int, max_new_tokens: int = 256, temperatures=(0.0,),
                 top_p: float = 1.0, top_k: int = 0, depth: int | None = None) -> int:
    """SpeculativeGenerator.warmup_batch: see its docstring."""
    head = gen.spec.head if gen.spec is not None else None
    depth = _check_depth(gen, head, depth)
    for name, v in (("batch_size", batch_size), ("prompt_tokens", prompt_tokens), ("max_new_tokens", max_new_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KoalaError(f"{name} must be a positive integer, got {v!r}")
    if prompt_tokens + max_new_tokens + depth + 1 > gen.max_seq_len:
        raise ContextLengthError(f"prompt_tokens + max_new_tokens = {prompt_tokens + max_new_tokens} reaches past "
                                 f"the {gen.max_seq_len} positions the generator was built for")
    dec = _decoder(gen, head, depth)
    base = gen.encode("The quick brown fox jumps over the lazy dog. ", chat=False) or [0]
    ids = (base * (prompt_tokens // len(base) + 1))[:prompt_tokens]
    captured = 0
    for T in temperatures:
        params = SamplingParams(T, top_p, top_k) if T else SamplingParams()
        captured += dec.warm(batch_size, prompt_tokens, max_new_tokens, params)
        # and the eager parts (the prefill's kernels at this shape): a short real call
        generate_batch(gen, [ids] * batch_size, max_new_tokens=2, temperature=T, seed=0, ignore_eos=True,
                       depth=depth, **({} if T == 0 else dict(top_p=top_p, top_k=top_k)))
    return captured


def generate_batch(gen, prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                   top_k: int = 0, seed: int | None = None, stop=None, chat: bool | None = None,
                   ignore_eos: bool = False, depth: int | None = None):
    """SpeculativeGenerator.generate_batch: see its docstring."""
    from .generator import GenerationResult, GenerationStats, OutputTracker
    params = SamplingParams(temperature, top_p, top_k)          # checks the settings
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise KoalaError("generate_batch takes a non-empty list of prompts (each a string, chat messages "
                         "or token ids)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise KoalaError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    head = gen.spec.head if gen.spec is not None else None
    depth = _check_depth(gen, head, depth)
    if isinstance(stop, str):
        stop = [stop]
    ids = [gen.encode(p, chat) for p in prompts]
    dec = _decoder(gen, head, depth)
    longest = max(len(i) for i in ids)
    limit = gen.max_seq_len
    if longest + max_new_tokens + dec.depth + 1 > limit:
        raise ContextLengthError(
            f"the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} its positions "
            f"reach past the {limit} the generator was built for: shorten it, lower max_new_tokens, or "
            f"pass a larger max_seq_len to from_pretrained")
    eos = [] if ignore_eos else gen.model.config.eos_token_ids
    outs = [OutputTracker(gen.tokenizer, eos, stop, None, max_new_tokens) for _ in ids]
    dev = gen.model.device
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    rng = None
    if not params.greedy:
        rng = torch.Generator(device=dev)
        rng.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    per_step = dec.run(ids, max_new_tokens, lambda b, new: outs[b].add(new), params, rng)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    results = []
    for b, out in enumerate(outs):
        st = GenerationStats(prompt_tokens=len(ids[b]), new_tokens=len(out.ids), wall_s=wall,
                             target_forwards=len(per_step[b]))
        st.tokens_per_s = st.new_tokens / wall if wall > 0 else 0.0
        if head is not None:
            steps = per_step[b]
            st.accepted_per_step = steps
            st.tau = sum(a + 1 for a in steps) / max(1, len(steps))
            st.alpha = [sum(a >= i for a in steps) / max(1, sum(a >= i - 1 for a in steps))
                        for i in (1, 2, 3) if i <= depth]
        results.append(GenerationResult(text=out.text, token_ids=out.ids, stats=st))
    return results
