import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close_to_baseline
from kernels.tree_attention import tree_attention, tree_attention_ref

# (B, h, n_kv, T, hd, S, prefix, n_splits)
CASES = [(1, 3, 1, 1, 16, 20, 11, None), (2, 4, 2, 5, 8, 70, 40, 3), (1, 2, 2, 7, 24, 33, 20, 1)]
if ON_GPU:
    CASES += [(1, 9, 3, 64, 64, 2048, 700, None), (1, 32, 32, 8, 128, 4096, 1500, None),
              (3, 8, 2, 26, 64, 512, 300, 5)]


def tree_case(B, T, S, prefix, gen):
    """A mask as koala.model.tree_mask builds it: the prefix, then each new token sees its
    ancestors (a random tree) among T tokens written at slots prefix..prefix+T-1."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, T)]
    anc = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parents[j]
    m = torch.zeros(B, T, S, dtype=torch.bool)
    m[:, :, :prefix] = True
    m[:, :, prefix:prefix + T] = anc
    return m.to(DEVICE)


@pytest.mark.parametrize("B,h,n_kv,T,hd,S,prefix,n_splits", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_matches_sdpa(B, h, n_kv, T, hd, S, prefix, n_splits, dtype):
    gen = torch.Generator().manual_seed(T * 100 + S)
    q = torch.randn(B, h, T, hd, device=DEVICE).to(dtype)
    k = torch.randn(B, n_kv, S, hd, device=DEVICE).to(dtype)
    v = torch.randn(B, n_kv, S, hd, device=DEVICE).to(dtype)
    mask = tree_case(B, T, S, prefix, gen)
    kv_len = prefix + T
    out = tree_attention(q, k, v, mask, kv_len=kv_len, n_splits=n_splits)
    exact = tree_attention_ref(q.double(), k.double(), v.double(), mask)
    low = tree_attention_ref(q, k, v, mask)
    assert out.dtype == dtype
    assert_close_to_baseline(out, exact, low, floor=1e-5, what="tree attention")


def test_tree_attention_full_cache_shared_mask_and_tensor_kv_len():
    B, h, n_kv, T, hd, S = 2, 4, 1, 3, 16, 50
    q = torch.randn(B, h, T, hd, device=DEVICE)
    k, v = torch.randn(2, B, n_kv, S, hd, device=DEVICE)
    mask = torch.rand(1, T, S, device=DEVICE) < 0.5
    mask[..., 0] = True                                   # every row sees something
    ref = tree_attention_ref(q, k, v, mask)
    torch.testing.assert_close(tree_attention(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)
    kl = torch.tensor([30, 50], device=DEVICE)
    torch.testing.assert_close(tree_attention(q, k, v, mask, kv_len=kl, n_splits=4),
                               tree_attention_ref(q, k, v, mask, kv_len=kl), atol=1e-5, rtol=1e-5)


def test_tree_attention_rejects_bad_inputs():
    q = torch.randn(1, 3, 2, 8, device=DEVICE)
    k = torch.randn(1, 2, 10, 8, device=DEVICE)
    m = torch.ones(1, 2, 10, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        tree_attention(q, k, k, m)
    with pytest.raises(ValueError, match="mask"):
        tree_attention(q[:, :2], k, k, m.float())
    with pytest.raises(ValueError, match="caches are"):
        tree_attention(q[:, :2].bfloat16(), k, k, m)


@pytest.mark.parametrize("n_splits", [1, 8])
def test_tree_attention_empty_splits_and_fully_masked_row(n_splits):
    B, h, n_kv, T, hd, S = 1, 2, 1, 2, 16, 40
    q = torch.randn(B, h, T, hd, device=DEVICE)
    k, v = torch.randn(2, B, n_kv, S, hd, device=DEVICE)
    mask = torch.zeros(1, T, S, dtype=torch.bool, device=DEVICE)
    mask[0, 0, :5] = True                                 # row 1 sees nothing
    out = tree_attention(q, k, v, mask, kv_len=12, n_splits=n_splits)   # splits past 12 are empty
    ref = tree_attention_ref(q, k, v, mask)
    torch.testing.assert_close(out[:, :, 0], ref[:, :, 0], atol=1e-5, rtol=1e-5)
    assert (out[:, :, 1] == 0).all()                      # torch 2.13's SDPA gives 0 too, older NaN


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,T,n_splits,seen", [(1, 1, 3, 200), (2, 3, 6, 200), (1, 2, 9, 40)])
def test_deferred_combine_in_the_output_projection_is_the_combine_launch(dtype, B, T, n_splits, seen):
    """tree_attention(..., defer_combine=True) then linear_combine (the combine in the output
    projection's prologue, one launch fewer) gives the bits of tree_attention then linear, and
    that attention is the reference's. n_splits 6 and 9 take the combine's 4-split chunks twice
    and three times (9: a partial last chunk); seen=40 leaves splits 1.. empty for every row
    (the slots past 40 are masked), which must add nothing."""
    from kernels.linear import linear, linear_combine
    from kernels.tree_attention import SplitParts
    h, n_kv, hd, S, N = 4, 2, 16, 200, 24
    gen = torch.Generator().manual_seed(B * 10 + n_splits)
    q = torch.randn(B, h, T, hd, generator=gen).to(dtype).to(DEVICE)
    k, v = (torch.randn(2, B, n_kv, S, hd, generator=gen) * 2).to(dtype).to(DEVICE)
    mask = tree_case(B, T, S, seen - T, gen)
    mask[:, :, seen:] = False
    W = (torch.randn(N, h * hd, generator=gen) * 0.2).to(dtype).to(DEVICE)
    bias = torch.randn(N, generator=gen).to(dtype).to(DEVICE)
    res = torch.randn(B, T, N, generator=gen).to(dtype).to(DEVICE)
    attn = tree_attention(q, k, v, mask, n_splits=n_splits)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(attn, tree_attention_ref(q, k, v, mask), atol=tol, rtol=tol)
    parts = tree_attention(q, k, v, mask, n_splits=n_splits, defer_combine=True)
    assert isinstance(parts, SplitParts) and parts.n_splits == n_splits
    want = linear(attn.transpose(1, 2).reshape(B, T, h * hd), W, bias, res)
    got = linear_combine(parts, W, bias, res)
    assert got.shape == (B, T, N) and got.dtype == dtype
    assert torch.equal(got, want)
    # one split: nothing to defer, the output comes back as usual
    single = tree_attention(q, k, v, mask, n_splits=1, defer_combine=True)
    assert isinstance(single, torch.Tensor) and single.shape == (B, h, T, hd)


def test_linear_combine_rejects_what_it_cannot_combine():
    from kernels.linear import LinearConfig, linear_combine
    from kernels.tree_attention import SplitParts
    h, hd, T = 2, 16, 1
    q = torch.randn(1, h, T, hd).to(DEVICE)
    k, v = torch.randn(2, 1, 1, 300, hd).to(DEVICE)
    parts = tree_attention(q, k, v, torch.ones(1, T, 300, dtype=torch.bool, device=DEVICE), n_splits=3,
                           defer_combine=True)
    W = torch.randn(8, h * hd).to(DEVICE)
    with pytest.raises(TypeError, match="SplitParts"):
        linear_combine(torch.randn(1, T, h * hd).to(DEVICE), W)
    with pytest.raises(ValueError, match="W"):
        linear_combine(parts, torch.randn(8, h * hd + 1).to(DEVICE))
    with pytest.raises(ValueError, match="GEMV"):
        linear_combine(parts, W, config=LinearConfig(True, 16, 16, 32))
    with pytest.raises(ValueError, match="n_splits"):
        linear_combine(parts._replace(n_splits=4), W)
    assert isinstance(parts, SplitParts)


@pytest.mark.parametrize("T,n_splits", [(1, 4), (5, 3), (30, 7)])
def test_fused_combine_matches_separate_combine_and_resets_its_tickets(T, n_splits):
    """One launch (the last split program of a row tile combines) against two: both close to
    the reference, the same answer on a second call (the tickets went back to zero), and every
    ticket zero afterwards. T=30 with 3 query heads per kv head: two row tiles of 64."""
    from kernels import tree_attention as ta
    B, h, n_kv, hd, S = 2, 6, 2, 32, 200
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(B, h, T, hd, generator=gen).to(DEVICE)
    k, v = torch.randn(2, B, n_kv, S, hd, generator=gen).to(DEVICE)
    mask = tree_case(B, T, S, 120, gen)
    ref = tree_attention_ref(q, k, v, mask)
    fused = tree_attention(q, k, v, mask, n_splits=n_splits, block_m=64, fuse_combine=True)
    again = tree_attention(q, k, v, mask, n_splits=n_splits, block_m=64, fuse_combine=True)
    separate = tree_attention(q, k, v, mask, n_splits=n_splits, block_m=64, fuse_combine=False)
    for out in (fused, again, separate):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused, again)
    assert torch.equal(fused, separate)           # one combine code (_combine_splits) for both
    assert int(ta._TICKETS[q.device].abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16] + ([torch.float32] if ON_GPU else []))
def test_exact_attention_is_window_invariant(dtype):
    """koala's exact mode: the plain step (1 query, a 256-slot window) and a verify forward
    (6 queries, a 512-slot window) give the same query bitwise equal results, with 128-slot
    splits combined in split order for every window. (The GPU is where a window-dependent
    combine order would change the bits; on the CPU the interpreter's fp32 products go through
    BLAS, whose result for a row depends on where the row sits in the tile, so fp32 runs on the
    GPU only.)"""
    from kernels.tree_attention import exact_tiles
    h, n_kv, hd, S_max, p = 9, 3, 64, 1024, 200
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 1, n_kv, S_max, hd, generator=gen) * 2).to(dtype).to(DEVICE)
    qs = torch.randn(1, h, 6, hd, generator=gen).to(dtype).to(DEVICE)   # queries at p .. p+5

    def run(q, first_pos, L):
        T = q.shape[2]
        mask = torch.zeros(1, T, L, dtype=torch.bool)
        for t in range(T):
            mask[0, t, :first_pos + t + 1] = True
        return tree_attention(q, k[:, :, :L], v[:, :, :L], mask.to(DEVICE), **exact_tiles(n_kv, L))
    plain = run(qs[:, :, 2:3], p + 2, 256)                  # the query at position p+2 alone
    verify = run(qs, p, 512)                                # inside a 6-token chain
    assert torch.equal(plain[:, :, 0], verify[:, :, 2])



@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_fused_combine_in_a_cuda_graph_replays_correctly():
    """The tickets must be back at zero after every replay: a graph replayed with new queries
    gives what eager calls give, bit for bit, replay after replay."""
    B, h, n_kv, T, hd, S = 1, 9, 3, 5, 64, 1024
    gen = torch.Generator().manual_seed(7)
    k, v = (torch.randn(2, B, n_kv, S, hd, generator=gen)).to(torch.bfloat16).to(DEVICE)
    mask = tree_case(B, T, S, 700, gen).to(DEVICE)
    qs = [torch.randn(B, h, T, hd, generator=gen).to(torch.bfloat16).to(DEVICE) for _ in range(4)]
    q = qs[0].clone()
    eager = [tree_attention(x, k, v, mask, n_splits=8, block_m=64, fuse_combine=True) for x in qs]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tree_attention(q, k, v, mask, n_splits=8, block_m=64, fuse_combine=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = tree_attention(q, k, v, mask, n_splits=8, block_m=64, fuse_combine=True)
    for _ in range(2):
        for x, want in zip(qs, eager):
            q.copy_(x)
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, want)


def _random_tree(N, gen):
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, N)]
    depth, anc = [0] * N, torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parents[j]
        depth[i] = int(anc[i].sum()) - 1
    return torch.tensor(depth, device=DEVICE), anc.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16] + ([torch.float32] if ON_GPU else []))
@pytest.mark.parametrize("L", [100, 125, 256, 380])
def test_exact_tree_attention_gives_each_node_plain_decodings_bits(dtype, L):
    """Every node of a tree, its ancestors at other slots than plain decoding would give them
    (siblings share depths), attends with the bits of plain decoding's query at its position:
    the same keys at slots L, L + 1, ... in order, read through the smallest window that holds
    them (exact mode's tiles). L = 125 puts the paths across a
    128-slot split; 256 starts a split. fp32 on the GPU only, as in
    test_exact_attention_is_window_invariant: the interpreter's fp32 products go through numpy's
    BLAS, whose sum for a row depends on where the row sits in the tile and on the CPU's kernel
    (on an AMD EPYC with OpenBLAS 0.3.31 L = 256 and 380 failed at f588e10, on the CI machine not)."""
    from kernels.tree_attention import exact_tiles, exact_tree_attention
    from koala.model import exact_tree_tail
    gen = torch.Generator().manual_seed(L)
    h, n_kv, hd, N, S = 4, 2, 16, 12, 512
    depth, anc = _random_tree(N, gen)
    k = (torch.randn(1, n_kv, S, hd, generator=gen)).to(DEVICE, dtype)
    v = (torch.randn(1, n_kv, S, hd, generator=gen)).to(DEVICE, dtype)
    q = (torch.randn(1, h, N, hd, generator=gen) * 2).to(DEVICE, dtype)
    slots = L + torch.arange(N, device=DEVICE)
    tiles = exact_tiles(n_kv, S)
    got = exact_tree_attention(q, k, v, exact_tree_tail(L, slots, depth, anc, S), **tiles)
    ref = tree_attention_ref(q.float(), k.float(), v.float(),
                             torch.cat([torch.ones(N, L, dtype=torch.bool, device=DEVICE), anc,
                                        torch.zeros(N, S - L - N, dtype=torch.bool, device=DEVICE)], 1)[None])
    assert (got.float() - ref).abs().max() < (0.05 if dtype == torch.bfloat16 else 1e-4)
    for t in range(N):
        path = torch.nonzero(anc[t]).flatten()          # ancestors, root first (depth order)
        kp, vp = k.clone(), v.clone()
        kp[:, :, L:L + len(path)] = k[:, :, L + path]
        vp[:, :, L:L + len(path)] = v[:, :, L + path]
        pos = L + int(depth[t])
        W = 256 if pos < 256 else S                     # the plain step's window
        mask = (torch.arange(W, device=DEVICE) <= pos)[None, None, :]
        want = tree_attention(q[:, :, t:t + 1], kp[:, :, :W], vp[:, :, :W], mask, **exact_tiles(n_kv, W))
        assert torch.equal(got[:, :, t], want[:, :, 0]), f"node {t} (depth {int(depth[t])}) differs"
