import pytest
import torch

from conftest import DEVICE, poison
from kernels.tree_draft import BLOCK_W, DraftLevel, DraftPool, tree_expand, tree_expand_ref


def _pool(P, dev):
    return DraftPool(poison(torch.empty(P, dtype=torch.long, device=dev)),
                     torch.full((P,), 123.0, device=dev),      # not NaN: unwritten rows compare equal
                     poison(torch.empty(P, dtype=torch.long, device=dev)),
                     poison(torch.empty(P, dtype=torch.long, device=dev)),
                     torch.zeros(P, P, dtype=torch.bool, device=dev))


def _level(k, D, W, dev, dtype):
    return DraftLevel(poison(torch.empty(k, dtype=torch.long, device=dev)),
                      poison(torch.empty(k, dtype=torch.long, device=dev)),
                      poison(torch.empty(k, D, dtype=dtype, device=dev)),
                      poison(torch.empty(k, dtype=torch.long, device=dev)),
                      poison(torch.empty(k, dtype=torch.long, device=dev)),
                      torch.ones(k, W, dtype=torch.bool, device=dev))


def _clone(x):
    return type(x)(*(t.clone() for t in x))


def _children(g, R, k, V, dev):
    """Each row's k distinct tokens and decreasing log-probabilities, as a top-k gives them,
    with ties between rows (the same values) so that the tie rule is exercised."""
    tok = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(R)]).to(dev)
    lq = -torch.rand(R, k, generator=g).sort(dim=1).values.flip(1)     # in (-1, 0], decreasing
    lq = (lq * 4).round() / 4                                           # coarse: ties across rows
    return tok, lq.sort(dim=1, descending=True).values.to(dev)


@pytest.mark.parametrize("k,depth,W,L", [(1, 4, 40, 7), (3, 4, 300, 200), (8, 3, BLOCK_W + 300, BLOCK_W - 50),
                                         (4, 5, 2 * BLOCK_W + 1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_expand_matches_reference_level_by_level(k, depth, W, L, dtype):
    """A whole draft's levels: root, middle levels, the last (no next inputs); every output
    and every pool row equal to the PyTorch reference's, bit for bit."""
    g = torch.Generator().manual_seed(k * 100 + depth)
    D, V = 40, 500
    P = k + (depth - 1) * k * k
    assert L + P <= W
    prefix = torch.tensor(L, device=DEVICE)
    pool_k = _pool(P, DEVICE)
    pool_r = _clone(pool_k)
    bufs = [(_level(k, D, W, DEVICE, dtype), _level(k, D, W, DEVICE, dtype)) for _ in range(2)]
    front_k = front_r = None
    start = 0
    for j in range(depth):
        R = 1 if j == 0 else k
        tok, lq = _children(g, R, k, V, DEVICE)
        feat = torch.randn(R, D, generator=g).to(dtype).to(DEVICE)
        last = j == depth - 1
        nk, nr = (None, None) if last else bufs[j % 2]
        tree_expand(tok, lq, feat, front_k, prefix, pool_k, start, j + 1, nk)
        tree_expand_ref(tok, lq, feat, front_r, prefix, pool_r, start, j + 1, nr)
        for f, a, b in zip(DraftPool._fields, pool_k, pool_r):
            assert torch.equal(a, b), f"level {j}: pool.{f} differs"
        if not last:
            for f, a, b in zip(DraftLevel._fields, nk, nr):
                assert torch.equal(a, b), f"level {j}: next.{f} differs"
            front_k, front_r = nk.front, nr.front
        start += R * k
    assert start == P
    # what the pool means: each row's ancestors are its parent's plus itself, scores add up
    par = pool_k.parent
    for i in range(P):
        want = pool_k.anc[par[i]].clone() if par[i] >= 0 else torch.zeros(P, dtype=torch.bool, device=DEVICE)
        want[i] = True
        assert torch.equal(pool_k.anc[i], want)
        assert pool_k.depth[i] == want.sum()


def test_tree_expand_mask_sees_prefix_ancestors_and_self_only():
    k, D, W, L = 2, 8, 64, 10
    P = k + k * k
    pool = _pool(P, DEVICE)
    prefix = torch.tensor(L, device=DEVICE)
    a, b = _level(k, D, W, DEVICE, torch.float32), _level(k, D, W, DEVICE, torch.float32)
    tok = torch.tensor([[5, 6]], device=DEVICE)
    tree_expand(tok, torch.tensor([[-0.1, -0.5]], device=DEVICE), torch.randn(1, D, device=DEVICE),
                None, prefix, pool, 0, 1, a)
    assert a.front.tolist() == [0, 1] and a.tok.tolist() == [5, 6] and a.slot.tolist() == [L, L + 1]
    assert a.pos.tolist() == [L + 1, L + 1]
    assert a.mask[0].nonzero().flatten().tolist() == list(range(L)) + [L]
    assert a.mask[1].nonzero().flatten().tolist() == list(range(L)) + [L + 1]
    # rows 2..5 are node 0's and node 1's children, scores -0.3, -1.0, -0.55, -0.8: the best
    # two are rows 2 and 4, fed with their parents' features (rows 0 and 1 of feat)
    feat = torch.randn(2, D, device=DEVICE)
    tree_expand(torch.tensor([[7, 8], [9, 10]], device=DEVICE), torch.tensor([[-0.2, -0.9], [-0.05, -0.3]], device=DEVICE),
                feat, a.front, prefix, pool, 2, 2, b)
    assert b.front.tolist() == [2, 4] and b.tok.tolist() == [7, 9]
    assert torch.equal(b.feat, feat[[0, 1]])
    assert b.mask[0].nonzero().flatten().tolist() == list(range(L)) + [L, L + 2]
    assert b.mask[1].nonzero().flatten().tolist() == list(range(L)) + [L + 1, L + 4]
    assert pool.parent.tolist() == [-1, -1, 0, 0, 1, 1]
    assert pool.depth.tolist() == [1, 1, 2, 2, 2, 2]
    assert torch.allclose(pool.score, torch.tensor([-0.1, -0.5, -0.3, -1.0, -0.55, -0.8], device=DEVICE))


def test_tree_expand_rejects_bad_inputs():
    k, D, W = 2, 8, 32
    P = k + k * k
    pool = _pool(P, DEVICE)
    prefix = torch.tensor(3, device=DEVICE)
    nxt = _level(k, D, W, DEVICE, torch.float32)
    tok, lq, feat = torch.zeros(1, k, dtype=torch.long, device=DEVICE), torch.zeros(1, k, device=DEVICE), torch.zeros(1, D, device=DEVICE)
    with pytest.raises(ValueError, match="one row of children"):
        tree_expand(tok.expand(2, k).contiguous(), lq.expand(2, k).contiguous(), feat.expand(2, D), None, prefix, pool, 0, 1, nxt)
    with pytest.raises(ValueError, match="must fit"):
        tree_expand(tok, lq, feat, None, prefix, pool, P - 1, 1, nxt)
    with pytest.raises(ValueError, match="clq"):
        tree_expand(tok, lq.double(), feat, None, prefix, pool, 0, 1, nxt)
    with pytest.raises(ValueError, match="alternate two buffers"):
        tree_expand(tok.expand(k, k).contiguous(), lq.expand(k, k).contiguous(), feat.expand(k, D), nxt.front,
                    prefix, pool, k, 2, nxt)
    with pytest.raises(ValueError, match="nxt.mask"):
        tree_expand(tok, lq, feat, None, prefix, pool, 0, 1, nxt._replace(mask=nxt.mask.int()))


def _drafted_pool(g, k, depth, V=300):
    """A pool as a greedy draft leaves it (tree_expand_ref, level by level)."""
    P = k + (depth - 1) * k * k
    pool = _pool(P, DEVICE)
    prefix = torch.tensor(5, device=DEVICE)
    front, start = None, 0
    for j in range(depth):
        R = 1 if j == 0 else k
        tok = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(R)]).to(DEVICE)
        lq = torch.log(torch.rand(R, k, generator=g)).sort(dim=1, descending=True).values.to(DEVICE)
        nxt = None if j == depth - 1 else _level(k, 4, 5 + P, DEVICE, torch.float32)
        tree_expand_ref(tok, lq, torch.randn(R, 4, device=DEVICE), front, prefix, pool, start, j, nxt)
        front = None if nxt is None else nxt.front
        start += R * k
    return pool


@pytest.mark.parametrize("k,depth,N", [(2, 3, 2), (3, 4, 9), (8, 6, 32), (8, 6, 70), (4, 2, 21)])
def test_tree_select_matches_reference(k, depth, N):
    from kernels.tree_draft import tree_select, tree_select_ref
    g = torch.Generator().manual_seed(k * 10 + N)
    pool = _drafted_pool(g, k, depth)
    root = torch.tensor(77, device=DEVICE)
    got, ref = tree_select(pool, root, N), tree_select_ref(pool, root, N)
    for f, a, b in zip(got._fields, got, ref):
        assert torch.equal(a, b), f
    # a tree: the root first, parents before children, depth = parent's + 1, ancestors = parent's + self
    assert got.tokens[0] == 77 and got.parents[0] == -1 and got.depth[0] == 0
    for i in range(1, N):
        p = got.parents[i].item()
        assert 0 <= p < i and got.depth[i] == got.depth[p] + 1
        want = got.anc[p].clone()
        want[i] = True
        assert torch.equal(got.anc[i], want)


def test_tree_select_rejects_bad_inputs():
    from kernels.tree_draft import tree_select
    pool = _drafted_pool(torch.Generator().manual_seed(0), 2, 2)
    root = torch.tensor(1, device=DEVICE)
    for N in (1, 8, 3.0):
        with pytest.raises(ValueError, match="N must be an integer"):
            tree_select(pool, root, N)
    with pytest.raises(ValueError, match="root must hold one token"):
        tree_select(pool, torch.tensor([1, 2], device=DEVICE), 3)
    with pytest.raises(ValueError, match="pool.depth"):
        tree_select(pool._replace(depth=pool.depth.int()), root, 3)
