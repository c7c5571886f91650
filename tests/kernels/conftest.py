"""Shared helpers for the kernel tests.

The tests run on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1 (CI); the
interpreter is slow, so the shapes stay small there and grow only on a GPU.
"""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

if not ON_GPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU: run the kernel tests with TRITON_INTERPRET=1", allow_module_level=True)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_baseline(out, ref_exact, ref_low, floor=1e-6, factor=2.0, what=""):
    """out: the kernel's result; ref_exact: the reference in fp64 (or fp32) on the same inputs;
    ref_low: the same reference run in the test dtype. The kernel may be at most `factor` times
    as far from the exact answer as the reference itself is, plus a tiny floor."""
    assert out.shape == ref_exact.shape, (out.shape, ref_exact.shape)
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite values (poison left?)"
    e_out, e_ref = max_err(out, ref_exact), max_err(ref_low, ref_exact)
    assert e_out <= factor * e_ref + floor, f"{what}: kernel error {e_out:.3g} > {factor} x reference error {e_ref:.3g} + {floor:g}"


def poison(t):
    """Fill an output buffer with NaN (or a large value for ints) so unwritten entries show."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(-12345)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
