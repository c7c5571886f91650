import pytest
import torch

from conftest import DEVICE, ON_GPU
from kernels.argmax import BLOCK, argmax, argmax_ref

# widths around the chunk size, a vocabulary, rows from one to a tree's
SHAPES = [(1, 7), (3, BLOCK), (2, BLOCK + 1), (5, 3 * BLOCK - 5), (1, 49152)] + \
    ([(64, 49152), (7, 152064)] if ON_GPU else [])


@pytest.mark.parametrize("M,N", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_matches_torch(M, N, dtype):
    g = torch.Generator().manual_seed(M * 1000 + N)
    x = (torch.randn(M, N, generator=g) * 3).to(dtype).to(DEVICE)
    got = argmax(x)
    assert got.dtype == torch.int64 and got.shape == (M,)
    assert torch.equal(got, argmax_ref(x))


def test_argmax_ties_pick_the_first_index_across_chunks():
    N = 4 * BLOCK + 3
    x = torch.zeros(4, N, device=DEVICE)
    x[0, [5, BLOCK + 2, 3 * BLOCK]] = 7.0             # tie across three chunks -> 5
    x[1, [3 * BLOCK + 1, 2 * BLOCK + 9]] = 2.0        # the later chunk listed first -> 2*BLOCK+9
    x[2, N - 1] = 1.0                                 # the masked tail of the last chunk
    x[3] = float("-inf")                              # all -inf -> 0, as torch
    got = argmax(x)
    assert got.tolist() == [5, 2 * BLOCK + 9, N - 1, 0]
    assert torch.equal(got, argmax_ref(x))


def test_argmax_nan_wins_like_torch():
    N = 3 * BLOCK
    x = torch.randn(3, N, device=DEVICE)
    x[0, 2 * BLOCK + 4] = float("nan")
    x[0, BLOCK + 1] = float("inf")
    x[1, [BLOCK + 7, 11]] = float("nan")              # the first NaN counts
    x[2, 17] = float("inf")
    got = argmax(x)
    assert got.tolist() == [2 * BLOCK + 4, 11, 17]
    assert torch.equal(got, argmax_ref(x))


def test_argmax_batch_dims_views_and_out_buffer():
    x = torch.randn(2, 3, 2 * BLOCK + 100, device=DEVICE)
    assert torch.equal(argmax(x), argmax_ref(x))
    rows = x[:, 1]                                    # evenly strided view, not contiguous
    out = torch.full((2,), -1, dtype=torch.int64, device=DEVICE)
    assert argmax(rows, out=out) is out
    assert torch.equal(out, argmax_ref(rows))


def test_argmax_rejects_bad_inputs():
    with pytest.raises(ValueError, match="dtype"):
        argmax(torch.ones(2, 5, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="non-empty last dim"):
        argmax(torch.ones(2, 0, device=DEVICE))
    with pytest.raises(ValueError, match="unit stride"):
        argmax(torch.ones(6, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match="out must be"):
        argmax(torch.ones(3, 5, device=DEVICE), out=torch.empty(2, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("M,N", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gumbel_argmax_matches_its_reference(M, N, dtype):
    from kernels.argmax import gumbel_argmax, gumbel_argmax_ref
    g = torch.Generator().manual_seed(M * 7 + N)
    x = (torch.randn(M, N, generator=g) * 3).to(dtype).to(DEVICE)
    # wider noise rows than x, as the decoder's (V columns for a draft vocabulary of fewer)
    gum = -torch.empty(M, N + 5).exponential_(generator=g).log().to(DEVICE)
    for t in (0.4, 1.0, 1.9):
        T = torch.tensor(t, device=DEVICE)
        got = gumbel_argmax(x, gum, T)
        assert got.shape == (M,) and torch.equal(got, gumbel_argmax_ref(x, gum, T))
        assert not torch.equal(got, argmax_ref(x)) or N < 64 or t < 1   # the noise moves the draw


def test_gumbel_argmax_draws_from_the_softmax():
    """Frequencies of the Gumbel-max draws over fresh noise match softmax(x / T)."""
    from kernels.argmax import gumbel_argmax
    V, runs, T = 6, 3000, torch.tensor(0.7, device=DEVICE)
    x = torch.tensor([[1.0, 0.2, -0.5, 0.9, 0.0, -2.0]], device=DEVICE)
    g = torch.Generator().manual_seed(0)
    noise = -torch.empty(runs, V).exponential_(generator=g).log().to(DEVICE)
    draws = gumbel_argmax(x.expand(runs, V).contiguous(), noise, T).cpu()
    freq = torch.bincount(draws, minlength=V).float() / runs
    p = torch.softmax(x.cpu() / 0.7, -1)[0]
    assert torch.all((freq - p).abs() < 4 * (p * (1 - p) / runs).sqrt() + 1e-3), (freq, p)


def test_gumbel_argmax_rejects_bad_inputs():
    from kernels.argmax import gumbel_argmax
    x = torch.randn(2, 40, device=DEVICE)
    T = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="rows of at least"):
        gumbel_argmax(x, torch.zeros(2, 30, device=DEVICE), T)
    with pytest.raises(ValueError, match="rows of at least"):
        gumbel_argmax(x, torch.zeros(3, 40, device=DEVICE), T)
    with pytest.raises(ValueError, match="dtype"):
        gumbel_argmax(x, torch.zeros(2, 40, dtype=torch.float64, device=DEVICE), T)
    with pytest.raises(ValueError, match="one value"):
        gumbel_argmax(x, torch.zeros(2, 40, device=DEVICE), torch.ones(2, device=DEVICE))
