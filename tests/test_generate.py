"""Plain decoding through the user API, and every kind of bad input."""
import json

import pytest
import torch

from koala import (CheckpointError, ContextLengthError, KoalaError, SamplingError, SpeculativeGenerator,
                   UnsupportedModelError, load_target)
from koala.sampling import SamplerState, SamplingParams, sample, warp_probs
from tests.helpers import hf_greedy, make_hf_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, hf = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama", seed=3)
    return path, hf


def _prompt(n=8):
    return " ".join(f"w{i}" for i in range(5, 5 + n))


def test_plain_greedy_equals_step_by_step_reference(tiny):
    path, hf = tiny
    gen = SpeculativeGenerator.from_pretrained(path, device="cpu", max_seq_len=128)
    res = gen.generate(_prompt(), max_new_tokens=40, chat=False, ignore_eos=True)
    ids = gen.encode(_prompt(), chat=False)
    with torch.no_grad():
        ref_new = hf_greedy(hf, ids, 40)
    assert res.token_ids == ref_new
    assert res.stats.new_tokens == 40 and res.stats.tokens_per_s > 0


def test_sampling_is_seeded_and_varies(tiny):
    gen = SpeculativeGenerator.from_pretrained(tiny[0], device="cpu", max_seq_len=128)
    kw = dict(max_new_tokens=30, temperature=1.0, chat=False, ignore_eos=True)
    a = gen.generate(_prompt(), seed=7, **kw).token_ids
    b = gen.generate(_prompt(), seed=7, **kw).token_ids
    c = gen.generate(_prompt(), seed=8, **kw).token_ids
    assert a == b and a != c


def test_eos_stop_strings_and_streaming(tiny):
    gen = SpeculativeGenerator.from_pretrained(tiny[0], device="cpu", max_seq_len=128)
    full = gen.generate(_prompt(), max_new_tokens=30, chat=False, ignore_eos=True)
    words = full.text.split()
    stop = words[5]
    chunks = []
    res = gen.generate(_prompt(), max_new_tokens=30, chat=False, ignore_eos=True, stop=stop, stream=chunks.append)
    assert res.text.endswith(stop) and stop not in res.text[:-len(stop)]
    assert "".join(chunks) == res.text
    assert res.token_ids == full.token_ids[:len(res.token_ids)]
    # an EOS in the output ends it, EOS included
    eos = gen.model.config.eos_token_ids[0]
    gen.model.config.eos_token_ids[:] = [full.token_ids[3]]
    try:
        res = gen.generate(_prompt(), max_new_tokens=30, chat=False)
        assert res.token_ids == full.token_ids[:full.token_ids.index(full.token_ids[3]) + 1]
    finally:
        gen.model.config.eos_token_ids[:] = [eos]


def test_warp_probs_top_k_top_p():
    st = SamplerState("cpu")
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    st.set(SamplingParams(temperature=1.0, top_k=2))
    p = warp_probs(logits, st)
    ref = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    assert torch.allclose(p[0, :2], ref) and p[0, 2:].sum() == 0
    st.set(SamplingParams(temperature=0.5, top_p=0.9))
    p = warp_probs(logits, st)
    full = torch.softmax(logits[0] / 0.5, 0)  # 0.865, 0.117, ...: the first two reach 0.9
    assert torch.allclose(p[0, :2], full[:2] / full[:2].sum()) and p[0, 2:].sum() == 0


def test_warp_probs_without_truncation_is_one_softmax():
    """Temperature alone skips the sort: the same distribution as the sorting path computes
    (to rounding), and top-k / top-p settings switch the sorting path back on."""
    st = SamplerState("cpu")
    logits = torch.randn(3, 1000) * 4
    st.set(SamplingParams(temperature=0.7))
    assert not st.truncate
    fast = warp_probs(logits, st)
    assert torch.equal(fast, torch.softmax(logits / 0.7, -1))
    st.truncate = True                                # the sorting path on the same settings
    assert torch.allclose(warp_probs(logits, st), fast, atol=1e-7, rtol=1e-5)
    for kw in (dict(top_p=0.9), dict(top_k=5)):
        st.set(SamplingParams(temperature=0.7, **kw))
        assert st.truncate and (warp_probs(logits, st) == 0).any()
    assert [SamplingParams(**kw).graph_mode for kw in (dict(), dict(temperature=1.0), dict(temperature=1.0, top_p=0.5),
                                                        dict(temperature=1.0, top_k=3))] == \
        ["greedy", "sample", "truncate", "truncate"]


def test_exponential_race_samples_the_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40000
    noise = torch.empty(n, 4).exponential_(generator=g)
    draws = sample(p.expand(n, 4), noise)
    freq = torch.bincount(draws, minlength=4).float() / n
    # 4 sigma of a binomial proportion at n=40000 is at most 0.01
    assert (freq - p).abs().max() < 0.01, freq


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_invalid_sampling_settings(tiny, kw, msg):
    gen = SpeculativeGenerator.from_pretrained(tiny[0], device="cpu", max_seq_len=64)
    with pytest.raises(KoalaError, match=msg):
        gen.generate(_prompt(), chat=False, **kw)


def test_prompt_longer_than_cache(tiny):
    gen = SpeculativeGenerator.from_pretrained(tiny[0], device="cpu", max_seq_len=64)
    with pytest.raises(ContextLengthError, match="cache holds 64"):
        gen.generate(_prompt(60), chat=False, max_new_tokens=10)
    with pytest.raises(ContextLengthError, match="exceeds what the model supports"):
        SpeculativeGenerator.from_pretrained(tiny[0], device="cpu", max_seq_len=100000)


def test_bad_prompt(tiny):
    gen = SpeculativeGenerator.from_pretrained(tiny[0], device="cpu", max_seq_len=64)
    with pytest.raises(KoalaError, match="prompt"):
        gen.generate([{"role": "user"}])
    with pytest.raises(KoalaError, match="chat template"):
        gen.generate([{"role": "user", "content": "w5"}])


def test_token_id_prompts(tiny):
    gen = SpeculativeGenerator.from_pretrained(tiny[0], device="cpu", max_seq_len=128)
    ids = gen.encode(_prompt(), chat=False)
    a = gen.generate(ids, max_new_tokens=12, ignore_eos=True)
    b = gen.generate(_prompt(), max_new_tokens=12, chat=False, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.stats.prompt_tokens == len(ids)
    V = gen.model.config.vocab_size
    for bad in ([-1], [3, V]):
        with pytest.raises(KoalaError, match=f"token ids must be in \\[0, {V}\\)"):
            gen.generate(bad)


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt_long"), "llama", seed=3, max_positions=1024)[0]


@pytest.mark.parametrize("draft", [None, "eagle", "medusa"])
def test_warmup_reaches_every_window_and_changes_nothing(tiny_long, draft):
    from koala.heads import DraftConfig
    kw = dict(device="cpu", max_seq_len=1024)
    if draft:
        torch.manual_seed(0)
        kw["draft"] = DraftConfig(kind=draft, layers=1)
    gen = SpeculativeGenerator.from_pretrained(tiny_long, **kw)
    before = gen.generate(_prompt(), max_new_tokens=20, chat=False, ignore_eos=True).token_ids
    lengths = gen.warmup([0.0, 0.9], new_tokens=8)
    assert lengths == [1, 256, 512]
    # each synthetic prompt decodes into the next window: plain decoding's and the drafter's
    assert [gen.plain.window(n + 8 - 1) for n in lengths] == gen.plain.windows == [256, 512, 1024]
    if gen.spec is not None:
        assert [gen.spec.window(n) for n in lengths] == [256, 512, 1024]
    after = gen.generate(_prompt(), max_new_tokens=20, chat=False, ignore_eos=True).token_ids
    assert after == before


def test_missing_and_corrupt_checkpoints(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="neither a local path"):
        load_target(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_target(tmp_path / "empty")
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny[0], bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_target(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_target(bad)


def test_unsupported_architecture(tmp_path, tiny):
    import shutil
    d = tmp_path / "gpt2"
    shutil.copytree(tiny[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2"):
        load_target(d)


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager(tiny):
    path = tiny[0]
    a = SpeculativeGenerator.from_pretrained(path, device="cuda", dtype=torch.float32, max_seq_len=256)
    b = SpeculativeGenerator.from_pretrained(path, device="cuda", dtype=torch.float32, max_seq_len=256,
                                             use_cuda_graph=False)
    for kw in (dict(), dict(temperature=0.8, top_p=0.9, seed=3)):
        x = a.generate(_prompt(), max_new_tokens=200, chat=False, ignore_eos=True, **kw)
        y = b.generate(_prompt(), max_new_tokens=200, chat=False, ignore_eos=True, **kw)
        assert x.token_ids == y.token_ids


@pytest.mark.gpu
def test_fused_kernel_path_matches_reference(tiny):
    from koala.model import Transformer, causal_mask
    m = load_target(tiny[0], device="cuda", dtype=torch.float32).model
    m.setup_cache(1, 128)
    ids = torch.randint(3, 128, (1, 30), device="cuda")
    s = torch.arange(30, device="cuda")
    outs = []
    for on in (False, True):
        Transformer.use_kernels(on)
        with torch.no_grad():
            outs.append(m(ids, s[None], s, causal_mask(s, 64))[0])
    Transformer.use_kernels(False)
    assert (outs[0] - outs[1]).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("draft", [None, "eagle"])
def test_warmup_leaves_no_graph_to_capture(tiny_long, draft):
    """After warmup, generations that cross every window boundary capture no new CUDA graph."""
    from koala.heads import DraftConfig
    kw = dict(device="cuda", dtype=torch.float32, max_seq_len=1024)
    if draft:
        kw["draft"] = DraftConfig(kind=draft, layers=1)
    gen = SpeculativeGenerator.from_pretrained(tiny_long, **kw)
    gen.warmup([0.0, 0.8])
    graphs = (set(gen.plain.graphs), set(gen.spec.graphs) if gen.spec else set())
    # 3 windows x greedy/sampling, of the decoder this generator uses (with a head, only the drafter's)
    assert len(graphs[1] if gen.spec else graphs[0]) == 6
    for n in (5, 240, 500):                       # decoding crosses 256 and 512
        for T in (0.0, 0.8):
            gen.generate([7] * n, max_new_tokens=100, ignore_eos=True, temperature=T, seed=1)
    assert (set(gen.plain.graphs), set(gen.spec.graphs) if gen.spec else set()) == graphs
