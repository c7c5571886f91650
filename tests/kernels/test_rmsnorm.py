import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close_to_baseline
from kernels.rmsnorm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref

SHAPES = [(1, 8), (5, 123), (3, 576)] + ([(64, 4096), (257, 1000)] if ON_GPU else [])


@pytest.mark.parametrize("M,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(M, D, dtype):
    x = torch.randn(M, D, device=DEVICE) * 3 + 0.5
    w = torch.rand(D, device=DEVICE) + 0.5
    xl, wl = x.to(dtype), w.to(dtype)
    out = rms_norm(xl, wl, 1e-5)
    assert out.dtype == dtype
    exact = rms_norm_ref(xl.double(), wl.double(), 1e-5)
    assert_close_to_baseline(out, exact, rms_norm_ref(xl, wl, 1e-5), floor=1e-6, what="rms_norm")


def test_rms_norm_strided_rows_and_batch_dims():
    x = torch.randn(2, 3, 40, device=DEVICE)[:, :, :33]     # rows of 33 with stride 40
    w = torch.randn(33, device=DEVICE)
    out = rms_norm(x, w, 1e-6)
    assert out.shape == (2, 3, 33)
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_rms_norm_rejects_bad_inputs():
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="last dims"):
        rms_norm(x, torch.ones(15, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x.to(torch.int32), torch.ones(16, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm(x.t(), torch.ones(4, device=DEVICE), 1e-5)


@pytest.mark.parametrize("M,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_reference(M, D, dtype):
    x = (torch.randn(M, D, device=DEVICE) * 2).to(dtype)
    r = torch.randn(M, D, device=DEVICE).to(dtype)
    w = (torch.rand(D, device=DEVICE) + 0.5).to(dtype)
    s, y = add_rms_norm(x, r, w, 1e-5)
    s_ref, y_ref = add_rms_norm_ref(x, r, w, 1e-5)
    assert torch.equal(s, s_ref)                         # one rounding of an exact sum: identical
    exact = rms_norm_ref(s_ref.double(), w.double(), 1e-5)
    assert_close_to_baseline(y, exact, y_ref, floor=1e-6, what="add_rms_norm")
