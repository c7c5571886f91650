"""kernels/embed.py: embeddings and RoPE rows in one launch, bit for bit the PyTorch gathers and
round-to-nearest-even casts they replace."""
import pytest
import torch

from conftest import DEVICE, ON_GPU, poison
from kernels.embed import embed_rope, embed_rope_ref
from koala.config import ModelConfig
from koala.model import Rotary

# (B, T, V, D, hd): one decoded token, a short chain, odd widths, more than one BLOCK_D of columns
SHAPES = [(1, 1, 50, 64, 16), (1, 5, 97, 72, 32), (2, 3, 33, 1030, 64)] + \
    ([(1, 1, 49152, 576, 64), (1, 300, 49152, 576, 64), (4, 9, 32000, 4096, 128)] if ON_GPU else [])


def _tables(hd, S=64, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    f = torch.outer(torch.arange(S, dtype=torch.float32) * 3.7, inv)   # phases far from round values
    e = torch.cat((f, f), -1)
    return e.cos().to(DEVICE), e.sin().to(DEVICE)


@pytest.mark.parametrize("B,T,V,D,hd", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_features", [False, True])
def test_embed_rope_is_the_gathers_bit_for_bit(B, T, V, D, hd, dtype, with_features):
    g = torch.Generator().manual_seed(B * 100 + T + D)
    emb = torch.randn(V, D, generator=g).to(dtype).to(DEVICE)
    cos_t, sin_t = _tables(hd)
    tok = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    pos = torch.randint(0, cos_t.shape[0], (B, T), generator=g).to(DEVICE)
    feat = torch.randn(B, T, D, generator=g).to(DEVICE) if with_features else None   # fp32 features
    got = embed_rope(tok, pos, emb, cos_t, sin_t, feat)
    want = embed_rope_ref(tok, pos, emb, cos_t, sin_t, feat)
    for name, a, b in zip(("x", "cos", "sin"), got, want):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


def test_embed_rope_matches_the_model_rotary_and_embedding():
    """The tables koala.model.Rotary holds, through the int32 positions and a strided feature view
    of an EAGLE head's catch-up."""
    cfg = ModelConfig(vocab_size=40, dim=48, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=12, intermediate_size=64,
                      max_position_embeddings=128)
    rot = Rotary(cfg, 128).to(DEVICE)
    emb = torch.randn(40, 48, dtype=torch.bfloat16, device=DEVICE)
    tok = torch.tensor([[3, 39, 0, 7]], device=DEVICE)
    pos = torch.tensor([[0, 127, 64, 5]], dtype=torch.int32, device=DEVICE)
    same = embed_rope(tok, torch.tensor(9, device=DEVICE).expand(1, 4), emb, rot.cos, rot.sin)[1]
    assert torch.equal(same, rot.cos[9].to(torch.bfloat16).expand(1, 4, 12))   # an expanded view
    base = torch.randn(1, 4, 96, dtype=torch.bfloat16, device=DEVICE)
    feat = base[..., :48]                                 # rows strided by 96
    x, c, s = embed_rope(tok, pos, emb, rot.cos, rot.sin, feat)
    c_ref, s_ref = rot(pos.long(), torch.bfloat16)
    assert torch.equal(c, c_ref) and torch.equal(s, s_ref)
    assert torch.equal(x, torch.cat([emb[tok], feat], -1))


def test_embed_rope_out_of_range_ids_and_positions_give_zero_rows():
    emb = torch.randn(10, 16, device=DEVICE)
    cos_t, sin_t = _tables(8, S=12)
    tok = torch.tensor([[2, 10, -1]], device=DEVICE)
    pos = torch.tensor([[12, 3, -5]], device=DEVICE)
    x, c, s = embed_rope(tok, pos, emb, cos_t, sin_t)
    assert torch.equal(x[0, 0], emb[2]) and not x[0, 1:].any()
    assert not c[0, 0].any() and not s[0, 2].any() and torch.equal(c[0, 1], cos_t[3])


def test_embed_rope_checks_its_inputs():
    emb = torch.randn(10, 16, device=DEVICE)
    cos_t, sin_t = _tables(8)
    tok = torch.zeros(1, 2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="positions"):
        embed_rope(tok, torch.zeros(1, 3, dtype=torch.long, device=DEVICE), emb, cos_t, sin_t)
    with pytest.raises(ValueError, match="tokens"):
        embed_rope(tok.float(), tok, emb, cos_t, sin_t)
    with pytest.raises(ValueError, match="features"):
        embed_rope(tok, tok, emb, cos_t, sin_t, torch.zeros(1, 2, 15, device=DEVICE))
    with pytest.raises(ValueError, match="sin_table"):
        embed_rope(tok, tok, emb, cos_t, sin_t[:, :4])
