import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close_to_baseline, poison
from kernels.medusa import medusa_resblocks, medusa_resblocks_ref

# (M, D, H, K)
CASES = [(1, 40, 2, 1), (5, 123, 3, 2), (17, 64, 1, 3)]
if ON_GPU:
    CASES += [(1, 576, 4, 4), (64, 576, 4, 2), (3, 4096, 2, 2), (100, 300, 3, 3)]


def _inputs(M, D, H, K, dtype):
    x = torch.randn(M, D, device=DEVICE)
    W = torch.randn(H, K, D, D, device=DEVICE) / D ** 0.5
    b = torch.randn(H, K, D, device=DEVICE) * 0.1
    return x.to(dtype), W.to(dtype), b.to(dtype)


@pytest.mark.parametrize("M,D,H,K", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_medusa_resblocks_matches_reference(M, D, H, K, dtype):
    x, W, b = _inputs(M, D, H, K, dtype)
    out = poison(torch.empty(H, M, D, device=DEVICE, dtype=dtype))
    res = medusa_resblocks(x, W, b, out=out)
    assert res is out
    exact = medusa_resblocks_ref(x.double(), W.double(), b.double())
    assert_close_to_baseline(out, exact, medusa_resblocks_ref(x, W, b), floor=1e-5,
                             what="medusa")


def test_medusa_without_bias_and_padded_weights():
    M, D, H, K = 3, 20, 2, 2
    Wbig = torch.randn(H, K, D, D + 5, device=DEVICE) / 5
    W = Wbig[..., :D]                                      # row stride D+5
    x = torch.randn(M, D, device=DEVICE)
    torch.testing.assert_close(medusa_resblocks(x, W, None), medusa_resblocks_ref(x, W, None),
                               atol=1e-5, rtol=1e-5)


def test_medusa_heads_are_independent():
    # head 1 of a 2-head stack must equal that head run alone
    x, W, b = _inputs(2, 24, 2, 2, torch.float32)
    both = medusa_resblocks(x, W, b)
    alone = medusa_resblocks(x, W[1:].contiguous(), b[1:].contiguous())
    torch.testing.assert_close(both[1], alone[0])


def test_medusa_rejects_bad_inputs():
    x, W, b = _inputs(2, 8, 1, 1, torch.float32)
    with pytest.raises(ValueError, match="W"):
        medusa_resblocks(x, W[..., :4], b)
    with pytest.raises(ValueError, match="dtype"):
        medusa_resblocks(x, W.to(torch.bfloat16), b)
    with pytest.raises(ValueError, match="b has shape"):
        medusa_resblocks(x, W, b[:, :, :4])
