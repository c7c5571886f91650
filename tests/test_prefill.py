"""The graphed prefill (koala/prefill.py): a prompt padded to its bucket gives the eager prefill's
logits, hidden states and caches for the real rows, and generation through it is unchanged.
On the CPU the padded forward runs eagerly (graphs=False); the CUDA tests replay the graphs."""
import pytest
import torch

from koala import SpeculativeGenerator, load_target
from koala.heads import DraftConfig
from koala.model import causal_mask
from koala.prefill import PrefillGraphs
from tests.helpers import make_hf_checkpoint

PROMPTS = [" ".join(f"w{i}" for i in range(5, 5 + n)) for n in (1, 4, 30, 31, 32, 33, 70)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("prefill"), "llama", seed=11)
    return load_target(path, device="cpu")


def _eagle(lt, seed=0):
    torch.manual_seed(seed)
    head = DraftConfig(kind="eagle", layers=2).build(lt)
    with torch.no_grad():                      # an untrained head's layers add nothing: jitter them
        for p in head.layers.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return head


def _eager_prefill(gen, ids):
    """The eager path's results: last logits, hidden, every cache's first len(ids) slots."""
    model, n = gen.model, len(ids)
    s = torch.arange(n, device=model.device)
    logits, hidden = model(torch.tensor([ids], device=model.device), s[None], s,
                           causal_mask(s, gen.plain.window(n - 1)), logits_index=s[-1:])
    return logits[:, -1].clone(), hidden.clone(), _caches(model, n)


def _caches(stack, n):
    return [(l.attention.kv_cache.k[..., :n, :].clone(), l.attention.kv_cache.v[..., :n, :].clone())
            for l in stack.layers]


def _close(a, b):
    # the same products over more rows: equal up to the reduction order of a longer GEMM
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"n{len(p.split())}")
def test_padded_prefill_matches_the_eager_one(tiny, prompt):
    head = _eagle(tiny)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=3)
    ids = gen.encode(prompt, chat=False)
    n = len(ids)
    with torch.inference_mode():
        lg0, h0, kv0 = _eager_prefill(gen, ids)
        if n > 1:                               # the eager head pass over the prompt
            p = torch.arange(n - 1)
            head.prime(torch.tensor([ids[1:]]), h0[:, : n - 1], p[None], p, causal_mask(p, gen.spec.window(n)))
        hk0 = _caches(head, n - 1)
        for stack in (gen.model, head):         # stale entries must not leak into the real rows
            for l in stack.layers:
                l.attention.kv_cache.k.normal_(); l.attention.kv_cache.v.normal_()
        pg = PrefillGraphs(gen.model, gen.plain.window, head, graphs=False)
        lg, h = pg.run(ids)
    assert h.shape[1] == pg.bucket(n) >= n and pg.bucket(n) in (32, 64, 128)
    _close(lg, lg0)
    _close(h[:, :n], h0)
    for (k, v), (k0, v0) in zip(_caches(gen.model, n), kv0):
        _close(k, k0); _close(v, v0)
    for (k, v), (k0, v0) in zip(_caches(head, n - 1), hk0):
        _close(k, k0); _close(v, v0)


def test_a_prompt_past_the_buckets_is_left_to_the_eager_path(tiny):
    gen = SpeculativeGenerator(tiny, None, max_seq_len=256)
    pg = PrefillGraphs(gen.model, gen.plain.window, graphs=False)
    assert pg.buckets == [32, 64, 128, 256]       # none past the cache
    pg.buckets = [32]
    assert pg.run(list(range(3, 36))) is None and pg.run(list(range(3, 35))) is not None


def test_a_cache_shorter_than_every_bucket_captures_nothing(tiny):
    model = tiny.model
    model.setup_cache(1, 16)
    try:
        pg = PrefillGraphs(model, lambda last: 16)            # graphs on, but no bucket fits
        assert pg.buckets == [] and pg.run([3, 4, 5]) is None
        pg.capture_all(16)                                    # warm-up: nothing to capture
        pg.capture_all()
        assert pg.graphs == {}
    finally:
        model.setup_cache(1, 256)


@pytest.mark.parametrize("kind", ["plain", "medusa", "eagle"])
def test_generation_through_the_padded_prefill_is_unchanged(tiny, kind):
    head = None if kind == "plain" else (_eagle(tiny, 2) if kind == "eagle" else
                                         DraftConfig(kind="medusa", layers=2).build(tiny))
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=3)
    assert gen.prefill_graphs is None             # the CPU keeps the eager prefill
    ref = [gen.generate(p, max_new_tokens=20, chat=False, ignore_eos=True) for p in PROMPTS]
    gen.prefill_graphs = PrefillGraphs(gen.model, gen.plain.window, head if kind == "eagle" else None,
                                       graphs=False)
    got = [gen.generate(p, max_new_tokens=20, chat=False, ignore_eos=True) for p in PROMPTS]
    for r, g in zip(ref, got):
        assert g.token_ids == r.token_ids
        if kind != "plain":                       # the same drafts: the head's cache is the same
            assert g.stats.accepted_per_step == r.stats.accepted_per_step


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["plain", "medusa", "eagle"])
def test_cuda_graph_prefill_equals_plain_and_eager(kind, tmp_path, monkeypatch):
    """On CUDA the generator replays prefill graphs; speculative output equals plain output,
    and the replayed prefill gives the eager padded forward's logits."""
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=11)
    lt = load_target(path, device="cuda", dtype=torch.float32)
    plain = SpeculativeGenerator(lt, None, max_seq_len=256)
    head = None if kind == "plain" else (_eagle(lt, 2) if kind == "eagle" else
                                         DraftConfig(kind="medusa", layers=2).build(lt))
    gen = SpeculativeGenerator(lt, head, max_seq_len=256, mode="chain", depth=3) if head else plain
    assert gen.prefill_graphs is not None and gen.prefill_graphs.use_graphs
    for p in PROMPTS:
        ref = plain.generate(p, max_new_tokens=24, chat=False, ignore_eos=True)
        res = gen.generate(p, max_new_tokens=24, chat=False, ignore_eos=True)
        assert res.token_ids == ref.token_ids, p
    assert sorted(gen.prefill_graphs.graphs) == [32, 64, 128]
    ids = gen.encode(PROMPTS[3], chat=False)
    eager = PrefillGraphs(gen.model, gen.plain.window, gen.prefill_graphs.head, graphs=False)
    with torch.inference_mode():
        lg0 = eager.run(ids)[0].clone()
        lg = gen.prefill_graphs.run(ids)[0]
    torch.testing.assert_close(lg, lg0, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("KOALA_PREFILL_GRAPHS", "0")
    assert SpeculativeGenerator(lt, None, max_seq_len=256).prefill_graphs is None
