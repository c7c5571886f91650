"""Plain autoregressive decoding: the baseline every speedup is measured against.

The decode step reads and writes only static device buffers (token, position, step counter,
output slots, noise), so on CUDA it is captured once in a CUDA graph and replayed; the host
replays `chunk` steps back to back and synchronises once per chunk to read the tokens (for EOS,
stop strings and streaming). Steps past an EOS inside a chunk are discarded: greedy and seeded
decoding are deterministic, so the kept tokens are exactly those of a step-by-step loop.
"""
from __future__ import annotations

import torch

from .graphs import capture, window, windows
from .model import Transformer, _fused, argmax_last
from .sampling import SamplerState, graph_mode, sample, warp_probs


class PlainDecoder:
    def __init__(self, model: Transformer, chunk: int = 16, use_graph: bool | None = None):
        self.model = model
        dev = model.device
        self.S = model.max_len
        self.chunk = chunk
        self.use_graph = dev.type == "cuda" if use_graph is None else use_graph
        V = model.config.vocab_size
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)   # (1, 1) last token
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)        # (1,) its position == slot
        self.step = torch.zeros((), dtype=torch.long, device=dev)      # index into out/noise
        self.out = torch.zeros(chunk, dtype=torch.long, device=dev)    # (chunk,) tokens produced
        self.noise = torch.ones(chunk, V, device=dev)                  # (chunk, V) Exp(1) noise
        self.sampler = SamplerState(dev)
        self.slot_range = torch.arange(self.S, device=dev)             # (S,)
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}   # (graph mode, window)
        # attention reads only the first L cache slots: one graph per power-of-two window
        self.windows = windows(self.S)
        self.pool = None  # one memory pool shared by all captured graphs

    def _step(self, greedy: bool, L: int):
        mask = (self.slot_range[:L] <= self.pos).view(1, 1, L)          # (1, 1, L)
        logits, _ = self.model(self.token, self.pos.view(1, 1), self.pos, mask)
        lg = logits[:, -1]                                             # (1, V)
        if greedy:
            nxt = argmax_last(lg)
        else:
            nxt = sample(warp_probs(lg, self.sampler), self.noise.index_select(0, self.step))
        if _fused(nxt):   # the four updates below in one launch (kernels/accept.py)
            from kernels.accept import commit_token
            commit_token(nxt, self.out, self.step, self.token, self.pos)
            return
        self.out.index_copy_(0, self.step.view(1), nxt)
        self.token.copy_(nxt.view(1, 1))
        self.pos.add_(1)
        self.step.add_(1)

    def window(self, last_slot: int) -> int:
        """The attention window that reaches slot last_slot."""
        return window(self.windows, last_slot + 1)

    def _graph(self, greedy: bool, L: int):
        # sampling with and without top-k / top-p trace different code (warp_probs): a graph each
        key = (graph_mode(greedy, self.sampler.truncate), L)
        if key in self.graphs:
            return self.graphs[key]
        # warm up and capture at the window's last slot: the real step rewrites it before reading it
        saved = self.token.clone(), self.pos.clone()

        def reset():
            self.step.zero_(); self.pos.fill_(L - 1)
        (g,), self.pool = capture([lambda: self._step(greedy, L)], reset, self.pool)
        self.token.copy_(saved[0]); self.pos.copy_(saved[1])
        self.graphs[key] = g
        return g

    def start(self, token: int | torch.Tensor, pos: int):
        """Set the state to decode after `token`, which sits at position `pos` (not yet cached)."""
        self.token.fill_(token) if isinstance(token, int) else self.token.copy_(token.view(1, 1))
        self.pos.fill_(pos)

    def run(self, n: int, greedy: bool, pos: int, generator=None) -> torch.Tensor:
        """Decode n <= chunk tokens, the first at position pos (the host tracks it, so no sync);
        returns them (n,) on the device."""
        assert n <= self.chunk and pos + n <= self.S
        L = self.window(pos + n - 1)
        if not greedy:
            self.noise[:n].exponential_(generator=generator).clamp_min_(1e-30)
        self.step.zero_()
        if self.use_graph:
            g = self._graph(greedy, L)
            for _ in range(n):
                g.replay()
        else:
            for _ in range(n):
                self._step(greedy, L)
        return self.out[:n]
