import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close_to_baseline
from kernels import linear as L
from kernels.linear_rope import (linear_rope_cache, linear_rope_cache_ref, linear_rope_cache_unfused,
                                 rope_config)
from test_rope_cache import _tables

# (B, T, h, n_kv, hd, K, S): odd K (masked K blocks), hd/2 = 3 (P must divide it), GQA
CASES = [(1, 1, 3, 1, 8, 70, 6), (2, 3, 4, 2, 6, 45, 9), (1, 5, 3, 3, 8, 33, 12)]
if ON_GPU:   # SmolLM2's layer (9 / 3 heads of 64, D 576) and a 7B one
    CASES += [(1, 1, 9, 3, 64, 576, 64), (1, 5, 9, 3, 64, 576, 300), (1, 4, 32, 32, 128, 4096, 64)]
# GEMV tiles: _config's (None), small K blocks with several rows a program, and two pairs a program
CONFIGS = [None, L.LinearConfig(False, 1, 4, 32, 4, 1, 4), L.LinearConfig(False, 1, 8, 16, 2, 1, 1)]


def _inputs(B, T, h, n_kv, hd, K, S, dtype, bias):
    N = (h + 2 * n_kv) * hd
    x = (torch.randn(B, T, K, device=DEVICE) * 3).to(dtype)
    W = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype)
    b = (torch.randn(N, device=DEVICE) * 0.1).to(dtype) if bias else None
    nw = (1 + 0.2 * torch.randn(K, device=DEVICE)).to(dtype)
    cos, sin = _tables(B, T, hd, dtype)
    slots = torch.randperm(S, device=DEVICE)[:T]
    kc = torch.randn(B, n_kv, S, hd, device=DEVICE).to(dtype)
    vc = torch.randn(B, n_kv, S, hd, device=DEVICE).to(dtype)
    return x, W, b, nw, cos, sin, slots, kc, vc


@pytest.mark.parametrize("B,T,h,n_kv,hd,K,S", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["config", "rows4", "pairs2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rope_cache_is_the_two_kernels_bitwise(B, T, h, n_kv, hd, K, S, bias, cfg, dtype):
    """One launch gives exactly what kernels.linear then kernels.rope_cache give (the same
    tiles), q and both caches, and leaves every other cache slot as it was."""
    x, W, b, nw, cos, sin, slots, kc0, vc0 = _inputs(B, T, h, n_kv, hd, K, S, dtype, bias)
    kc, vc, ku, vu = kc0.clone(), vc0.clone(), kc0.clone(), vc0.clone()
    kc[:, :, slots] = float("nan")                     # the slots the kernel must write
    vc[:, :, slots] = float("nan")
    q = linear_rope_cache(x, W, b, nw, 1e-5, cos, sin, slots, kc, vc, h, n_kv, config=cfg)
    qu = linear_rope_cache_unfused(x, W, b, nw, 1e-5, cos, sin, slots, ku, vu, h, n_kv, config=cfg)
    assert q.shape == (B, h, T, hd) and q.dtype == dtype and q.is_contiguous()
    assert torch.equal(q, qu), f"q differs from the unfused kernels: {(q.float() - qu.float()).abs().max()}"
    assert torch.equal(kc, ku) and torch.equal(vc, vu)
    untouched = torch.ones(S, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(kc[:, :, untouched], kc0[:, :, untouched])
    # and against the fp64 reference: no further from it than PyTorch in the test dtype
    ke, ve, kl, vl = kc0.double(), vc0.double(), kc0.clone(), vc0.clone()
    d = lambda t: None if t is None else t.double()  # noqa: E731
    qe = linear_rope_cache_ref(x.double(), W.double(), d(b), nw.double(), 1e-5, cos.double(), sin.double(),
                               slots, ke, ve, h, n_kv)
    ql = linear_rope_cache_ref(x, W, b, nw, 1e-5, cos, sin, slots, kl, vl, h, n_kv)
    assert_close_to_baseline(q, qe, ql, floor=1e-5, what="q")
    assert_close_to_baseline(kc, ke, kl, floor=1e-5, what="k cache")
    assert_close_to_baseline(vc, ve, vl, floor=1e-5, what="v cache")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rope_cache_row_is_bitwise_the_same_alone(dtype):
    """Exact mode's promise: a token's q, k and v do not depend on how many tokens are beside it
    (one row a program, or four)."""
    B, T, h, n_kv, hd, K, S = 1, 6, 3, 1, 8, 70, 10
    x, W, b, nw, cos, sin, slots, kc0, vc0 = _inputs(B, T, h, n_kv, hd, K, S, dtype, True)
    for cfg in (L.LinearConfig(False, 1, 2, 32, 4, 1, 1), L.LinearConfig(False, 1, 2, 32, 4, 1, 4)):
        kc, vc = kc0.clone(), vc0.clone()
        q = linear_rope_cache(x, W, b, nw, 1e-5, cos, sin, slots, kc, vc, h, n_kv, config=cfg)
        for t in range(T):
            k1, v1 = kc0.clone(), vc0.clone()
            q1 = linear_rope_cache(x[:, t:t + 1], W, b, nw, 1e-5, cos[:, t:t + 1], sin[:, t:t + 1],
                                   slots[t:t + 1], k1, v1, h, n_kv, config=cfg._replace(ROWS=1))
            assert torch.equal(q[:, :, t:t + 1], q1), f"token {t}, {cfg}"
            assert torch.equal(kc[:, :, slots[t]], k1[:, :, slots[t]]) and torch.equal(vc[:, :, slots[t]], v1[:, :, slots[t]])


def test_rope_config_makes_whole_pairs():
    assert rope_config(1, 960, 576, 32).BLOCK_N == 2                   # SmolLM2: _config's BLOCK_N 2
    assert rope_config(1, 10, 70, 3).BLOCK_N == 2                      # BLOCK_N 1 -> one pair
    assert rope_config(1, 12288, 4096, 64).BLOCK_N == 16               # 7B: 8 pairs of a head
    assert rope_config(1, 60, 70, 3, L.LinearConfig(False, 1, 8, 32, 4, 1, 1)).BLOCK_N == 2  # gcd(4, 3) = 1
    with pytest.raises(ValueError, match="GEMV path only"):
        rope_config(16, 960, 576, 32, L._config(16, 960, 576))         # an MMA config
    with pytest.raises(ValueError, match="GEMV path only"):
        rope_config(2, 960, 576, 32, L.vec_config(960, 576, 2))


def test_linear_rope_cache_rejects_bad_inputs():
    x, W, b, nw, cos, sin, slots, kc, vc = _inputs(1, 2, 3, 1, 8, 40, 5, torch.float32, True)
    with pytest.raises(ValueError, match="not \\(n_heads \\+ 2\\*n_kv\\) \\* hd"):
        linear_rope_cache(x, W[:-1], None, nw, 1e-5, cos, sin, slots, kc, vc, 3, 1)
    with pytest.raises(ValueError, match="cos has shape"):
        linear_rope_cache(x, W, b, nw, 1e-5, cos[:, :1], sin, slots, kc, vc, 3, 1)
    with pytest.raises(ValueError, match="k_cache has shape"):
        linear_rope_cache(x, W, b, nw, 1e-5, cos, sin, slots, kc[:, :, :, :4], vc, 3, 1)
    with pytest.raises(ValueError, match="bias has shape"):
        linear_rope_cache(x, W, b[:-2], nw, 1e-5, cos, sin, slots, kc, vc, 3, 1)
