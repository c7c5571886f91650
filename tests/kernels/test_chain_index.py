"""kernels/chain_index.py: a chain iteration's slots, masks and catch-up indices in one launch,
equal to the PyTorch arithmetic and compares they replace."""
import pytest
import torch

from conftest import DEVICE, ON_GPU
from kernels.chain_index import chain_indices, chain_indices_ref

# (L, cu_n, N, d1, W): a depth-1 chain, a deeper one with a full catch-up, a window of more than
# one BLOCK_W block, the first iteration (cu_n = 1), a catch-up reaching back to slot 0
CASES = [(7, 1, 2, 2, 16), (40, 4, 5, 5, 64), (1500, 2, 3, 3, 2048), (0, 1, 9, 9, 33), (3, 3, 4, 4, 8)]
if ON_GPU:
    CASES += [(4000, 9, 9, 9, 4096)]


@pytest.mark.parametrize("L,cu_n,N,d1,W", CASES)
@pytest.mark.parametrize("itype", [torch.int64, torch.int32])
def test_chain_indices_equal_the_pytorch_ones(L, cu_n, N, d1, W, itype):
    Lt = torch.tensor(L, dtype=itype, device=DEVICE)
    cu = torch.tensor(cu_n, dtype=itype, device=DEVICE)
    root = torch.tensor(12345, dtype=torch.int64, device=DEVICE)
    got = chain_indices(Lt, N, W, cu_n=cu, d1=d1, root=root)
    ref = chain_indices_ref(Lt, N, W, cu_n=cu, d1=d1, root=root)
    for name in got._fields:
        g, r = getattr(got, name), getattr(ref, name)
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert torch.equal(g, r), name
    assert got.tokens[0].item() == 12345 and got.cu_row.item() == cu_n - 1


def test_chain_indices_without_catch_up_or_root_and_bad_input():
    Lt = torch.tensor(5, device=DEVICE)
    got = chain_indices(Lt, 3, 20)
    ref = chain_indices_ref(Lt, 3, 20)
    assert torch.equal(got.slots, ref.slots) and torch.equal(got.mask, ref.mask)
    assert got.cu_pos is None and got.cu_mask is None and got.tokens is None
    with pytest.raises(ValueError, match="N and W"):
        chain_indices(Lt, 0, 20)
    with pytest.raises(ValueError, match="d1"):
        chain_indices(Lt, 2, 20, cu_n=Lt)
    with pytest.raises(ValueError, match="one value"):
        chain_indices(torch.tensor([1, 2], device=DEVICE), 2, 20)
    with pytest.raises(ValueError, match="L"):
        chain_indices(torch.tensor(1.0, device=DEVICE), 2, 20)
