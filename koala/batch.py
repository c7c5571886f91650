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
levels). The batch has caches of its own, allocated per call; the generator's batch-1 caches and
their CUDA graphs are left as they were. This path runs eagerly (no CUDA graph) and drafts
chains only; trees and graphs are batch 1 for now. Sampling is speculative sampling row by row:
each draft is kept with probability min(1, p/q), the first rejected one is replaced from the
residual, so every row's tokens are distributed as the target's own samples (tested against
the exact distribution), though not the same draws as `generate` with the same seed.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch

from .errors import ContextLengthError, KoalaError
from .model import KVCache, argmax_last
from .sampling import SamplerState, SamplingParams, draw_noise, sample, warp_probs


@contextmanager
def _own_cache(stack, batch: int, slots: int):
    """Give a CachedStack (the target or an EAGLE head) fresh (batch, slots) KV caches for the
    block, then put its own back (the same tensors, so captured graphs stay valid)."""
    cfg = stack.stack_config()
    saved = [layer.attention.kv_cache for layer in stack.layers]
    try:
        for layer in stack.layers:
            layer.attention.kv_cache = KVCache(batch, cfg.n_kv_heads, slots, cfg.head_dim, stack.dtype, stack.device)
        yield
    finally:
        for layer, c in zip(stack.layers, saved):
            layer.attention.kv_cache = c


def _block_mask(valid, s0: int, T: int):
    """(B, T, s0 + T): the rows' valid slots before s0, then causal over the step's T slots."""
    B = valid.shape[0]
    new = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    return torch.cat([valid[:, None, :s0].expand(B, T, s0), new.expand(B, T, T)], dim=-1)


class BatchDecoder:
    """Decoding of B prompts at once: plain (head None) or a chain of `depth` drafts from a
    Medusa or EAGLE head, greedy or sampled. run() reports each row's new tokens to done_fn and
    returns its accepted-per-step list."""

    def __init__(self, model, head=None, depth: int = 1):
        from .heads import EagleHead
        self.model, self.head = model, head
        self.eagle = isinstance(head, EagleHead)
        self.depth = depth if head is not None else 0
        if head is not None and not self.eagle and self.depth > head.config.n_heads:
            raise KoalaError(f"a Medusa head with {head.config.n_heads} heads drafts at most "
                             f"{head.config.n_heads} tokens deep; got depth={depth}")

    def slots_needed(self, longest_prompt: int, max_new: int) -> tuple[int, int]:
        """(target slots, EAGLE head slots) a batch needs."""
        d1 = self.depth + 1
        target = longest_prompt + d1 * max_new
        head = longest_prompt + (d1 + max(0, self.depth - 1)) * max_new if self.eagle else 0
        return target, head

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], max_new: int, done_fn, params: SamplingParams | None = None,
            generator: torch.Generator | None = None):
        """prompts: token id lists; done_fn(b, new_ids) -> True when row b is finished (it sees
        the new ids of one step); params: greedy by default, else speculative sampling of every
        row (generator: its noise). Returns each row's accepted-per-step list (one entry per target
        forward the row took part in after the prefill)."""
        model, dev = self.model, self.model.device
        self.params = params or SamplingParams()
        self.gen = generator
        self.sampler = SamplerState(dev)
        self.sampler.set(self.params)
        B = len(prompts)
        n = torch.tensor([len(p) for p in prompts], device=dev)
        Pmax = int(n.max())
        S, Sh = self.slots_needed(Pmax, max_new)
        with _own_cache(model, B, S), (_own_cache(self.head, B, Sh) if self.eagle else nullcontext()):
            return self._run(prompts, n, Pmax, S, Sh, done_fn)

    def _run(self, prompts, n, Pmax, S, Sh, done_fn):
        model, head, dev = self.model, self.head, self.model.device
        B, d = len(prompts), self.depth
        ar = torch.arange(Pmax, device=dev)
        tokens = torch.zeros(B, Pmax, dtype=torch.long, device=dev)      # right-padded (masked)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p, device=dev)
        valid = torch.zeros(B, S, dtype=torch.bool, device=dev)          # the slots of each row's text
        valid[:, :Pmax] = ar[None, :] < n[:, None]
        mask = (ar[None, :] <= ar[:, None])[None] & valid[:, None, :Pmax]  # (B, Pmax, Pmax)
        rows = torch.arange(B, device=dev)
        _, hidden = model(tokens, ar.expand(B, Pmax), ar, mask, logits_index=ar[-1:])
        h_last = hidden[rows, n - 1]                                     # (B, D)
        last = self._choose(model.output(h_last))                        # (B,) the first new token
        pos = n.clone()                                                  # position of `last`
        s0 = Pmax                                                        # next free target slot
        firsts = last.tolist()
        finished = [done_fn(b, [firsts[b]]) for b in range(B)]
        per_step: list[list[int]] = [[] for _ in range(B)]
        if self.eagle:
            hvalid = torch.zeros(B, Sh, dtype=torch.bool, device=dev)
            hs0 = 0
            if Pmax > 1:     # head entries of positions 0..n-2: (x_{t+1}, f_t)
                T = Pmax - 1
                hvalid[:, :T] = ar[None, :T] < (n - 1)[:, None]
                hmask = (ar[None, :T] <= ar[:T, None])[None] & hvalid[:, None, :T]
                head(tokens[:, 1:], hidden[:, :T], ar[:T].expand(B, T), ar[:T], hmask)
                hs0 = T
            # the first catch-up: position n-1 (token `last`, feature f_{n-1}), one entry a row
            lg, f, hs0 = self._catch_up(last[:, None], h_last[:, None], (n - 1)[:, None],
                                        torch.zeros(B, dtype=torch.long, device=dev), hvalid, hs0)
        while not all(finished):
            self.pos = pos          # (tests' oracle heads read it)
            # ---- draft: (B, d) tokens
            if d == 0:
                drafts, Q = last.new_zeros(B, 0), None
            elif self.eagle:
                drafts, Q, hs0 = self._draft_eagle(lg, f, pos, hvalid, hs0)
            else:
                logits = head(h_last[:, None])[:d, :, 0]                  # (d, B, V)
                drafts, Q = self._draft(logits.transpose(0, 1))          # (B, d), (B, d, V) or None
            # ---- verify: the rows' last token and drafts at slots s0 .. s0+d, one forward
            T = d + 1
            step = torch.cat([last[:, None], drafts], dim=1)             # (B, T)
            at = torch.arange(T, device=dev)
            slots = s0 + at
            logits, hidden = model(step, pos[:, None] + at, slots, _block_mask(valid, s0, T))
            acc, new_last = self._accept(drafts, Q, logits)               # (B,), (B,)
            valid[:, s0:s0 + T] = at[None, :] <= acc[:, None]            # fed token + accepted drafts
            h_last = hidden[rows, acc]
            emitted = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)  # (B, T): drafts[:acc], then
            emitted[rows, acc] = new_last                                # the target's token
            if self.eagle:   # head entries for positions pos .. pos+acc: (x_{pos+j+1}, f_{pos+j})
                lg, f, hs0 = self._catch_up(emitted, hidden, pos[:, None] + at, acc, hvalid, hs0)
            pos = pos + acc + 1
            s0 += T
            last = new_last
            acc_l, em_l = acc.tolist(), emitted.tolist()                 # the step's one sync
            for b in range(B):
                if not finished[b]:
                    per_step[b].append(acc_l[b])
                    finished[b] = done_fn(b, em_l[b][:acc_l[b] + 1])
        return per_step

    # ---- greedy choice or sampling (speculative sampling, per row, on a chain)
    def _noise(self, shape):
        return draw_noise(shape, self.gen, self.model.device)

    def _choose(self, logits):
        """The target's token from logits (..., V): argmax, or a sample of its warped p."""
        if self.params.greedy:
            return argmax_last(logits)
        return sample(warp_probs(logits, self.sampler), self._noise(logits.shape))

    def _draft(self, logits):
        """Draft tokens from the head's logits (B, d, V): argmax, or samples of the warped q
        (returned too, (B, d, V), for the acceptance test)."""
        if self.params.greedy:
            return argmax_last(logits), None
        q = warp_probs(logits, self.sampler)
        return sample(q, self._noise(q.shape)), q

    def _accept(self, drafts, Q, logits):
        """Each row's accepted drafts (B,) and its next token (B,) from the verify logits
        (B, d+1, V). Greedy: the longest prefix equal to the target's argmax, then its argmax.
        Sampling: draft j is kept with probability min(1, p_j(x) / q_j(x)) while all before it
        were; at the first rejection the token comes from the residual max(p - q, 0),
        normalised, else (all kept) from p_d: the output is distributed as the target's."""
        B, d = drafts.shape
        rows = torch.arange(B, device=drafts.device)
        if self.params.greedy:
            g = argmax_last(logits)                                      # (B, d+1)
            acc = (drafts == g[:, :d]).long().cumprod(dim=1).sum(dim=1)
            return acc, g[rows, acc]
        p = warp_probs(logits, self.sampler)                             # (B, d+1, V)
        if d == 0:
            return drafts.new_zeros(B), sample(p[:, 0], self._noise(p[:, 0].shape))
        px = p[:, :d].gather(-1, drafts[..., None])[..., 0]              # (B, d)
        qx = Q.gather(-1, drafts[..., None])[..., 0]
        u = torch.rand((B, d), generator=self.gen, device=drafts.device)
        acc = (u * qx < px).long().cumprod(dim=1).sum(dim=1)             # u < p/q, in order
        p_a = p[rows, acc]                                               # (B, V)
        resid = (p_a - Q[rows, acc.clamp_max(d - 1)]).clamp_min(0)
        rs = resid.sum(-1, keepdim=True)
        rejected = (acc < d)[:, None]
        dist = torch.where(rejected & (rs > 0), resid / rs.clamp_min(1e-30), p_a)
        return acc, sample(dist, self._noise(dist.shape))

    def _catch_up(self, toks, feats, positions, idx, hvalid, hs0):
        """Write the head entries (toks (B, T), features (B, T, D)) at head slots hs0 .. hs0+T-1,
        valid up to index idx (B,) of each row; returns the head's logits and feature at idx
        (the first draft's logits (B, V) and f for the next position (B, D)) and the next slot."""
        B, T = toks.shape
        at = torch.arange(T, device=toks.device)
        lg, f = self.head(toks, feats, positions, hs0 + at, _block_mask(hvalid, hs0, T))
        hvalid[:, hs0:hs0 + T] = at[None, :] <= idx[:, None]
        rows = torch.arange(B, device=toks.device)
        return lg[rows, idx], f[rows, idx], hs0 + T

    def _draft_eagle(self, lg, f, pos, hvalid, hs0):
        """A chain of depth d from the catch-up's logits lg (B, V) and feature f (B, D): level j's
        token is fed at position pos + j (`pos` is the position of the rows' last token) into a
        scratch slot, never valid afterwards (the next catch-up writes the true entries)."""
        toks, qs = [], []
        scratch = []
        for j in range(self.depth):
            t, q = self._draft(lg[:, None])                              # (B, 1), (B, 1, V) or None
            t = t[:, 0]
            toks.append(t)
            qs.append(q)
            if j < self.depth - 1:
                m = _block_mask(hvalid, hs0, 1)                          # (B, 1, hs0 + 1)
                if scratch:   # the earlier levels' scratch slots are this level's ancestors
                    m[:, :, scratch] = True
                lg, f = self.head(t[:, None], f[:, None], (pos + j)[:, None], torch.tensor([hs0], device=t.device), m)
                lg, f = lg[:, 0], f[:, 0]
                scratch.append(hs0)
                hs0 += 1
        Q = None if self.params.greedy else torch.cat(qs, dim=1)        # (B, d, V)
        return torch.stack(toks, dim=1), Q, hs0


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
    if head is not None and gen.spec.mode != "chain":
        raise KoalaError("generate_batch drafts chains only: build the generator with mode='chain' "
                         "(trees are batch 1 for now)")
    if depth is None:
        depth = gen.spec.depth if gen.spec is not None else 0
    if head is not None and (not isinstance(depth, int) or not 1 <= depth <= 16):
        raise KoalaError(f"depth must be an integer in 1..16, got {depth!r}")
    if isinstance(stop, str):
        stop = [stop]
    ids = [gen.encode(p, chat) for p in prompts]
    dec = BatchDecoder(gen.model, head, depth)
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
