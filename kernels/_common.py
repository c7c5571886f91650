"""Input checks, the PDL switch and small helpers shared by the host functions of every kernel.

Every host function validates its inputs here and raises ValueError with the argument's name,
its actual shape/dtype/device and what was expected: a kernel never silently falls back to
PyTorch. Under TRITON_INTERPRET=1 (CI, no GPU) the kernels run on CPU tensors.

Programmatic Dependent Launch (PDL)
-----------------------------------
At batch 1 a decode step is ~180 small launches; under a CUDA graph each still waits for its
predecessor to drain, launch and load its weights (1-2 us each at 2.4-6.9 us per GEMV). With
PDL (sm_90+) a kernel launched with `launch_pdl=True` may start while the kernel before it in
the stream is finishing: it can do independent work (load constant weights) and then block in
`gdc_wait()` until the predecessor has completed and its writes are visible. Every kernel here
takes `USE_GDC: tl.constexpr`; every host function passes `USE_GDC=pdl(), launch_pdl=pdl()`.
The rules each kernel follows when USE_GDC is True:

1. `gdc_wait()` comes before the first load of anything an earlier kernel may have written
   (activations, KV caches, positions, masks, slots, lengths, scratch) and before the first
   store (a store before the wait could overwrite a buffer the predecessor still reads). Only
   constant model parameters (W, norm weights, biases) may be loaded before it: the linear
   GEMV path loads its first W tile (all of it when BLOCK_K >= K), its bias and its norm
   weights there, which hides their DRAM latency behind the predecessor's tail. So a weight
   passed to a kernel must not be an output of the kernel launched just before it.
2. Every program calls `gdc_wait()` unconditionally (no early exit before it): a kernel then
   completes only after its predecessor did, so waiting on the previous grid also orders it
   after every earlier one.
3. `gdc_launch_dependents()` comes right after the wait: the next kernel may then be scheduled
   while this one computes, and since it fires only after every program here passed its wait,
   at most two koala kernels overlap, the earlier one past its wait.
4. The arithmetic is the same code with USE_GDC on or off (the weight prefetch is done in both
   modes; only the wait/trigger instructions differ), so outputs are bitwise equal either way
   and the exact (batch-invariant) mode keeps its guarantees.

Kernels that are not ours (torch ops, cuBLAS, copies) never trigger early and are launched
without the PDL attribute, so they serialise as usual: a koala kernel after one of them starts
when it has completed (its gdc_wait returns at once), and one before it is fully complete before
it starts. Mixing the two is therefore safe, in eager mode and inside a captured CUDA graph.

`pdl()` is True only with CUDA, a device of capability >= 9.0, no TRITON_INTERPRET (the
interpreter accepts `launch_pdl` but cannot run `gdc_wait`) and KOALA_PDL != "0"; it is computed
once. `set_pdl(on)` / `pdl_enabled(on)` override it (tests, benchmarks).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import triton

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INTS = (torch.int32, torch.int64)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pdl_supported() -> bool:
    """The hardware and runtime can run PDL kernels: CUDA, sm_90 or newer, not interpreting."""
    return (not interpreting() and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (9, 0))


_PDL: bool | None = None          # cached pdl(); None: not computed yet
_PDL_FORCED: bool | None = None   # set_pdl's override; None: follow KOALA_PDL


def pdl() -> bool:
    """Launch every kernel with PDL (USE_GDC=True, launch_pdl=True)? See the module docstring."""
    global _PDL
    if _PDL is None:
        want = os.environ.get("KOALA_PDL", "1") != "0" if _PDL_FORCED is None else _PDL_FORCED
        _PDL = bool(want) and pdl_supported()
    return _PDL


def set_pdl(on: bool | None) -> None:
    """Force PDL on (where pdl_supported()) or off; None goes back to KOALA_PDL. Clears the cache.
    A CUDA graph keeps the launches it captured: switch before capturing."""
    global _PDL, _PDL_FORCED
    _PDL_FORCED, _PDL = on, None


@contextmanager
def pdl_enabled(on: bool | None):
    """with pdl_enabled(False): ... runs (or captures) the kernels without PDL, then restores."""
    prev = _PDL_FORCED
    set_pdl(on)
    try:
        yield
    finally:
        set_pdl(prev)


def check_device(*named):
    """All tensors on one device; a CPU tensor is only allowed under TRITON_INTERPRET=1."""
    devs = {t.device for _, t in named}
    if len(devs) != 1:
        raise ValueError("tensors on different devices: "
                         + ", ".join(f"{n}={t.device}" for n, t in named))
    dev = devs.pop()
    if dev.type != "cuda" and not interpreting():
        raise ValueError(f"{named[0][0]} is on {dev}: Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 to run them on the CPU)")
    return dev


def check_tensor(name, t, ndim=None, dtypes=None, shape=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {dtypes}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected "
                                 f"{tuple('*' if s is None else s for s in shape)} (dim {i})")


def check_last_contiguous(name, t):
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
