"""The runtime against the reference, transformers, on tiny random configs of each architecture."""
import json
import threading
import time

import pytest
import torch

from koala.loading import load_target
from koala.model import causal_mask, tree_mask
from tests.helpers import ARCHS, make_hf_checkpoint


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(tmp_path, arch):
    path, hf = make_hf_checkpoint(tmp_path, arch)
    ours = load_target(path, device="cpu", dtype=torch.float32).model
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        got, hidden = ours(ids)
    assert hidden.shape == (2, 40, 64)
    err = (got - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), err
    # the cached path: prefill 30, then 10 one-token steps
    ours.setup_cache(2, 64)
    with torch.no_grad():
        s = torch.arange(30)
        a, _ = ours(ids[:, :30], s.expand(2, 30), s, causal_mask(s, 64))
        outs = [a]
        for t in range(30, 40):
            s = torch.tensor([t])
            o, _ = ours(ids[:, t:t + 1], s.expand(2, 1), s, causal_mask(s, 64))
            outs.append(o)
    got = torch.cat(outs, 1)
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_tree_verification_matches_sequential(tmp_path):
    """Tokens verified as a tree at explicit positions under an ancestor mask give each branch
    exactly the logits that decoding that branch alone gives; keep_cache keeps one branch."""
    path, _ = make_hf_checkpoint(tmp_path, "llama")
    m = load_target(path, device="cpu", dtype=torch.float32).model
    m.setup_cache(1, 64)
    torch.manual_seed(0)
    prefix = torch.randint(3, 128, (1, 12))
    # tree: 0 -> 1 -> 3 ; 0 -> 2 -> 4 ; node 0 is the next token
    toks = torch.tensor([[5, 7, 9, 11, 13]])
    parent = [-1, 0, 0, 1, 2]
    depth = torch.tensor([0, 1, 1, 2, 2])
    anc = torch.zeros(5, 5, dtype=torch.bool)
    for i in range(5):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parent[j]
    with torch.no_grad():
        s = torch.arange(12)
        m(prefix, s[None], s, causal_mask(s, 64))
        slots = torch.arange(12, 17)
        tl, _ = m(toks, (12 + depth)[None], slots, tree_mask(12, slots, anc, 64))
        for path in ([0, 1, 3], [0, 2, 4]):
            seq = torch.cat([prefix, toks[:, path]], 1)
            ref, _ = m(seq)  # uncached reference
            assert torch.allclose(tl[0, path], ref[0, 12:], atol=1e-4), path
        # keep branch [0, 2, 4] at slots 12..14 and decode one more token after it
        m.keep_cache(torch.tensor([12, 14, 16]), torch.tensor([12, 13, 14]))
        s = torch.tensor([15])
        nxt, _ = m(torch.tensor([[21]]), s[None], s, causal_mask(s, 64))
        ref, _ = m(torch.cat([prefix, toks[:, [0, 2, 4]], torch.tensor([[21]])], 1))
        assert torch.allclose(nxt[0, -1], ref[0, -1], atol=1e-4)


def test_narrow_window_equals_full_cache(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "qwen2")
    m = load_target(path, device="cpu", dtype=torch.float32).model
    m.setup_cache(1, 128)
    ids = torch.randint(3, 128, (1, 20))
    with torch.no_grad():
        s = torch.arange(20)
        full, _ = m(ids, s[None], s, causal_mask(s, 128))
        narrow, _ = m(ids, s[None], s, causal_mask(s, 32))
    assert torch.equal(full, narrow) or torch.allclose(full, narrow, atol=1e-5)


def _slow_dequantise(gguf, out):
    """A stand-in for the GGUF conversion: 50 ms of reading the GGUF, then config.json opened
    (empty) and written 20 ms later, as a real conversion writes its files; then the marker."""
    time.sleep(0.05)
    with open(out / "config.json", "w") as f:
        time.sleep(0.02)
        f.write(json.dumps({"model_type": "llama", "writer": threading.get_ident()}))
    (out / "koala_complete").write_text(str(gguf))


def test_gguf_cache_is_safe_when_processes_start_together(tmp_path, monkeypatch):
    """Six trainings starting at once on the GPU machine once crashed: one read the cache entry's
    config.json while another was rewriting it. Racing conversions must each see a complete entry."""
    import koala.loading as L
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(L, "_dequantise_into", _slow_dequantise)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    errors, outs = [], []

    def worker(delay):
        time.sleep(delay)
        try:
            out = L._gguf_to_cache(gguf)
            for _ in range(10):                       # while the later starters convert
                json.loads((out / "config.json").read_text())
                time.sleep(0.01)
            outs.append(out)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(0.02 * i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(outs)) == 1 and len(outs) == 6
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [outs[0].name]   # no private copies left


def test_gguf_cache_replaces_an_incomplete_entry_and_keeps_a_complete_one(tmp_path):
    from koala.loading import _publish
    out = tmp_path / "entry"
    out.mkdir()
    (out / "config.json").write_text("{")              # a crash mid-write, no marker
    tmp = tmp_path / "mine"
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    (tmp / "koala_complete").write_text("x")
    assert _publish(tmp, out) == out and (out / "config.json").read_text() == "{}" and not tmp.exists()
    other = tmp_path / "late"
    other.mkdir()
    (other / "config.json").write_text('{"late": 1}')
    (other / "koala_complete").write_text("x")
    assert _publish(other, out) == out and (out / "config.json").read_text() == "{}"   # the first wins


def test_attention_windows_and_buckets():
    # one list of windows and one rule for every decoder (koala/graphs.py)
    from koala import graphs
    assert graphs.windows(2048) == [256, 512, 1024, 2048]
    assert graphs.windows(3000) == [256, 512, 1024, 2048, 3000]          # the cache's own size last
    assert graphs.windows(100) == [100]
    assert graphs.windows(65536)[-3:] == [16384, 32768, 65536]
    wins = graphs.windows(3000)
    assert [graphs.window(wins, n) for n in (0, 1, 256, 257, 2048, 2049, 3000)] == \
        [256, 256, 256, 512, 2048, 3000, 3000]
    with pytest.raises(ValueError, match="3001 cache slots needed, but the cache has 3000"):
        graphs.window(wins, 3001)
    with pytest.raises(ValueError, match="no attention window"):
        graphs.windows(0)
    assert [graphs.bucket(n) for n in (0, 1, 256, 257, 5000)] == [256, 256, 256, 512, 8192]


def test_the_kernels_name_clash_is_explained(monkeypatch, tmp_path):
    # transformers >= 5.25 with the Hugging Face `kernels` package imports koala's kernels/ in
    # its place: koala says so and what to do, instead of transformers' ImportError
    import transformers

    from koala import KoalaError, loading
    clash = ImportError("cannot import name 'CUDAProperties' from 'kernels' (/repo/kernels/__init__.py)")

    def boom(*a, **k):
        raise clash
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(KoalaError, match="pip uninstall -y kernels"):
        loading.load_tokenizer(tmp_path)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", boom)
    with pytest.raises(KoalaError, match="same import name"):
        loading._read_hf_dir(tmp_path)
    other = ImportError("No module named 'gguf'")
    assert loading.kernels_clash(other) is None and loading.kernels_clash(clash) is not None


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_new_architectures_decode_as_transformers_does(tmp_path, arch):
    """Qwen3 (per-head q/k norms, in the target and in an EAGLE head's layers) and Phi-3 (q|k|v
    and gate|up stored fused) through the whole speculative loop: greedy output equals
    transformers' generate, for an EAGLE chain and a Medusa tree with random heads."""
    from koala import SpeculativeGenerator
    from koala.heads import DraftConfig
    from tests.helpers import hf_greedy
    path, hf = make_hf_checkpoint(tmp_path, arch, seed=5)
    lt = load_target(path, device="cpu", dtype=torch.float32)
    ids = [5, 9, 17, 3, 44, 21]
    ref = hf_greedy(hf, ids, 24)
    for kind, opts in (("eagle", dict(mode="chain", depth=3)), ("medusa", dict(mode="tree", tree_size=8))):
        torch.manual_seed(2)
        head = DraftConfig(kind=kind, layers=2).build(lt)
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 0.05)
        res = SpeculativeGenerator(lt, head, max_seq_len=128, **opts).generate(
            ids, max_new_tokens=24, chat=False, ignore_eos=True)
        assert res.token_ids == ref, (kind, res.token_ids, ref)
        if kind == "eagle":   # the head's layers are the target's kind: norms iff Qwen3
            assert (head.layers[0].attention.q_norm is not None) == (arch == "qwen3")
    assert lt.model.config.qk_norm == (arch == "qwen3")


def test_partial_rotary_and_phi3_window_are_read(tmp_path):
    """Phi-3.5 / Phi-4-mini rotate part of each head: refused with the reason; Phi-3's sliding
    window is kept (koala refuses contexts past it, as for Mistral)."""
    from koala.config import ModelConfig
    from koala.errors import UnsupportedModelError
    from transformers import AutoConfig
    cfg = AutoConfig.for_model("phi3", num_hidden_layers=2, sliding_window=2047)
    assert ModelConfig.from_hf(cfg).sliding_window == 2047
    cfg.rope_parameters = {**cfg.rope_parameters, "partial_rotary_factor": 0.75}
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        ModelConfig.from_hf(cfg)
    q3 = AutoConfig.for_model("qwen3", num_hidden_layers=2)
    assert ModelConfig.from_hf(q3).qk_norm and ModelConfig.from_hf(q3).sliding_window is None
