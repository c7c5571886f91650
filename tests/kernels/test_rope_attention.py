"""rope_tree_attention: RoPE and the cache write inside the attention's split launch, against the
two launches it replaces (bit for bit) and against the PyTorch reference."""
import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close_to_baseline
from kernels.rope_cache import rope_and_cache_write
from kernels.tree_attention import (ROPE_MAX_T, exact_tiles, rope_tree_attention,
                                    rope_tree_attention_ref, tree_attention)


def _tables(B, T, hd, dtype, gen):
    pos = torch.randint(0, 1000, (B, T), generator=gen).double()
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).double() / hd))
    f = pos[..., None] * inv
    emb = torch.cat((f, f), -1)
    return emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)


def _case(B, T, h, n_kv, hd, S_cap, slots, W, dtype, seed, per_row_mask=False):
    """Inputs as a decode step or verify builds them: new tokens at `slots`, a window of W slots,
    each new token seeing the slots below its own and itself (a chain) or a random subset."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (h + 2 * n_kv) * hd, generator=gen).to(dtype).to(DEVICE)
    cos, sin = _tables(B, T, hd, dtype, gen)
    k = torch.randn(B, n_kv, S_cap, hd, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(B, n_kv, S_cap, hd, generator=gen).to(dtype).to(DEVICE)
    s = torch.as_tensor(slots)
    mask = torch.arange(W)[None, None, :] <= s[None, :, None].clamp(max=W - 1)     # (1, T, W)
    if per_row_mask:
        mask = mask & (torch.rand(B, T, W, generator=gen) < 0.8)
        mask[:, torch.arange(T), s.clamp(max=W - 1)] = True
    return qkv, cos, sin, s.to(DEVICE), k, v, mask.to(DEVICE)


def _two_launches(qkv, cos, sin, slots, k, v, h, mask, **kw):
    """What koala.model ran before: the RoPE launch, then tree_attention over the window."""
    W = mask.shape[-1]
    q = rope_and_cache_write(qkv, cos, sin, slots, k, v, h, k.shape[1])
    return tree_attention(q, k[:, :, :W], v[:, :, :W], mask, **kw)


# (B, T, h, n_kv, hd, S_cap, slots, W, options)
CASES = [
    (1, 1, 3, 1, 16, 48, [20], 32, {}),                                  # a decode step
    (1, 5, 4, 2, 8, 160, [60, 61, 62, 63, 64], 96, dict(n_splits=2)),    # a chain across two splits
    (1, 6, 9, 3, 24, 200, [130, 131, 140, 133, 150, 139], 160, dict(n_splits=3)),   # a tree's slots
    (2, 3, 4, 2, 16, 100, [40, 41, 42], 64, dict(n_splits=4, per_row_mask=True)),  # a batch, own masks
    (1, 2, 2, 1, 16, 80, [30, 70], 48, dict(n_splits=2)),                # a slot past the window
    (1, 4, 9, 3, 64, 512, [300, 301, 302, 303], 512, dict(exact=True)),  # exact mode's tiles
    (1, 3, 6, 2, 16, 300, [250, 251, 252], 256, dict(n_splits=3, fuse_combine=True)),
]
if ON_GPU:
    CASES += [(1, 64, 9, 3, 64, 2048, list(range(900, 964)), 1024, {}),
              (4, 9, 32, 8, 128, 4096, list(range(1500, 1509)), 2048, dict(exact=True))]
IDS = ["decode", "chain", "tree-slots", "batch", "past-window", "exact", "fused-combine"] + \
      (["T64", "7b-shape"] if ON_GPU else [])


@pytest.mark.parametrize("B,T,h,n_kv,hd,S_cap,slots,W,opts", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_tree_attention_is_the_two_launches_bit_for_bit(B, T, h, n_kv, hd, S_cap, slots, W,
                                                             opts, dtype):
    """Output and both caches equal RoPE + cache write then tree_attention, bit for bit, and stay
    as close to the fp64 reference as PyTorch in the test dtype is; slots that are not new keep
    their values."""
    opts = dict(opts)
    per_row = opts.pop("per_row_mask", False)
    if opts.pop("exact", False):
        opts.update(exact_tiles(B * n_kv, W))
    qkv, cos, sin, s, k0, v0, mask = _case(B, T, h, n_kv, hd, S_cap, slots, W, dtype, seed=T + W,
                                           per_row_mask=per_row)
    k1, v1, k2, v2 = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    k1[:, :, s] = float("nan")                          # the fused launch must write these
    v1[:, :, s] = float("nan")
    got = rope_tree_attention(qkv, cos, sin, s, k1, v1, h, mask, **opts)
    want = _two_launches(qkv, cos, sin, s, k2, v2, h, mask, **opts)
    assert got.shape == (B, h, T, hd) and got.dtype == dtype
    assert torch.equal(k1, k2) and torch.equal(v1, v2), "the caches differ from the RoPE launch's"
    assert torch.equal(got, want), "the output differs from the two launches'"
    ke, ve = k0.double(), v0.double()
    exact = rope_tree_attention_ref(qkv.double(), cos.double(), sin.double(), s, ke, ve, h, mask)
    kl, vl = k0.clone(), v0.clone()
    low = rope_tree_attention_ref(qkv, cos, sin, s, kl, vl, h, mask)
    assert_close_to_baseline(got, exact, low, floor=1e-5, what="rope attention")
    others = torch.ones(S_cap, dtype=torch.bool, device=DEVICE)
    others[s] = False
    assert torch.equal(k1[:, :, others], k0[:, :, others]) and torch.equal(v1[:, :, others], v0[:, :, others])


def test_rope_tree_attention_reads_what_it_wrote_this_launch():
    """A new token's key decides its own attention: with the cache's stale values at the new
    slots the result would differ. (Guards the write-before-read order inside a split.)"""
    qkv, cos, sin, s, k0, v0, mask = _case(1, 3, 4, 2, 16, 64, [10, 11, 12], 64, torch.float32, seed=1)
    stale = rope_tree_attention_ref(qkv, cos, sin, s, k0.clone(), v0.clone(), 4, mask)
    k, v = k0.clone(), v0.clone()
    got = rope_tree_attention(qkv, cos, sin, s, k, v, 4, mask, n_splits=1)
    torch.testing.assert_close(got, stale, atol=1e-5, rtol=1e-5)
    k.fill_(0.0)                                        # the cache zeroed: only the writes count
    v.fill_(0.0)
    k[:, :, :10], v[:, :, :10] = k0[:, :, :10], v0[:, :, :10]
    again = rope_tree_attention(qkv, cos, sin, s, k, v, 4, mask, n_splits=1)
    assert torch.equal(again, got)


def test_rope_tree_attention_rejects_bad_inputs():
    qkv, cos, sin, s, k, v, mask = _case(1, 2, 4, 2, 8, 32, [5, 6], 16, torch.float32, seed=2)
    with pytest.raises(ValueError, match="width"):
        rope_tree_attention(qkv, cos, sin, s, k, v, 2, mask)          # 2 query heads: another width
    with pytest.raises(ValueError, match="multiple"):
        rope_tree_attention(qkv, cos, sin, s, k, v, 3, mask)
    with pytest.raises(ValueError, match="more than the cache"):
        rope_tree_attention(qkv, cos, sin, s, k, v, 4, torch.ones(1, 2, 40, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        rope_tree_attention(qkv, cos, sin, s, k.bfloat16(), v.bfloat16(), 4, mask)
    T = ROPE_MAX_T + 1
    big = _case(1, T, 2, 1, 8, 128, list(range(T)), 128, torch.float32, seed=3)
    with pytest.raises(ValueError, match="at most"):
        rope_tree_attention(*big[:6], 2, big[6])
