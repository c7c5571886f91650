"""A chain iteration's index tensors in one launch.

    chain_indices(L, N, W, cu_n=None, d1=0, root=None)
        -> ChainIndices(slots, mask, cu_pos, cu_mask, cu_row, tokens)

A speculative chain of N nodes at committed length L (a 0-d int tensor on the device):
  slots (N,) int64        = L + i                   the nodes' cache slots and positions
  mask (1, N, W) bool     = j <= L + i              what node i sees of a W-slot window
and, for an EAGLE head's catch-up over the cu_n (0-d) tokens accepted last time, padded to d1:
  cu_pos (d1,) int64      = L - cu_n + i
  cu_mask (1, d1, W) bool = j <= cu_pos[i]
  cu_row (1,) int64       = cu_n - 1                the catch-up row the draft keeps
  tokens (N,) int64       = [root, 0, ...]          the chain's token buffer, its root written
                                                    (the drafted levels fill the rest in place)

Why: these were six PyTorch launches an EAGLE iteration (two subtractions, an addition and a
compare for the catch-up, an addition and a compare for the verify) and a concatenation of the
drafted tokens; under a CUDA graph each costs a launch and breaks the chain of PDL kernels
(kernels/_common.py). L does not change between the draft and the verify of one iteration, so
the draft's launch computes the verify's indices too. Integer arithmetic and compares only: the
same values as the PyTorch reference (`chain_indices_ref`). One program per row of the two
masks; rows are written in blocks of BLOCK_W slots.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import INTS, check_device, check_tensor, pdl
from ._tl import pdl_wait

BLOCK_W = 1024


class ChainIndices(NamedTuple):
    slots: torch.Tensor
    mask: torch.Tensor
    cu_pos: torch.Tensor | None
    cu_mask: torch.Tensor | None
    cu_row: torch.Tensor | None
    tokens: torch.Tensor | None


@triton.jit
def _chain_indices_kernel(
    L_ptr, cu_n_ptr, root_ptr,                                   # pointers (inputs)
    slots_ptr, mask_ptr, cu_pos_ptr, cu_mask_ptr, cu_row_ptr, tok_ptr,   # pointers (outputs)
    N, D1, W,                                                    # sizes
    HAS_CU: tl.constexpr, HAS_ROOT: tl.constexpr, BLOCK_W: tl.constexpr, USE_GDC: tl.constexpr,
):
    pdl_wait(USE_GDC)              # L, cu_n and root are written by the previous iteration
    r = tl.program_id(0)
    L = tl.load(L_ptr).to(tl.int64)
    j0 = tl.arange(0, BLOCK_W)
    if r < N:                      # a verify row: node r at slot L + r
        p = L + r
        tl.store(slots_ptr + r, p)
        row = mask_ptr + r.to(tl.int64) * W
        for w0 in range(0, W, BLOCK_W):
            j = w0 + j0
            tl.store(row + j, (j <= p).to(tl.int1), mask=j < W)
        if HAS_ROOT:
            if r == 0:
                tl.store(tok_ptr, tl.load(root_ptr).to(tl.int64))
            else:
                tl.store(tok_ptr + r, L * 0)
    if HAS_CU:
        if r >= N:                 # a catch-up row i = r - N at position L - cu_n + i
            i = r - N
            cu_n = tl.load(cu_n_ptr).to(tl.int64)
            p = L - cu_n + i
            tl.store(cu_pos_ptr + i, p)
            if i == 0:
                tl.store(cu_row_ptr, cu_n - 1)
            row = cu_mask_ptr + i.to(tl.int64) * W
            for w0 in range(0, W, BLOCK_W):
                j = w0 + j0
                tl.store(row + j, (j <= p).to(tl.int1), mask=j < W)


def _scalar(name, t):
    check_tensor(name, t, dtypes=INTS)
    if t.numel() != 1:
        raise ValueError(f"{name} must hold one value, got shape {tuple(t.shape)}")


def chain_indices(L: torch.Tensor, N: int, W: int, cu_n: torch.Tensor | None = None, d1: int = 0,
                  root: torch.Tensor | None = None) -> ChainIndices:
    """L, cu_n, root: one-element int tensors on one device; N >= 1 chain nodes, W >= 1 window
    slots, d1 >= 1 catch-up rows when cu_n is given. See the module docstring. One launch."""
    _scalar("L", L)
    named = [("L", L)]
    if cu_n is not None:
        _scalar("cu_n", cu_n)
        named.append(("cu_n", cu_n))
        if d1 < 1:
            raise ValueError(f"d1 must be >= 1 with cu_n, got {d1}")
    if root is not None:
        _scalar("root", root)
        named.append(("root", root))
    if N < 1 or W < 1:
        raise ValueError(f"N and W must be >= 1, got N={N}, W={W}")
    dev = check_device(*named)
    slots = torch.empty(N, dtype=torch.long, device=dev)
    mask = torch.empty(1, N, W, dtype=torch.bool, device=dev)
    has_cu = cu_n is not None
    cu_pos = torch.empty(d1, dtype=torch.long, device=dev) if has_cu else None
    cu_mask = torch.empty(1, d1, W, dtype=torch.bool, device=dev) if has_cu else None
    cu_row = torch.empty(1, dtype=torch.long, device=dev) if has_cu else None
    tokens = torch.empty(N, dtype=torch.long, device=dev) if root is not None else None
    _chain_indices_kernel[(N + (d1 if has_cu else 0),)](
        L, cu_n if has_cu else L, root if root is not None else L,
        slots, mask, cu_pos if has_cu else slots, cu_mask if has_cu else mask,
        cu_row if has_cu else slots, tokens if tokens is not None else slots,
        N, d1, W,
        HAS_CU=has_cu, HAS_ROOT=root is not None, BLOCK_W=min(BLOCK_W, triton.next_power_of_2(W)),
        USE_GDC=pdl(), num_warps=4 if W >= 1024 else 1, launch_pdl=pdl(),
    )
    return ChainIndices(slots, mask, cu_pos, cu_mask, cu_row, tokens)


def chain_indices_ref(L, N: int, W: int, cu_n=None, d1: int = 0, root=None) -> ChainIndices:
    """What koala.speculative ran before, in PyTorch."""
    dev = L.device
    L = L.reshape(()).long()
    ar = torch.arange(W, device=dev)
    slots = L + torch.arange(N, device=dev)
    mask = (ar <= slots[:, None]).unsqueeze(0)
    cu_pos = cu_mask = cu_row = tokens = None
    if cu_n is not None:
        cu_n = cu_n.reshape(()).long()
        cu_pos = (L - cu_n) + torch.arange(d1, device=dev)
        cu_mask = (ar <= cu_pos[:, None]).unsqueeze(0)
        cu_row = (cu_n - 1).view(1)
    if root is not None:
        tokens = torch.zeros(N, dtype=torch.long, device=dev)
        tokens[0] = root.reshape(())
    return ChainIndices(slots, mask, cu_pos, cu_mask, cu_row, tokens)
