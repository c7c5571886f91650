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


# ---------------------------------------------------------------------------------------------
# commit_step: the decoder's state after acceptance, in one launch

def _state(P, D, dtype, eagle, seed):
    g = torch.Generator().manual_seed(seed)
    s = dict(L=torch.tensor(37, device=DEVICE), root=torch.tensor(-1, device=DEVICE),
             out=torch.full((P + 1,), -7, dtype=torch.long, device=DEVICE),
             feat=torch.randn((P, D) if eagle else (D,), generator=g).to(dtype).to(DEVICE))
    if eagle:
        s.update(cu_tok=torch.full((P,), -3, dtype=torch.long, device=DEVICE),
                 cu_n=torch.tensor(0, device=DEVICE))
    return s


def _clone(s):
    return {k: v.clone() for k, v in s.items()}


@pytest.mark.parametrize("eagle", [True, False], ids=["eagle", "medusa"])
@pytest.mark.parametrize("D,dtype", [(16, torch.float32), (1030, torch.bfloat16)])
def test_commit_step_after_a_tree_matches_the_pytorch_ops(eagle, D, dtype):
    from kernels.accept import commit_step, commit_step_ref
    N, max_depth = 11, 4
    g = torch.Generator().manual_seed(D)
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 5, 6, 8])
    depth = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4])
    for trial in range(6):
        draft = torch.randint(0, 5, (N,), generator=g).to(DEVICE)
        choice = torch.randint(0, 5, (N,), generator=g).to(DEVICE)
        a, path, bonus, toks = accept_greedy(draft, parents.to(DEVICE), depth.to(DEVICE), choice, max_depth)
        hidden = torch.randn(N, D, generator=g).to(dtype).to(DEVICE)
        s = _state(max_depth + 1, D, dtype, eagle, trial)
        want = _clone(s)
        commit_step(a, path, bonus, toks, hidden, **s)
        commit_step_ref(a, path, bonus, toks, hidden, **want)
        for k in s:
            assert torch.equal(s[k], want[k]), (trial, k)
        assert int(s["L"]) == 37 + int(a) + 1 and int(s["root"]) == int(bonus)


@pytest.mark.parametrize("eagle", [True, False], ids=["eagle", "medusa"])
def test_commit_step_of_a_chain_derives_path_and_tokens(eagle):
    """chain_tokens: the path 0..a and the tokens nodes 1..a then the bonus, for every accepted
    length; the same as accept_greedy's path and tokens on that chain."""
    from kernels.accept import commit_step, commit_step_ref
    depth, D = 5, 24
    N = depth + 1
    parents = torch.arange(-1, N - 1, device=DEVICE)
    dep = torch.arange(N, device=DEVICE)
    draft = torch.tensor([9, 4, 8, 15, 16, 23], device=DEVICE)
    hidden = torch.randn(N, D, device=DEVICE)
    for n in range(depth + 1):
        choice = torch.full((N,), 1, device=DEVICE)
        choice[:n] = draft[1:n + 1]                 # the first n drafts accepted, then a miss
        choice[n] = 42                              # the bonus
        a, path, bonus, toks = accept_greedy(draft, parents, dep, choice, depth)
        assert int(a) == n
        s, via_tree, want = _state(N, D, torch.float32, eagle, n), None, None
        via_tree, want = _clone(s), _clone(s)
        commit_step(a, None, bonus, None, hidden, **s, chain_tokens=draft)
        commit_step(a, path, bonus, toks, hidden, **via_tree)
        commit_step_ref(a, None, bonus, None, hidden, **want, chain_tokens=draft)
        for k in s:
            assert torch.equal(s[k], want[k]) and torch.equal(s[k], via_tree[k]), (n, k)
        assert s["out"].tolist() == [n + 1] + draft[1:n + 1].tolist() + [42] * (N - n)


def test_commit_step_rejects_bad_inputs():
    from kernels.accept import commit_step
    s = _state(3, 8, torch.float32, True, 0)
    a, b = torch.tensor(1, device=DEVICE), torch.tensor(2, device=DEVICE)
    path = torch.tensor([0, 1, 1], device=DEVICE)
    hidden = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="chain_tokens alone"):
        commit_step(a, path, b, None, hidden, **s)
    with pytest.raises(ValueError, match="cu_tok and cu_n"):
        commit_step(a, path, b, path, hidden, s["L"], s["root"], s["out"], s["feat"], cu_tok=s["cu_tok"])
    with pytest.raises(ValueError, match="feat"):
        commit_step(a, path, b, path, hidden, s["L"], s["root"], s["out"], s["feat"][0], s["cu_tok"], s["cu_n"])
    with pytest.raises(ValueError, match="chain_tokens"):
        commit_step(a, None, b, None, hidden, **s, chain_tokens=torch.zeros(2, dtype=torch.long, device=DEVICE))


def test_commit_token_is_the_four_updates():
    from kernels.accept import commit_token, commit_token_ref
    out = torch.full((6,), -1, dtype=torch.long, device=DEVICE)
    step = torch.tensor(0, device=DEVICE)
    token = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    pos = torch.tensor([40], device=DEVICE)
    want = [t.clone() for t in (out, step, token, pos)]
    for v in (7, 49151, 0, 3):
        nxt = torch.tensor([v], device=DEVICE)
        commit_token(nxt, out, step, token, pos)
        commit_token_ref(nxt, *want)
        for a, b in zip((out, step, token, pos), want):
            assert torch.equal(a, b)
    assert out.tolist() == [7, 49151, 0, 3, -1, -1] and int(pos) == 44 and int(step) == 4
    with pytest.raises(ValueError, match="nxt"):
        commit_token(torch.tensor([1, 2], device=DEVICE), out, step, token, pos)
