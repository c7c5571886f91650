"""Input checks and small helpers shared by the host functions of every kernel.

Every host function validates its inputs here and raises ValueError with the argument's name,
its actual shape/dtype/device and what was expected: a kernel never silently falls back to
PyTorch. Under TRITON_INTERPRET=1 (CI, no GPU) the kernels run on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INTS = (torch.int32, torch.int64)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
