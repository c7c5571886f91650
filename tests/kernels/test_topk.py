import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close_to_baseline, poison
from kernels.topk import BLOCK, topk_logprobs, topk_logprobs_ref

# widths around the chunk size and a vocabulary; k from a chain's 1 to the widest tree's 16;
# rows from a root's one to a tree level's
CASES = [(1, 7, 3), (3, BLOCK, 8), (2, BLOCK + 1, 16), (5, 3 * BLOCK - 5, 4), (1, 49152, 8), (8, 8192, 10)] + \
    ([(64, 49152, 16), (7, 152064, 8)] if ON_GPU else [])


@pytest.mark.parametrize("M,N,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_logprobs_matches_reference(M, N, k, dtype):
    g = torch.Generator().manual_seed(M * 1000 + N + k)
    x = (torch.randn(M, N, generator=g) * 3).to(dtype).to(DEVICE)
    idx, logp = topk_logprobs(x, k)
    assert idx.dtype == torch.int64 and logp.dtype == torch.float32
    assert idx.shape == logp.shape == (M, k)
    ref_idx, _ = topk_logprobs_ref(x, k)
    assert torch.equal(idx, ref_idx)          # bf16 rows hold many ties: their order is checked too
    # the log-softmax's own rounding: at most twice the fp32 PyTorch formula's distance from
    # fp64's, plus a few fp32 ulp at the log-sum-exp's magnitude
    exact = torch.log_softmax(x.double(), -1).gather(-1, idx)
    low = torch.log_softmax(x.float(), -1).gather(-1, idx)
    floor = 4 * torch.finfo(torch.float32).eps * (exact.abs().max().item() + 1)
    assert_close_to_baseline(logp, exact, low, floor=floor, what="logp")


def test_topk_ties_and_minus_inf_follow_a_stable_sort():
    N = 4 * BLOCK + 3
    x = torch.zeros(4, N, device=DEVICE)
    x[0, [5, BLOCK + 2, 3 * BLOCK, 7]] = 7.0      # a tie across chunks: 5, 7, BLOCK+2, 3*BLOCK
    x[1, [3 * BLOCK + 1, 2 * BLOCK + 9]] = 2.0    # the later chunk's index first by value order
    x[1, 11] = 3.0
    x[2, N - 1] = 1.0                             # the masked tail of the last chunk
    x[3] = float("-inf")                          # -inf but two entries: those, then the -inf ones in order
    x[3, [BLOCK + 4, 2]] = 0.5
    idx, logp = topk_logprobs(x, 5)
    ref_idx, ref_logp = topk_logprobs_ref(x, 5)
    assert idx[0].tolist() == [5, 7, BLOCK + 2, 3 * BLOCK, 0]
    assert idx[1].tolist() == [11, 2 * BLOCK + 9, 3 * BLOCK + 1, 0, 1]
    assert idx[2].tolist() == [N - 1, 0, 1, 2, 3]
    assert idx[3].tolist() == [2, BLOCK + 4, 0, 1, 3]
    assert torch.equal(idx, ref_idx)
    # -inf entries have log-probability -inf, the others their finite values
    assert torch.equal(torch.isinf(logp), torch.isinf(ref_logp))
    fin = torch.isfinite(ref_logp)
    assert torch.allclose(logp[fin], ref_logp[fin], rtol=0, atol=1e-5)


def test_topk_batch_dims_views_and_out_buffers():
    x = torch.randn(2, 3, 2 * BLOCK + 100, device=DEVICE)
    idx, logp = topk_logprobs(x, 6)
    ref_idx, ref_logp = topk_logprobs_ref(x, 6)
    assert idx.shape == (2, 3, 6) and torch.equal(idx, ref_idx)
    assert torch.allclose(logp, ref_logp, rtol=0, atol=1e-5)
    rows = x[:, 1]                                # evenly strided view, not contiguous
    out = (poison(torch.empty(2, 6, dtype=torch.int64, device=DEVICE)),
           poison(torch.empty(2, 6, device=DEVICE)))
    got = topk_logprobs(rows, 6, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    assert torch.equal(out[0], topk_logprobs_ref(rows, 6)[0])
    assert torch.allclose(out[1], topk_logprobs_ref(rows, 6)[1], rtol=0, atol=1e-5)


def test_topk_rejects_bad_inputs():
    x = torch.randn(2, 40, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        topk_logprobs(torch.ones(2, 5, dtype=torch.int64, device=DEVICE), 2)
    with pytest.raises(ValueError, match="non-empty last dim"):
        topk_logprobs(torch.ones(2, 0, device=DEVICE), 1)
    with pytest.raises(ValueError, match="unit stride"):
        topk_logprobs(x.t(), 2)
    for k in (0, 17, 41, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer"):
            topk_logprobs(x, k)
    with pytest.raises(ValueError, match="out\\[1\\]"):
        topk_logprobs(x, 3, out=(torch.empty(2, 3, dtype=torch.int64, device=DEVICE),
                                 torch.empty(2, 4, device=DEVICE)))
    with pytest.raises(ValueError, match="out\\[0\\]"):
        topk_logprobs(x, 3, out=(torch.empty(2, 3, dtype=torch.int32, device=DEVICE),
                                 torch.empty(2, 3, device=DEVICE)))
