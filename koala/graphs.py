"""CUDA-graph capture and attention windows, shared by the plain, speculative and batch decoders
and the graphed prefill.

A captured graph bakes in the attention's width, so every decoder captures one graph per
*window*: attention reads the first L cache slots only, L a power of two from MIN_WINDOW up
(then the cache's own size), and a step uses the smallest window that holds the slots it
reads. One list of windows and one rule for picking among them, so that the decoders that share
caches and graphs agree."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

MIN_WINDOW = 256   # the smallest attention window (slots) a graph is captured for


def bucket(n: int) -> int:
    """The power of two >= n, at least MIN_WINDOW: the sizes caches are allocated in, so that a
    decoder (its caches and graphs) serves many calls."""
    w = MIN_WINDOW
    while w < n:
        w *= 2
    return w


def windows(S: int) -> list[int]:
    """The attention windows of a cache of S slots: MIN_WINDOW, 2x, 4x, ... below S, then S."""
    if S < 1:
        raise ValueError(f"a cache of {S} slots has no attention window")
    out, w = [], MIN_WINDOW
    while w < S:
        out.append(w)
        w *= 2
    return out + [S]


def window(wins: Sequence[int], need: int) -> int:
    """The smallest of `wins` (ascending, as windows() gives them) that holds `need` slots."""
    for w in wins:
        if w >= need:
            return w
    raise ValueError(f"{need} cache slots needed, but the cache has {wins[-1]}: "
                     "allocate a longer one (max_seq_len)")


def capture(fns: Sequence[Callable[[], None]], reset: Callable[[], None], pool=None):
    """Capture each of `fns` (run in order) into its own CUDA graph sharing one memory pool.

    They first run twice on a side stream, so that Triton compiles its kernels and cuBLAS picks
    its algorithms outside the capture; `reset()` puts the state buffers back to a valid start
    before each warm-up pass and before the capture. The caller restores the real state
    afterwards (capturing writes through the same static buffers).
    Returns (graphs, pool); pass the pool back in to keep every graph in one pool.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            reset()
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(side)
    if pool is None:
        pool = torch.cuda.graph_pool_handle()
    reset()
    graphs = []
    for f in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            f()
        graphs.append(g)
    return graphs, pool
