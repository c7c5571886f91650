"""Draft heads and their checkpoint format, on tiny random targets (fp32, CPU)."""
import json

import pytest
import torch

from koala.config import ModelConfig
from koala.errors import CheckpointError, HeadMismatchError
from koala.heads import DraftConfig, EagleHead, MedusaHead, load_head, target_fingerprint
from koala.model import Transformer, causal_mask


def tiny(seed=0, **over):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny")
    for k, v in over.items():
        setattr(cfg, k, v)
    return Transformer(cfg).eval().requires_grad_(False)


def randomize(head, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return head


# ---------------------------------------------------------------------------------------------
# config

@pytest.mark.parametrize("kw, msg", [
    (dict(kind="hydra"), "kind"), (dict(layers=0), "layers"), (dict(layers=9), "layers"),
    (dict(layers=2.0), "layers"), (dict(n_heads=0), "n_heads"), (dict(n_heads=9), "n_heads"),
    (dict(shared_lm_head="yes"), "shared_lm_head"), (dict(chain_depth=0), "chain_depth"),
    (dict(chain_depth=17), "chain_depth"), (dict(chain_depth=True), "chain_depth"),
    (dict(kind="medusa", n_heads=3, chain_depth=4), "chain_depth"),
])
def test_draft_config_validates(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DraftConfig(**kw)


def test_build_rejects_non_target():
    with pytest.raises(TypeError):
        DraftConfig().build(object())


# ---------------------------------------------------------------------------------------------
# Medusa

@pytest.mark.parametrize("shared", [True, False])
def test_untrained_medusa_is_target_lm_head(shared):
    m = tiny()
    head = DraftConfig("medusa", layers=3, n_heads=4, shared_lm_head=shared).build(m)
    hidden = torch.randn(2, 7, m.config.dim)
    out = head(hidden)
    assert out.shape == (4, 2, 7, m.config.vocab_size)
    ref = m.output(hidden)
    for i in range(4):
        torch.testing.assert_close(out[i], ref, rtol=0, atol=0)


def test_medusa_blocks_independent_and_train_differently():
    m = tiny()
    head = DraftConfig("medusa", layers=3, n_heads=2).build(m)
    ids = {id(p) for p in head.parameters()}
    assert len(ids) == 2 * 3 * 2  # H * K * (W, b), none shared
    assert not any(p is m.output.weight for p in head.parameters())  # frozen head not a parameter
    before = [p.detach().clone() for p in head.parameters()]
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    torch.manual_seed(3)
    for _ in range(3):
        hidden = torch.randn(2, 5, m.config.dim)
        loss = head(hidden).logsumexp(-1).mean() - head(hidden)[..., 3].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    deltas = [(p.detach() - b) for p, b in zip(head.parameters(), before)]
    assert all(d.abs().sum() > 0 for d in deltas)
    W0 = head.blocks[0][0].linear.weight.detach() - before[0]
    W1 = head.blocks[0][1].linear.weight.detach() - before[2]
    assert not torch.allclose(W0, W1)
    assert m.output.weight.grad is None


def test_medusa_resblock_weights_stack():
    m = tiny()
    head = randomize(DraftConfig("medusa", layers=2, n_heads=3).build(m))
    W, b = head.resblock_weights()
    assert W.shape == (3, 2, 64, 64) and b.shape == (3, 2, 64)
    torch.testing.assert_close(W[2, 1], head.blocks[2][1].linear.weight)
    torch.testing.assert_close(b[1, 0], head.blocks[1][0].linear.bias)


# ---------------------------------------------------------------------------------------------
# EAGLE

def test_eagle_shapes_and_frozen_parts():
    m = tiny()
    head = DraftConfig("eagle", layers=2).build(m)
    B, T, D, V = 2, 6, m.config.dim, m.config.vocab_size
    tokens = torch.randint(0, V, (B, T))
    logits, feats = head(tokens, torch.randn(B, T, D))
    assert logits.shape == (B, T, V) and feats.shape == (B, T, D)
    torch.testing.assert_close(logits, m.output(feats))
    assert len(head.layers) == 2 and head.layers[0] is not head.layers[1]
    names = set(head.state_dict())
    assert not any("embed" in n or "output" in n for n in names)
    assert head.layers[0].attention.wqkv.weight is not head.layers[1].attention.wqkv.weight


def test_eagle_cached_equals_uncached():
    m = tiny()
    head = randomize(DraftConfig("eagle", layers=2).build(m), seed=5)
    B, T, D, V, S = 2, 9, m.config.dim, m.config.vocab_size, 32
    tokens = torch.randint(0, V, (B, T))
    feats = torch.randn(B, T, D)
    ref_logits, ref_feats = head(tokens, feats)
    head.setup_cache(B, S)
    # prefill 5, then one at a time
    outs = []
    slots = torch.arange(5)
    pos = slots.expand(B, 5)
    outs.append(head(tokens[:, :5], feats[:, :5], pos, slots, causal_mask(slots, S))[1])
    for t in range(5, T):
        s = torch.tensor([t])
        outs.append(head(tokens[:, t:t + 1], feats[:, t:t + 1], s.expand(B, 1), s, causal_mask(s, S))[1])
    torch.testing.assert_close(torch.cat(outs, 1), ref_feats, rtol=1e-5, atol=1e-5)
    # keep_cache copies entries slot for slot
    head.keep_cache(torch.arange(0, 9), torch.arange(20, 29))
    for layer in head.layers:
        torch.testing.assert_close(layer.attention.kv_cache.k[:, :, 20:29], layer.attention.kv_cache.k[:, :, 0:9])


# ---------------------------------------------------------------------------------------------
# checkpoints

CASES = [DraftConfig("medusa", 2, 3, True), DraftConfig("medusa", 1, 2, False), DraftConfig("eagle", 3),
         DraftConfig("eagle", 2, chain_depth=2)]


@pytest.mark.parametrize("dc", CASES, ids=lambda d: f"{d.kind}-K{d.layers}-{d.shared_lm_head}")
def test_save_load_round_trip_exact(tmp_path, dc):
    m = tiny()
    head = randomize(dc.build(m, "tiny-a"))
    head.save_pretrained(tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["target"]["name"] == "tiny-a" and cfg["target"]["fingerprint"] == target_fingerprint(m)
    assert cfg["kind"] == dc.kind and cfg["layers"] == dc.layers
    back = load_head(tmp_path / "h", m)
    assert type(back) is type(head) and back.config == dc
    sd, sd2 = head.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    x = torch.randn(1, 4, m.config.dim)
    if dc.kind == "medusa":
        assert torch.equal(head(x), back(x))
    else:
        tok = torch.randint(0, 256, (1, 4))
        assert torch.equal(head(tok, x)[0], back(tok, x)[0])
    cls = MedusaHead if dc.kind == "medusa" else EagleHead
    assert type(cls.from_pretrained(tmp_path / "h", m)) is cls


def test_frozen_weights_not_saved(tmp_path):
    from safetensors.torch import load_file
    m = tiny()
    DraftConfig("eagle", 1).build(m).save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert names == set(DraftConfig("eagle", 1).build(m).state_dict())
    assert not any("embed" in n or n.startswith("output") for n in names)


def test_sharding_over_16mib(tmp_path, monkeypatch):
    import koala.heads as H
    monkeypatch.setattr(H, "MAX_SHARD_BYTES", 40_000)  # tiny shards; proj (256x64 fp32 = 64 KiB) is split by rows
    m = tiny()
    head = randomize(DraftConfig("medusa", 2, 2, shared_lm_head=False).build(m))
    head.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert "model.safetensors" not in files and len(files) > 2
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert all((tmp_path / f).stat().st_size <= 40_000 + 4096 for f in files)
    back = load_head(tmp_path, m)
    for k, v in head.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    (tmp_path / files[-1]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_head(tmp_path, m)


def test_bf16_fingerprint_matches_fp32(tmp_path):
    m = tiny()
    head = DraftConfig("eagle", 1).build(m)
    head.save_pretrained(tmp_path)
    back = load_head(tmp_path, tiny().to(torch.bfloat16))
    assert back.fc.weight.dtype == torch.bfloat16


@pytest.fixture
def saved(tmp_path):
    m = tiny()
    randomize(DraftConfig("eagle", 2).build(m, "tiny-a")).save_pretrained(tmp_path / "h")
    return m, tmp_path / "h"


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_head(tmp_path / "nope", tiny())


def test_missing_config(saved):
    m, d = saved
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_head(d, m)


def test_corrupt_json(saved):
    m, d = saved
    (d / "config.json").write_text('{"format": "koala-draft-head", "kind": ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_head(d, m)


def test_missing_weights(saved):
    m, d = saved
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights are missing"):
        load_head(d, m)


def test_truncated_weights(saved):
    m, d = saved
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_head(d, m)


def _rewrite(d, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors")


def test_missing_tensor(saved):
    m, d = saved
    _rewrite(d, lambda sd: sd.pop("fc.bias"))
    with pytest.raises(CheckpointError, match=r"missing \['fc.bias'\]"):
        load_head(d, m)


def test_unexpected_tensor(saved):
    m, d = saved
    _rewrite(d, lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_head(d, m)


def test_misshaped_tensor(saved):
    m, d = saved
    _rewrite(d, lambda sd: sd.__setitem__("fc.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_head(d, m)


def test_nan_weights(saved):
    m, d = saved
    _rewrite(d, lambda sd: sd["fc.bias"].fill_(float("nan")))
    with pytest.raises(CheckpointError, match="NaN"):
        load_head(d, m)


def test_config_k_disagrees_with_weights(saved):
    m, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_head(d, m)


def test_invalid_kind_in_config(saved):
    m, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["kind"] = "hydra"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="invalid head"):
        load_head(d, m)


def test_wrong_kind_asked(saved):
    m, d = saved
    with pytest.raises(HeadMismatchError, match="'eagle' head but a 'medusa'"):
        MedusaHead.from_pretrained(d, m)


def test_other_target(saved):
    _, d = saved
    other = tiny(seed=1)  # same architecture, other weights
    with pytest.raises(HeadMismatchError, match="trained for target 'tiny-a'.*given target is 'tiny-b'"):
        load_head(d, other, target_name="tiny-b")


def test_other_architecture(saved):
    _, d = saved
    with pytest.raises(HeadMismatchError, match="trained for target"):
        load_head(d, tiny(n_layers=3))


def test_newer_format(saved):
    m, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="upgrade koala"):
        load_head(d, m)


def test_chain_depth_is_the_decoders_default(tmp_path):
    """A head's chain_depth (the depth measured fastest for it) is the chain depth a decoder
    takes when none is asked for; an explicit depth wins; a config.json without the field (the
    format before it) loads with None, and the decoder keeps its own default."""
    from koala.speculative import SpeculativeDecoder
    m = tiny()
    m.setup_cache(1, 64)
    for dc, own in ((DraftConfig("eagle", 1), 5), (DraftConfig("medusa", 1, 3), 3)):
        head = dc.build(m, "tiny")
        head.save_pretrained(tmp_path / dc.kind)
        cfg_path = tmp_path / dc.kind / "config.json"
        cfg = json.loads(cfg_path.read_text())
        assert cfg["chain_depth"] is None
        del cfg["chain_depth"]
        cfg_path.write_text(json.dumps(cfg))
        old = load_head(tmp_path / dc.kind, m)
        assert old.config.chain_depth is None
        assert SpeculativeDecoder(m, old, mode="chain").depth == own
        cfg["chain_depth"] = 2
        cfg_path.write_text(json.dumps(cfg))
        new = load_head(tmp_path / dc.kind, m)
        assert SpeculativeDecoder(m, new, mode="chain").depth == 2
        assert SpeculativeDecoder(m, new, mode="chain", depth=3).depth == 3
        if dc.kind == "eagle":       # trees keep their own default depth
            assert SpeculativeDecoder(m, new, mode="tree", tree_size=8, top_k=2).depth == 6
