"""Speculative decoding is lossless: greedy output equals plain greedy decoding for any head in
chain and tree modes, and sampled output is distributed as the target's."""
import numpy as np
import pytest
import torch

from koala import KoalaError, SpeculativeGenerator, load_target
from koala.heads import DraftConfig, EagleHead, MedusaHead
from tests.helpers import logits_and_caches, make_hf_checkpoint

PROMPT = " ".join(f"w{i}" for i in range(5, 13))
MODES = [("medusa", dict(mode="chain")), ("medusa", dict(mode="tree", tree_size=12, top_k=3)),
         ("eagle", dict(mode="chain", depth=4)), ("eagle", dict(mode="tree", depth=4, tree_size=12, top_k=3))]
IDS = ["medusa-chain", "medusa-tree", "eagle-chain", "eagle-tree"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("spec"), "llama", seed=3)
    return load_target(path, device="cpu")


def _corrupt(pos, V):  # a deterministic wrong guess at every third position
    return (pos * 7919) % 3 == 0


class OracleMedusa(MedusaHead):
    """Knows the target's greedy continuation: head i proposes the true token at L+1+i, except at
    corrupted positions. It reads L from the decoder (test only)."""

    def bind(self, ref, dec):
        self.ref, self.dec = torch.tensor(ref), dec
        return self

    def forward(self, hidden):
        H, V = self.config.n_heads, self.target_config.vocab_size
        L = self.dec.L
        pos = L + 1 + torch.arange(H, device=L.device)
        tok = self.ref[pos.clamp_max(len(self.ref) - 1)]
        tok = torch.where(_corrupt(pos, V), (tok + 1) % V, tok)
        return torch.nn.functional.one_hot(tok, V).float().mul(8.0).view(H, 1, 1, V)


class OracleEagle(EagleHead):
    """Input at position t proposes x_{t+2} (the true one, except at corrupted positions)."""

    def bind(self, ref):
        self.ref = torch.tensor(ref)
        return self

    def forward(self, tokens, features, positions=None, slots=None, mask=None):
        V = self.target_config.vocab_size
        pos = positions + 2
        tok = self.ref[pos.clamp_max(len(self.ref) - 1)]
        tok = torch.where(_corrupt(pos, V), (tok + 1) % V, tok)
        return torch.nn.functional.one_hot(tok, V).float().mul(8.0), features


def _reference(tiny, n):
    plain = SpeculativeGenerator(tiny, None, max_seq_len=256)
    return plain, plain.generate(PROMPT, max_new_tokens=n, chat=False, ignore_eos=True)


@pytest.mark.parametrize("kind,opts", MODES, ids=IDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_greedy_equals_plain_untrained_head(tiny, kind, opts, layers):
    plain, ref = _reference(tiny, 48)
    torch.manual_seed(layers)
    head = DraftConfig(kind=kind, layers=layers).build(tiny)
    if kind == "medusa":  # an untrained Medusa head is the identity; perturb it so it drafts junk
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 0.05)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, **opts)
    res = gen.generate(PROMPT, max_new_tokens=48, chat=False, ignore_eos=True)
    assert res.token_ids == ref.token_ids
    assert res.stats.target_forwards == len(res.stats.accepted_per_step)


@pytest.mark.parametrize("kind,opts", MODES, ids=IDS)
def test_greedy_equals_plain_with_long_acceptances(tiny, kind, opts):
    plain, ref = _reference(tiny, 80)
    full = plain.encode(PROMPT, chat=False) + ref.token_ids
    cls = OracleMedusa if kind == "medusa" else OracleEagle
    head = cls(DraftConfig(kind=kind), tiny.model, "tiny")
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, **opts)
    head.bind(full, gen.spec) if kind == "medusa" else head.bind(full)
    res = gen.generate(PROMPT, max_new_tokens=80, chat=False, ignore_eos=True)
    assert res.token_ids == ref.token_ids
    assert res.stats.tau > 1.8, res.stats.tau           # the accept path really was exercised
    assert max(res.stats.accepted_per_step) >= 2
    if opts["mode"] == "chain":
        assert len(res.stats.alpha) == 3 and 0 < res.stats.alpha[0] <= 1


def test_eos_inside_an_accepted_run_stops_there(tiny):
    plain, ref = _reference(tiny, 40)
    full = plain.encode(PROMPT, chat=False) + ref.token_ids
    head = OracleEagle(DraftConfig(kind="eagle"), tiny.model, "tiny").bind(full)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=4)
    eos = tiny.model.config.eos_token_ids[:]
    tiny.model.config.eos_token_ids[:] = [ref.token_ids[10]]
    try:
        res = gen.generate(PROMPT, max_new_tokens=40, chat=False)
    finally:
        tiny.model.config.eos_token_ids[:] = eos
    assert res.token_ids == ref.token_ids[:ref.token_ids.index(ref.token_ids[10]) + 1]


def _oracle_gen(tiny, kind, opts, n, **kw):
    plain, ref = _reference(tiny, n)
    full = plain.encode(PROMPT, chat=False) + ref.token_ids
    cls = OracleMedusa if kind == "medusa" else OracleEagle
    head = cls(DraftConfig(kind=kind), tiny.model, "tiny")
    gen = SpeculativeGenerator(tiny, head, **{"max_seq_len": 256, **opts, **kw})
    head.bind(full, gen.spec) if kind == "medusa" else head.bind(full)
    return gen, ref


def _count_runs(monkeypatch):
    from koala import speculative
    calls = []
    real = speculative.SpeculativeDecoder._run

    def spy(self, W, ev=None):
        calls.append(W)
        return real(self, W, ev)
    monkeypatch.setattr(speculative.SpeculativeDecoder, "_run", spy)
    return calls


@pytest.mark.parametrize("kind,opts", MODES, ids=IDS)
def test_pipelined_loop_equals_one_at_a_time(tiny, kind, opts, monkeypatch):
    """Queuing the next iteration before reading the last changes no token, no statistic, for
    greedy and seeded sampling; when the answer ends by length nothing is queued in vain."""
    calls = _count_runs(monkeypatch)
    results = {}
    for pipe in (False, True):
        gen, ref = _oracle_gen(tiny, kind, opts, 60, pipeline=pipe)
        assert gen.spec.pipeline is pipe
        for T in (0.0, 0.9):
            calls.clear()
            r = gen.generate(PROMPT, max_new_tokens=60, chat=False, ignore_eos=True, temperature=T, seed=4)
            assert len(calls) == r.stats.target_forwards
            results[pipe, T] = (r.token_ids, r.stats.accepted_per_step)
            if T == 0.0:
                assert r.token_ids == ref.token_ids and r.stats.tau > 1.8
    assert results[False, 0.0] == results[True, 0.0] and results[False, 0.9] == results[True, 0.9]


def test_pipelined_loop_discards_the_iteration_after_an_eos(tiny, monkeypatch):
    calls = _count_runs(monkeypatch)
    eos = tiny.model.config.eos_token_ids[:]
    out = {}
    for pipe in (False, True):
        gen, ref = _oracle_gen(tiny, "eagle", dict(mode="chain", depth=4), 40, pipeline=pipe)
        tiny.model.config.eos_token_ids[:] = [ref.token_ids[10]]
        try:
            calls.clear()
            r = gen.generate(PROMPT, max_new_tokens=40, chat=False)
        finally:
            tiny.model.config.eos_token_ids[:] = eos
        assert r.token_ids == ref.token_ids[:ref.token_ids.index(ref.token_ids[10]) + 1]
        assert len(calls) == r.stats.target_forwards + (1 if pipe else 0)   # one queued iteration unused
        out[pipe] = r.stats.accepted_per_step
    assert out[False] == out[True]


def test_pipelined_loop_near_the_end_of_the_cache(tiny, monkeypatch):
    """With just enough cache for the answer, the loop stops queuing ahead where two iterations
    would not fit, and the answer is unchanged."""
    calls = _count_runs(monkeypatch)
    gen, ref = _oracle_gen(tiny, "eagle", dict(mode="chain", depth=4), 60, pipeline=True, max_seq_len=128)
    n = len(gen.encode(PROMPT, chat=False))
    plain = SpeculativeGenerator(tiny, None, max_seq_len=128)
    budget = 128 - n - max(gen.spec.max_new_per_step, plain.plain.chunk)   # the most both allow
    assert budget > 90
    r = gen.generate(PROMPT, max_new_tokens=budget, chat=False, ignore_eos=True)
    assert r.token_ids == plain.generate(PROMPT, max_new_tokens=budget, chat=False, ignore_eos=True).token_ids
    assert all(w <= 128 for w in calls)


def test_bad_draft_settings(tiny):
    head = DraftConfig(kind="medusa", n_heads=3).build(tiny)
    with pytest.raises(KoalaError, match="at most 3 tokens deep"):
        SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=5)
    with pytest.raises(KoalaError, match="mode"):
        SpeculativeGenerator(tiny, head, max_seq_len=256, mode="beam")
    eh = DraftConfig(kind="eagle").build(tiny)
    with pytest.raises(KoalaError, match="tree_size"):
        SpeculativeGenerator(tiny, eh, max_seq_len=256, mode="tree", depth=3, top_k=2, tree_size=60)
    with pytest.raises(KoalaError, match="tree_size"):
        SpeculativeGenerator(tiny, eh, max_seq_len=256, mode="tree", tree_size=1000)


# ---------------------------------------------------------------------------------------------
# sampling: the distribution of generated sequences is the target's

V_SMALL, NEW = 12, 3


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("small"), "llama", seed=5, vocab=V_SMALL, scale=6.0)
    return load_target(path, device="cpu")


def _exact_distribution(small, ids, temperature):
    """p(x1, x2, x3 | prompt) for all V^3 continuations, by enumeration."""
    m = small.model
    V = V_SMALL
    seqs = torch.cartesian_prod(*[torch.arange(V)] * (NEW - 1))                  # (V^2, 2)
    prefix = torch.tensor(ids).expand(len(seqs), -1)
    with torch.no_grad():
        lg, _ = m(torch.cat([prefix, seqs], 1))
    lp = torch.log_softmax(lg[:, len(ids) - 1:].double() / temperature, -1)     # (V^2, 3, V)
    x1, x2 = seqs[:, 0], seqs[:, 1]
    p12 = lp[:, 0].gather(1, x1[:, None])[:, 0] + lp[:, 1].gather(1, x2[:, None])[:, 0]  # (V^2,)
    joint = p12[:, None] + lp[:, 2]                                               # (V^2, V)
    return joint.exp().reshape(-1).numpy()


def _tv_test(gen, small, temperature=1.0, runs=1500):
    ids = gen.encode("w3 w5 w7", chat=False)
    exact = _exact_distribution(small, ids, temperature)
    counts = np.zeros(V_SMALL ** NEW)
    for seed in range(runs):
        t = gen.generate("w3 w5 w7", max_new_tokens=NEW, temperature=temperature, seed=seed, chat=False,
                         ignore_eos=True).token_ids
        counts[(t[0] * V_SMALL + t[1]) * V_SMALL + t[2]] += 1
    tv = 0.5 * np.abs(counts / runs - exact).sum()
    rng = np.random.default_rng(0)
    null = [0.5 * np.abs(rng.multinomial(runs, exact / exact.sum()) / runs - exact).sum() for _ in range(300)]
    return tv, float(np.quantile(null, 0.999))


class SkewedMedusa(MedusaHead):
    """A draft that disagrees with the target: fixed random logits (so q != p everywhere)."""

    def forward(self, hidden):
        g = torch.Generator().manual_seed(11)
        H, V = self.config.n_heads, self.target_config.vocab_size
        return (torch.randn(H, V, generator=g) * 2).view(H, 1, 1, V).to(hidden.dtype)


@pytest.mark.parametrize("kind,opts", [("medusa", dict(mode="chain", depth=3)),
                                       ("medusa", dict(mode="chain", depth=1)),   # fewer than its 3 heads
                                       ("eagle", dict(mode="chain", depth=3)),
                                       ("eagle", dict(mode="tree", depth=3, tree_size=8, top_k=3))],
                         ids=["medusa-chain", "medusa-chain-depth1", "eagle-chain", "eagle-tree"])
def test_sampled_sequences_follow_the_target(small, kind, opts):
    torch.manual_seed(0)
    if kind == "medusa":
        head = SkewedMedusa(DraftConfig(kind="medusa", n_heads=3), small.model, "small")
    else:
        head = DraftConfig(kind="eagle").build(small)
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 0.3)
    gen = SpeculativeGenerator(small, head, max_seq_len=64, **opts)
    tv, bound = _tv_test(gen, small)
    assert tv < bound, (tv, bound)


def test_distribution_test_detects_a_lossy_verifier(small, monkeypatch):
    """The same statistic rejects a verifier that accepts every draft (so the test can fail)."""
    from koala import speculative
    head = SkewedMedusa(DraftConfig(kind="medusa", n_heads=3), small.model, "small")
    gen = SpeculativeGenerator(small, head, max_seq_len=64, mode="chain", depth=3)
    monkeypatch.setattr(speculative.SpeculativeDecoder, "_accept_sampling",
                        lambda self, t, logits: (torch.tensor(self.N - 1), t["tokens"][-1]))
    tv, bound = _tv_test(gen, small, runs=600)
    assert tv > bound


def test_seeded_sampling_repeats(tiny):
    head = DraftConfig(kind="eagle").build(tiny)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="tree", depth=3, tree_size=8, top_k=2)
    kw = dict(max_new_tokens=30, temperature=0.9, top_p=0.95, chat=False, ignore_eos=True)
    a, b, c = (gen.generate(PROMPT, seed=s, **kw).token_ids for s in (1, 1, 2))
    assert a == b and a != c


def _cuda_oracle_run(kind, opts, dtype, tmp_path):
    """Plain decoding and an oracle head's speculative decoding of the same 60 tokens on the GPU
    (tiny target, CUDA graphs): returns the generator, its result and plain decoding's."""
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3)
    lt = load_target(path, device="cuda", dtype=dtype)
    plain = SpeculativeGenerator(lt, None, max_seq_len=256)
    ref = plain.generate(PROMPT, max_new_tokens=60, chat=False, ignore_eos=True)
    full = plain.encode(PROMPT, chat=False) + ref.token_ids
    head = (OracleMedusa if kind == "medusa" else OracleEagle)(DraftConfig(kind=kind), lt.model, "tiny")
    gen = SpeculativeGenerator(lt, head, max_seq_len=256, **opts)
    head.ref = torch.tensor(full, device="cuda")
    if kind == "medusa":
        head.dec = gen.spec
    return gen, gen.generate(PROMPT, max_new_tokens=60, chat=False, ignore_eos=True), ref


@pytest.mark.gpu
@pytest.mark.parametrize("kind,opts,fused_tree", [(k, o, False) for k, o in MODES]
                         + [(k, o, True) for k, o in MODES if o["mode"] == "tree"],
                         ids=IDS + ["medusa-tree-fused", "eagle-tree-fused"])
def test_cuda_graph_iterations_equal_plain(kind, opts, fused_tree, tmp_path, monkeypatch):
    """fused_tree: KOALA_FUSED_TREE=1 (opt-in), greedy trees rank with kernels/topk.py and EAGLE
    trees keep their pool and rerank with kernels/tree_draft.py, captured in the graphs."""
    import kernels.tree_draft as TD
    import koala.speculative as S
    monkeypatch.setattr(S, "_FUSED_TREE", fused_tree)
    calls = []
    real = TD.tree_select
    monkeypatch.setattr(TD, "tree_select", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen, res, ref = _cuda_oracle_run(kind, opts, torch.float32, tmp_path)
    assert gen.spec.use_graph and res.token_ids == ref.token_ids and res.stats.tau > 1.8
    assert res.stats.draft_s is not None and res.stats.verify_s > 0
    assert bool(calls) == (fused_tree and kind == "eagle")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_cuda_sampled_chains_follow_the_target(kind, tmp_path, monkeypatch):
    """The distribution test on the GPU: CUDA graphs, the fused path, and chain acceptance by
    kernels/spec_sample.py (a spy counts its calls)."""
    import kernels.spec_sample as ss
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=5, vocab=V_SMALL, scale=6.0)
    cpu, lt = load_target(path, device="cpu"), load_target(path, device="cuda", dtype=torch.float32)
    torch.manual_seed(0)
    head = DraftConfig(kind=kind, **({"n_heads": 3} if kind == "medusa" else {})).build(lt)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    calls = []
    real = ss.accept_sampling_chain
    monkeypatch.setattr(ss, "accept_sampling_chain", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = SpeculativeGenerator(lt, head, max_seq_len=64, mode="chain", depth=2)
    tv, bound = _tv_test(gen, cpu)
    assert calls and gen.spec.use_graph and gen.spec.chain   # captured into the sampling graphs
    assert tv < bound, (tv, bound)


@pytest.mark.gpu
def test_fused_medusa_draft_matches_module(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3)
    lt = load_target(path, device="cuda", dtype=torch.float32)
    head = DraftConfig(kind="medusa", layers=3).build(lt)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.05)
    gen = SpeculativeGenerator(lt, head, max_seq_len=256, mode="chain")
    spec = gen.spec
    spec.h_prev.normal_()
    fused = spec._medusa_logits()
    ref = head(spec.h_prev.view(1, 1, -1))[:, 0, 0]
    assert (fused - ref).abs().max().item() < 1e-3


@pytest.mark.gpu
def test_exact_mode_rows_are_batch_invariant_in_bf16(tmp_path):
    """In exact mode a token's bf16 logits do not depend on how many tokens share the forward."""
    from koala.model import Transformer, causal_mask
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3)
    m = load_target(path, device="cuda", dtype=torch.bfloat16).model
    m.setup_cache(1, 128)
    Transformer.use_kernels(True, exact=True)
    try:
        ids = torch.randint(3, 128, (1, 40), device="cuda")
        with torch.no_grad():
            s = torch.arange(30, device="cuda")
            m(ids[:, :30], s[None], s, causal_mask(s, 64))
            s = torch.arange(30, 40, device="cuda")
            many, _ = m(ids[:, 30:], s[None], s, causal_mask(s, 64))       # 10 tokens at once
            one, _ = m(ids[:, 30:31], s[None, :1], s[:1], causal_mask(s[:1], 64))
        assert torch.equal(many[0, 0], one[0, 0])
    finally:
        Transformer.use_kernels(False)


@pytest.mark.gpu
@pytest.mark.parametrize("switch,dtype", [("fused_rope", torch.bfloat16), ("rope_attn", torch.bfloat16),
                                          ("rope_attn", torch.float32)],
                         ids=["fused-rope-bf16", "rope-attn-bf16", "rope-attn-fp32"])
def test_one_launch_fewer_is_bitwise_the_rope_launch(switch, dtype, tmp_path, monkeypatch):
    """Two ways of dropping a layer's RoPE launch give the model's logits and caches of that
    launch bit for bit, at prefill, verify and decode sizes, in exact mode: KOALA_FUSED_ROPE
    (_Fast.fused_rope: the q|k|v projection, RoPE and the cache write in one launch) and
    KOALA_ROPE_ATTN (_Fast.rope_attn: RoPE and the cache write inside the attention launch).
    Exact trees rely on the latter: with it their verify keeps the RoPE launch while plain
    decoding steps do not."""
    from koala.model import Transformer, _Fast
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3)
    m = load_target(path, device="cuda", dtype=dtype).model
    m.setup_cache(1, 128)
    ids = torch.randint(3, 128, (1, 40), device="cuda")
    Transformer.use_kernels(True, exact=True)
    outs = []
    try:
        for on in (False, True):
            monkeypatch.setattr(_Fast, switch, on)
            outs.append(logits_and_caches(m, ids, ((0, 30), (30, 35), (35, 36)), 64))
    finally:
        Transformer.use_kernels(False)
    assert all(torch.equal(u, f) for u, f in zip(*outs))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rope_attn", [(torch.bfloat16, False), (torch.bfloat16, True),
                                             (torch.float32, False)],
                         ids=["bf16", "bf16-rope-attn", "fp32"])
def test_combine_in_the_output_projection_is_bitwise_the_combine_launch(dtype, rope_attn, tmp_path,
                                                                      monkeypatch):
    """KOALA_OPROJ_COMBINE (_Fast.oproj_combine: the split attention's combine in the output
    projection's prologue, kernels.linear.linear_combine) gives the logits and caches of the
    combine launch bit for bit, in exact mode, at prefill, verify and decode sizes over a
    300-token context (a 512-slot window: 4 splits), RoPE in its own launch or in the attention's."""
    from kernels import linear as L
    from koala.model import Transformer, _Fast
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3, max_positions=1024)
    m = load_target(path, device="cuda", dtype=dtype).model
    m.setup_cache(1, 1024)
    ids = torch.randint(3, 128, (1, 306), device="cuda")
    monkeypatch.setattr(_Fast, "rope_attn", rope_attn)
    Transformer.use_kernels(True, exact=True)
    outs = []
    calls, real = [], L.linear_combine
    monkeypatch.setattr(L, "linear_combine", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        for on in (False, True):
            monkeypatch.setattr(_Fast, "oproj_combine", on)
            calls.clear()
            outs.append(logits_and_caches(m, ids, ((0, 300), (300, 305), (305, 306)), 512))
            assert bool(calls) == on
    finally:
        Transformer.use_kernels(False)
    assert all(torch.equal(u, f) for u, f in zip(*outs))


@pytest.mark.gpu
@pytest.mark.parametrize("fused_rope", [False, True], ids=["rope-apart", "rope-fused"])
@pytest.mark.parametrize("kind,opts", [MODES[0], MODES[2]], ids=["medusa-chain", "eagle-chain"])
def test_bf16_greedy_equals_plain_in_exact_mode(kind, opts, fused_rope, tmp_path, monkeypatch):
    """Chains only: a tree's nodes sit in other cache slots than plainly decoded tokens, so its
    bf16 attention sums keys in another order (exact in fp32, see the tests above). With the
    q|k|v projection and RoPE in one launch (KOALA_FUSED_ROPE) as without."""
    from koala.model import _Fast
    monkeypatch.setattr(_Fast, "fused_rope", fused_rope)
    _, res, ref = _cuda_oracle_run(kind, opts, torch.bfloat16, tmp_path)
    assert res.token_ids == ref.token_ids and res.stats.tau > 1.8


@pytest.mark.gpu
@pytest.mark.parametrize("kind,opts", [MODES[0], MODES[2]], ids=["medusa-chain", "eagle-chain"])
def test_bf16_exact_mode_across_window_boundaries(kind, opts, tmp_path):
    """Exact mode across attention windows: the plain step and the speculative verify pick their
    windows (256, 512, ... slots) from different lengths, so around 256 they attend over windows
    of different sizes; a query's result must not depend on that (kernels/tree_attention.py:
    the combine sums the splits in split order). MT-bench at f13d795 found 4% of turns differing before the fix."""
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3, max_positions=1024)
    lt = load_target(path, device="cuda", dtype=torch.bfloat16)
    plain = SpeculativeGenerator(lt, None, max_seq_len=1024)
    n = len(plain.encode(PROMPT, chat=False))
    prompt = " ".join([PROMPT] * (1 + 200 // n))                       # ~200 tokens: 256 is crossed
    assert 200 <= len(plain.encode(prompt, chat=False)) < 256
    ref = plain.generate(prompt, max_new_tokens=120, chat=False, ignore_eos=True)
    head = (OracleMedusa if kind == "medusa" else OracleEagle)(DraftConfig(kind=kind), lt.model, "tiny")
    gen = SpeculativeGenerator(lt, head, max_seq_len=1024, **opts)
    head.ref = torch.tensor(plain.encode(prompt, chat=False) + ref.token_ids, device="cuda")
    if kind == "medusa":
        head.dec = gen.spec
    res = gen.generate(prompt, max_new_tokens=120, chat=False, ignore_eos=True)
    assert res.token_ids == ref.token_ids and res.stats.tau > 1.8


@pytest.mark.gpu
@pytest.mark.parametrize("kind,opts", MODES, ids=IDS)
def test_cuda_graphs_switch_between_greedy_and_sampling(kind, opts, tmp_path):
    """One generator, greedy then sampled then greedy again: each call must replay graphs of its
    own kind (they were keyed by window only, so a sampled call after a greedy one replayed the
    greedy graphs)."""
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3)
    lt = load_target(path, device="cuda", dtype=torch.float32)
    torch.manual_seed(0)
    head = DraftConfig(kind=kind, layers=1).build(lt)
    plain = SpeculativeGenerator(lt, None, max_seq_len=256)
    ref = plain.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True).token_ids
    gen = SpeculativeGenerator(lt, head, max_seq_len=256, **opts)
    assert gen.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True).token_ids == ref
    sampled = gen.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True, temperature=1.0, seed=7)
    fresh = SpeculativeGenerator(lt, head, max_seq_len=256, **opts)
    again = fresh.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True, temperature=1.0, seed=7)
    assert sampled.token_ids == again.token_ids                       # sampled, not a greedy replay
    assert gen.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True).token_ids == ref


@pytest.mark.gpu
@pytest.mark.parametrize("kind,opts", [MODES[0], MODES[2]], ids=["medusa-chain", "eagle-chain"])
def test_cuda_graphs_switch_between_plain_and_truncated_sampling(kind, opts, tmp_path):
    """Temperature alone and top-p trace different warps (one softmax, or a sort): a call must
    replay the graphs of its own settings, for the plain decoder and the speculative one."""
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3)
    lt = load_target(path, device="cuda", dtype=torch.float32)
    torch.manual_seed(0)
    head = DraftConfig(kind=kind, layers=1).build(lt)
    for h in (None, head):
        gen = SpeculativeGenerator(lt, h, max_seq_len=256, **({} if h is None else opts))
        run = lambda g, **kw: g.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True,  # noqa: E731
                                         temperature=1.0, seed=7, **kw).token_ids
        first, cut = run(gen), run(gen, top_p=0.5)
        assert run(gen) == first                                      # not the top-p graphs
        fresh = SpeculativeGenerator(lt, h, max_seq_len=256, **({} if h is None else opts))
        assert run(fresh, top_p=0.5) == cut and cut != first


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_cuda_new_architectures_chain_equals_plain_in_bf16(arch, tmp_path):
    """Qwen3 (its q/k norms inside the RoPE launch) and Phi-3 on the CUDA path: bf16, fused
    kernels, exact mode, CUDA graphs. A real EAGLE head's chain gives plain greedy output, and
    the fused forward's logits stay as close to the PyTorch path's as bf16 allows."""
    from koala.model import Transformer, causal_mask
    path, _ = make_hf_checkpoint(tmp_path, arch, seed=3)
    lt = load_target(path, device="cuda", dtype=torch.bfloat16)
    m = lt.model
    m.setup_cache(1, 64)
    ids = torch.randint(3, 128, (1, 12), device="cuda")
    s = torch.arange(12, device="cuda")
    with torch.no_grad():
        fused = m(ids, s[None], s, causal_mask(s, 64))[0].float()
        Transformer.use_kernels(False)
        try:
            ref = m(ids, s[None], s, causal_mask(s, 64))[0].float()
        finally:
            Transformer.use_kernels(True)
    assert (fused - ref).abs().max() < 0.05 * ref.abs().max() + 0.02
    plain = SpeculativeGenerator(lt, None, max_seq_len=256)
    want = plain.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True).token_ids
    torch.manual_seed(1)
    head = DraftConfig(kind="eagle", layers=2).build(lt)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.05)
    gen = SpeculativeGenerator(lt, head, max_seq_len=256, mode="chain", depth=2)
    res = gen.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True)
    assert gen.spec.use_graph and res.token_ids == want


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_cuda_exact_trees_equal_plain_in_bf16(kind, tmp_path):
    """exact_trees on the CUDA path (bf16, fused kernels, exact mode, CUDA graphs): a tree of
    random-head drafts gives plain greedy decoding's tokens, as chains do (without it, bf16
    trees may part from plain decoding after a near-tie)."""
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3, max_positions=1024)
    lt = load_target(path, device="cuda", dtype=torch.bfloat16)
    plain = SpeculativeGenerator(lt, None, max_seq_len=512)
    want = plain.generate(PROMPT, max_new_tokens=200, chat=False, ignore_eos=True).token_ids
    torch.manual_seed(1)
    head = DraftConfig(kind=kind, layers=2).build(lt)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.05)
    gen = SpeculativeGenerator(lt, head, max_seq_len=512, mode="tree", depth=4, tree_size=16, top_k=4,
                               exact_trees=True)
    res = gen.generate(PROMPT, max_new_tokens=200, chat=False, ignore_eos=True)
    assert gen.spec.use_graph and gen.spec.exact_trees and res.token_ids == want


def test_exact_trees_refuse_the_fused_combine(tiny, monkeypatch):
    monkeypatch.setenv("KOALA_FUSED_COMBINE", "1")
    head = DraftConfig(kind="medusa").build(tiny)
    with pytest.raises(KoalaError, match="KOALA_FUSED_COMBINE"):
        SpeculativeGenerator(tiny, head, max_seq_len=128, mode="tree", exact_trees=True)
    monkeypatch.setenv("KOALA_EXACT_TREES", "1")
    monkeypatch.setenv("KOALA_FUSED_COMBINE", "0")
    assert SpeculativeGenerator(tiny, head, max_seq_len=128, mode="tree").spec.exact_trees
