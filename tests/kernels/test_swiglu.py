import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close_to_baseline
from kernels.swiglu import silu_mul, silu_mul_ref

SHAPES = [(1, 7), (5, 123), (2, 1536)] + ([(64, 11008), (33, 3000)] if ON_GPU else [])


@pytest.mark.parametrize("M,I", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_reference(M, I, dtype):
    gu = (torch.randn(M, 2 * I, device=DEVICE) * 4).to(dtype)
    out = silu_mul(gu)
    assert out.shape == (M, I) and out.dtype == dtype
    assert_close_to_baseline(out, silu_mul_ref(gu.double()), silu_mul_ref(gu), floor=1e-6,
                             what="silu_mul")


def test_silu_mul_extreme_gates_and_batch_dims():
    gu = torch.randn(2, 3, 20, device=DEVICE) * 4
    gu[0, 0, :10] = torch.tensor([-1e4, -100., -30., 0., 30., 100., 1e4, -88., 88., -1.],
                                 device=DEVICE)
    out = silu_mul(gu)
    assert out.shape == (2, 3, 10)
    ref = silu_mul_ref(gu.double())
    assert ((out.double() - ref).abs() <= 1e-6 * ref.abs() + 1e-6).all()


def test_silu_mul_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2\\*I"):
        silu_mul(torch.randn(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        silu_mul(torch.ones(3, 4, dtype=torch.int64, device=DEVICE))
