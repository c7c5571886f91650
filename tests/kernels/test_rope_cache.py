import math

import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close_to_baseline, poison
from kernels.rope_cache import rope_and_cache_write, rope_and_cache_write_ref

# (B, T, h, n_kv, hd, S)
CASES = [(1, 1, 3, 1, 8, 6), (2, 5, 4, 2, 6, 11), (1, 3, 9, 3, 64, 16)]
if ON_GPU:
    CASES += [(1, 64, 32, 32, 128, 512), (3, 7, 9, 3, 64, 100)]


def _tables(B, T, hd, dtype):
    pos = torch.randint(0, 1000, (B, T), device=DEVICE).double()
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=DEVICE).double() / hd))
    f = pos[..., None] * inv
    emb = torch.cat((f, f), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("B,T,h,n_kv,hd,S", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qk-norm"])
def test_rope_and_cache_write_matches_reference(B, T, h, n_kv, hd, S, dtype, qk_norm):
    """qk_norm: Qwen3's per-head RMSNorm on q and k before RoPE, in the same launch."""
    qkv = (torch.randn(B, T, (h + 2 * n_kv) * hd, device=DEVICE) * (3 if qk_norm else 1)).to(dtype)
    norms = (dict(q_norm=(1 + 0.3 * torch.randn(hd, device=DEVICE)).to(dtype),
                  k_norm=(1 + 0.3 * torch.randn(hd, device=DEVICE)).to(dtype), eps=1e-6) if qk_norm else {})
    cos, sin = _tables(B, T, hd, dtype)
    slots = torch.randperm(S, device=DEVICE)[:T]
    kc0 = torch.randn(B, n_kv, S, hd, device=DEVICE).to(dtype)
    vc0 = torch.randn(B, n_kv, S, hd, device=DEVICE).to(dtype)
    kc, vc = kc0.clone(), vc0.clone()
    kc[:, :, slots] = float("nan")                      # poison the slots the kernel must write
    vc[:, :, slots] = float("nan")
    q = rope_and_cache_write(qkv, cos, sin, slots, kc, vc, h, n_kv, **norms)

    ke, ve = kc0.double(), vc0.double()
    qe = rope_and_cache_write_ref(qkv.double(), cos.double(), sin.double(), slots, ke, ve, h, n_kv,
                                  **{k: (v.double() if torch.is_tensor(v) else v) for k, v in norms.items()})
    kl, vl = kc0.clone(), vc0.clone()
    ql = rope_and_cache_write_ref(qkv, cos, sin, slots, kl, vl, h, n_kv, **norms)
    floor = 1e-6
    if qk_norm:
        # The model rounds the normalised head to the dtype before RoPE (koala.model.RMSNorm, as
        # transformers' Qwen3 does). The kernel sums its squares in another order, so at a
        # rounding tie it may land one ulp from PyTorch's choice; that ulp passes through the
        # rotation with a gain of at most |cos| + |sin| <= 1.42. So the floor is 1.5 ulps at the
        # values' size (bf16: 2^-7 relative; fp32: 2^-23), on top of twice the reference's error.
        mag = max(qe.abs().max().item(), ke[:, :, slots].abs().max().item())
        floor = 1.5 * 2.0 ** (math.floor(math.log2(mag)) - (7 if dtype == torch.bfloat16 else 23))
    assert q.shape == (B, h, T, hd) and q.dtype == dtype
    assert_close_to_baseline(q, qe, ql, floor=floor, what="q")
    assert_close_to_baseline(kc, ke, kl, floor=floor, what="k cache")
    assert torch.equal(vc, vl), "v must be copied exactly"
    untouched = torch.ones(S, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(kc[:, :, untouched], kc0[:, :, untouched])
    if qk_norm:   # the norm is really applied: without it the result is far off
        q_plain = rope_and_cache_write(qkv, cos, sin, slots, kc.clone(), vc.clone(), h, n_kv)
        assert (q_plain.double() - qe).abs().max() > 10 * (q.double() - qe).abs().max() + 1e-3


def test_rope_qk_norm_needs_both_weights():
    qkv = torch.randn(1, 2, 4 * 8, device=DEVICE)
    cos = sin = torch.randn(1, 2, 8, device=DEVICE)
    kc = vc = torch.zeros(1, 1, 4, 8, device=DEVICE)
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="both or neither"):
        rope_and_cache_write(qkv, cos, sin, slots, kc, vc, 2, 1, q_norm=torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="q_norm"):
        rope_and_cache_write(qkv, cos, sin, slots, kc, vc, 2, 1, q_norm=torch.ones(4, device=DEVICE),
                             k_norm=torch.ones(4, device=DEVICE))


def test_rope_broadcast_tables_and_strided_qkv():
    B, T, h, n_kv, hd, S = 2, 3, 2, 1, 4, 5
    base = torch.randn(B, T, (h + 2 * n_kv) * hd + 3, device=DEVICE)
    qkv = base[..., : (h + 2 * n_kv) * hd]               # row stride larger than the width
    cos, sin = _tables(1, T, hd, torch.float32)
    cos, sin = cos.expand(B, T, hd), sin.expand(B, T, hd)  # stride-0 batch dim
    slots = torch.tensor([4, 0, 2], device=DEVICE)
    kc, vc = poison(torch.empty(B, n_kv, S, hd, device=DEVICE)), poison(torch.empty(B, n_kv, S, hd, device=DEVICE))
    kr, vr = kc.clone(), vc.clone()
    q = rope_and_cache_write(qkv, cos, sin, slots, kc, vc, h, n_kv)
    qr = rope_and_cache_write_ref(qkv, cos, sin, slots, kr, vr, h, n_kv)
    torch.testing.assert_close(q, qr)
    torch.testing.assert_close(kc[:, :, slots], kr[:, :, slots])
    torch.testing.assert_close(vc[:, :, slots], vr[:, :, slots])


def test_rope_rejects_bad_inputs():
    qkv = torch.randn(1, 2, 4 * 8, device=DEVICE)
    cos = sin = torch.randn(1, 2, 8, device=DEVICE)
    kc = vc = torch.zeros(1, 1, 4, 8, device=DEVICE)
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="qkv width"):
        rope_and_cache_write(qkv, cos, sin, slots, kc, vc, 3, 1)
    with pytest.raises(ValueError, match="slots"):
        rope_and_cache_write(qkv, cos, sin, slots.float(), kc, vc, 2, 1)
    with pytest.raises(ValueError, match="k_cache"):
        rope_and_cache_write(qkv, cos, sin, slots, kc[..., :4], vc, 2, 1)
