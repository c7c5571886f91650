import pytest
import torch

from conftest import DEVICE
from kernels.accept import (accept_greedy, accept_greedy_ref, compact_kv, compact_kv_ref,
                            make_cache_table)


def random_tree(N, max_depth, vocab, gen):
    parents = torch.full((N,), -1, dtype=torch.int64)
    depth = torch.zeros(N, dtype=torch.int64)
    for i in range(1, N):
        while True:
            p = int(torch.randint(0, i, (1,), generator=gen))
            if depth[p] < max_depth:
                break
        parents[i], depth[i] = p, depth[p] + 1
    tokens = torch.randint(0, vocab, (N,), generator=gen)
    target = torch.randint(0, vocab, (N,), generator=gen)
    return [t.to(DEVICE) for t in (tokens, parents, depth, target)]


def test_accept_hand_made_tree():
    #        0 (root, target says 5)
    #      /   \
    #    1:5    2:7        target at 1 says 8, at 2 says 9
    #    |  \     \
    #  3:8  4:3   5:9      target at 3 says 11, at 5 says 12
    #  |
    #  6:11                target at 6 says 42
    tokens = torch.tensor([0, 5, 7, 8, 3, 9, 11], device=DEVICE)
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3], device=DEVICE)
    depth = torch.tensor([0, 1, 1, 2, 2, 2, 3], device=DEVICE)
    target = torch.tensor([5, 8, 9, 11, 0, 12, 42], device=DEVICE)
    n, path, bonus, toks = accept_greedy(tokens, parents, depth, target, max_depth=3)
    assert int(n) == 3 and path.tolist() == [0, 1, 3, 6] and int(bonus) == 42
    assert toks.tolist() == [5, 8, 11, 42]
    target[0] = 6                                        # nothing accepted: bonus = root's choice
    n, path, bonus, toks = accept_greedy(tokens, parents, depth, target, max_depth=4)
    assert int(n) == 0 and path.tolist() == [0] * 5 and int(bonus) == 6 and toks.tolist() == [6] * 5


@pytest.mark.parametrize("N,max_depth,vocab", [(1, 0, 3), (7, 3, 2), (26, 5, 2), (60, 6, 3), (130, 8, 2)])
@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
def test_accept_matches_reference_on_random_trees(N, max_depth, vocab, itype):
    gen = torch.Generator().manual_seed(N * 7 + max_depth)
    for _ in range(4):
        tok, par, dep, tgt = random_tree(N, min(max_depth, N - 1), vocab, gen)
        md = min(max_depth, N - 1)
        args = [t.to(itype) for t in (tok, par, dep, tgt)]
        got = accept_greedy(*args, max_depth=md)
        want = accept_greedy_ref(tok, par, dep, tgt, md)
        for g, w, name in zip(got, want, ("accept_len", "path", "bonus", "tokens")):
            assert g.dtype == torch.int64
            assert torch.equal(g, w.to(g.device)), (name, g, w)


def test_accept_batched_equals_per_sequence():
    gen = torch.Generator().manual_seed(3)
    trees = [random_tree(20, 4, 2, gen) for _ in range(3)]
    stacked = [torch.stack([t[i] for t in trees]) for i in range(4)]
    n, path, bonus, toks = accept_greedy(*stacked, max_depth=4)
    for b, t in enumerate(trees):
        want = accept_greedy_ref(*t, 4)
        assert int(n[b]) == int(want[0]) and torch.equal(path[b], want[1]) and torch.equal(toks[b], want[3])


def test_accept_rejects_bad_inputs():
    t = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="max_depth"):
        accept_greedy(t, t, t, t, max_depth=4)
    with pytest.raises(ValueError, match="dtype"):
        accept_greedy(t.float(), t, t, t, max_depth=1)
    with pytest.raises(ValueError, match="shape"):
        accept_greedy(t[:3], t, t, t, max_depth=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,nkv,S,hd,n_layers", [(1, 3, 40, 8, 3), (2, 2, 30, 12, 2)])
def test_compact_kv_matches_reference(dtype, B, nkv, S, hd, n_layers):
    gen = torch.Generator().manual_seed(1)
    N, md, L = 12, 4, 9
    tok, par, dep, tgt = random_tree(N, md, 2, gen)
    tgt[0] = tok[1]                                       # accept at least one token
    n, path, _, _ = accept_greedy(tok, par, dep, tgt, md)
    caches = [torch.randn(B, nkv, S, hd, device=DEVICE).to(dtype) for _ in range(2 * n_layers)]
    refs = [c.clone() for c in caches]
    table = make_cache_table(caches)
    compact_kv(table, path, n, torch.tensor(L, device=DEVICE))
    compact_kv_ref(refs, path, n, L)
    for c, r in zip(caches, refs):
        assert torch.equal(c, r)


def test_compact_kv_chain_shift_and_per_sequence_paths():
    # path [0, 2, 3, 5]: slot L+2 is read for row 1 and written by row 2 -- ordering matters
    B, nkv, S, hd, L = 2, 1, 16, 4, 3
    caches = [torch.randn(B, nkv, S, hd, device=DEVICE) for _ in range(2)]
    refs = [c.clone() for c in caches]
    paths = torch.tensor([[0, 2, 3, 5], [0, 1, 4, 4]], device=DEVICE)
    n = torch.tensor([3, 2], device=DEVICE)
    compact_kv(make_cache_table(caches), paths, n, L)
    for b in range(B):
        compact_kv_ref([r[b:b + 1] for r in refs], paths[b], n[b], L)
    for c, r in zip(caches, refs):
        assert torch.equal(c, r)


def test_cache_table_rejects_mismatched_caches():
    a = torch.zeros(1, 2, 8, 4, device=DEVICE)
    with pytest.raises(ValueError, match="differs"):
        make_cache_table([a, torch.zeros(1, 2, 9, 4, device=DEVICE)])
    with pytest.raises(ValueError, match="differs"):
        make_cache_table([a, a.to(torch.bfloat16)])
