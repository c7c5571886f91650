"""A prompt's prefill in CUDA graphs, one graph per bucket of prompt lengths.

Run eagerly, the prefill of SmolLM2-135M costs far more host time than GPU time: some 300 kernel
launches through Python, each several microseconds on a slow host, for a forward that the GPU
finishes in about a millisecond (bench/overhead.py measures both). So the prompt is copied into a
static buffer, padded to the next bucket (32, 64, ..., up to CAPTURED_MAX tokens), and a graph
captured once per bucket replays the whole forward: the target's layers, its last real row's
logits, and, for an EAGLE head, the head's pass over the prompt's features. Longer prompts run
eagerly, where the GPU time dominates anyway.

The padding is harmless: its tokens sit after the prompt, so causal attention keeps them out of
every real row, and the cache slots they write lie past the prompt, where every later step masks
them until it writes its own entry there first. Plain and speculative decoding share this
prefill, so their outputs stay equal bit for bit (the forwards after it are what exact mode
matches); the prefill itself runs outside exact mode (koala.model.not_exact).
"""
from __future__ import annotations

import torch

from .graphs import capture
from .model import causal_mask, not_exact

BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
CAPTURED_MAX = BUCKETS[-1]


class PrefillGraphs:
    """Graph-replayed prefills for one model (and optionally the EAGLE head that reads its
    features), sharing one memory pool. window(last_slot) is the attention width that reaches
    last_slot (the plain decoder's windows). graphs=False runs the same padded forward eagerly
    (the CPU tests check the padding with it)."""

    def __init__(self, model, window, head=None, graphs: bool = True):
        self.model, self.window, self.head, self.use_graphs = model, window, head, graphs
        dev = model.device
        self.S = model.max_len
        self.buckets = [b for b in BUCKETS if b <= self.S]
        cap = self.buckets[-1] if self.buckets else 0
        self.tokens = torch.zeros(1, cap, dtype=torch.long, device=dev)
        self.n = torch.ones((), dtype=torch.long, device=dev)            # the prompt's length
        self.ar = torch.arange(cap, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.pool = None

    def bucket(self, n: int) -> int | None:
        """The padded length a prompt of n tokens runs at, or None (eager: too long)."""
        return next((b for b in self.buckets if b >= n), None)

    def _forward(self, Tb: int):
        toks, s = self.tokens[:, :Tb], self.ar[:Tb]
        mask = causal_mask(s, self.window(Tb - 1))
        with not_exact():
            logits, hidden = self.model(toks, s[None], s, mask, logits_index=(self.n - 1).view(1))
            if self.head is not None and Tb > 1:   # head entries (x_{t+1}, f_t), t = 0..Tb-2
                p = s[: Tb - 1]
                self.head.prime(toks[:, 1:], hidden[:, : Tb - 1], p[None], p, mask[:, : Tb - 1])
        return logits[:, -1], hidden

    def _graph(self, Tb: int):
        if Tb not in self.graphs:
            out = {}

            def run():
                out["result"] = self._forward(Tb)

            def reset():
                self.n.fill_(Tb)
            (g,), self.pool = capture([run], reset, self.pool)
            self.graphs[Tb] = (g, out["result"])
        return self.graphs[Tb]

    def capture_all(self, up_to: int | None = None):
        """Capture every bucket up to `up_to` tokens (all by default): warm-up."""
        if not self.use_graphs or not self.buckets:
            return
        last = self.buckets[-1] if up_to is None else self.bucket(min(up_to, self.buckets[-1]))
        for b in self.buckets:
            if b <= last:
                self._graph(b)

    def run(self, ids: list[int]):
        """Prefill the cache with ids (and the head's cache, with a head); returns the logits of
        the last prompt row (1, V) and the hidden states (1, T, D), T >= len(ids) (rows past the
        prompt are padding), or None when the prompt is longer than every bucket."""
        n = len(ids)
        Tb = self.bucket(n)
        if Tb is None:
            return None
        # the host's list lands in the static buffers; padding repeats nothing of importance
        self.tokens[0, :n].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=False)
        if not self.use_graphs:
            self.n.fill_(n)
            return self._forward(Tb)
        g, (logits, hidden) = self._graph(Tb)   # a first capture leaves n at Tb: set n after it
        self.n.fill_(n)
        g.replay()
        return logits, hidden
