"""CUDA-graph capture shared by the plain decoder and the speculative decoder."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


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
