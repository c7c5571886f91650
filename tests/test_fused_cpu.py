"""The fused Triton decode path end to end on the CPU, through Triton's interpreter: the kernels
koala runs on a GPU (norm + GEMV, q|k|v + RoPE + cache, attention, argmax, greedy acceptance and
KV compaction), in exact mode, give bf16 speculative greedy output equal to plain greedy output
with the same kernels, for real (random) heads and for oracle heads that get most drafts
accepted. On a GPU these run as the -m gpu tests of test_speculative.py instead."""
import pytest
import torch

from kernels import linear as L
from kernels._common import interpreting
from koala import SpeculativeGenerator, load_target
from koala.heads import DraftConfig
from koala.model import Transformer, _Fast
from tests.helpers import logits_and_caches, make_hf_checkpoint
from tests.test_speculative import PROMPT, OracleEagle, OracleMedusa

pytestmark = pytest.mark.skipif(not interpreting() or torch.cuda.is_available(),
                                reason="the fused path on CPU tensors needs TRITON_INTERPRET=1 (no GPU)")
N_NEW = 12


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("fused"), "llama", seed=3)
    return load_target(path, device="cpu", dtype=torch.bfloat16)


# The interpreter runs each program of a launch in turn (~30 ms each), so the tiny model's
# products take one GEMV tile of 32 output columns (exact mode's tiles file, KOALA_EXACT_TILES's
# mechanism) instead of the H100's one or two: a few programs a launch, 0.4 s a decode step.
TINY_TILES = {(128, 64, False): L.LinearConfig(False, 1, 32, 64, 4, 1, 1),    # q|k|v, LM head
              (64, 64, False): L.LinearConfig(False, 1, 32, 64, 4, 1, 1),     # wo
              (96, 64, True): L.LinearConfig(False, 1, 32, 64, 4, 1, 1),      # gate|up
              (64, 96, False): L.LinearConfig(False, 1, 32, 128, 4, 1, 1)}    # w2


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setattr(_Fast, "tiles", TINY_TILES)
    Transformer.use_kernels(True, exact=True, cpu=True)
    yield monkeypatch
    Transformer.use_kernels(False)


def _plain(lt):
    plain = SpeculativeGenerator(lt, None, max_seq_len=128)
    return plain.generate(PROMPT, max_new_tokens=N_NEW, chat=False, ignore_eos=True).token_ids, plain


# the row-tile path (KOALA_ROW_TILE's): two rows in one tile, the plain step included
TINY_ROW_TILES = {k: L.LinearConfig(False, 2, c.BLOCK_N, c.BLOCK_K, 4, 1, 1, True) for k, c in TINY_TILES.items()}


@pytest.mark.parametrize("kind,opts,fused_rope,rope_attn,real,tiles", [
    ("medusa", dict(mode="chain"), True, False, False, TINY_TILES),
    ("eagle", dict(mode="chain", depth=3), False, True, False, TINY_TILES),
    ("eagle", dict(mode="chain", depth=2), True, False, True, TINY_TILES),
    ("eagle", dict(mode="chain", depth=2, draft_exact=True), False, False, True, TINY_TILES),
    ("eagle", dict(mode="chain", depth=3), False, False, False, TINY_ROW_TILES),
    ("eagle", dict(mode="tree", depth=3, tree_size=7, top_k=2, exact_trees=True), False, True, False, TINY_TILES)],
    ids=["medusa-oracle", "eagle-oracle-rope-in-attention", "eagle-real-rope-fused", "eagle-real-draft-exact",
         "eagle-oracle-row-tiles",
         "eagle-oracle-exact-tree-rope-in-attention"])
def test_fused_bf16_greedy_equals_plain(tiny_bf16, fused, kind, opts, fused_rope, rope_attn, real, tiles):
    """An oracle head gets most drafts accepted (the accept and compaction kernels take long
    paths); a real head of two random layers runs its own layers through the kernels too.
    rope_attn: RoPE inside the attention launch (rope_tree_attention, KOALA_ROPE_ATTN=1) or its
    own launch before it (the default). With exact trees and rope_attn the plain steps take the
    former and the tree verifies the latter (exact_tree_attention), so that case also checks that
    the two give the same bits."""
    fused.setattr(_Fast, "fused_rope", fused_rope)
    fused.setattr(_Fast, "rope_attn", rope_attn)
    fused.setattr(_Fast, "tiles", tiles)
    ref, plain = _plain(tiny_bf16)
    if real:
        torch.manual_seed(1)
        head = DraftConfig(kind=kind, layers=2).build(tiny_bf16)
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 0.05)
    else:
        head = (OracleMedusa if kind == "medusa" else OracleEagle)(DraftConfig(kind=kind), tiny_bf16.model, "tiny")
    gen = SpeculativeGenerator(tiny_bf16, head, max_seq_len=128, **opts)
    if not real:
        full = plain.encode(PROMPT, chat=False) + ref
        head.bind(full, gen.spec) if kind == "medusa" else head.bind(full)
    head_exact = []   # exact mode as each head forward saw it
    if real:
        feats = head._features
        fused.setattr(head, "_features", lambda *a: head_exact.append(_Fast.exact) or feats(*a))
    import kernels.tree_attention as TA
    exact_calls = _spy(fused, TA, "exact_tree_attention")
    rope_calls = _spy(fused, TA, "rope_tree_attention")
    res = gen.generate(PROMPT, max_new_tokens=N_NEW, chat=False, ignore_eos=True)
    assert res.token_ids == ref
    assert real or res.stats.tau > 1.8
    # exact trees verify through exact_tree_attention (one call a layer a verify), others never
    assert bool(exact_calls) == bool(opts.get("exact_trees"))
    # RoPE went into the attention launch, or never did (with fused_rope only the forwards that
    # skip the q|k|v+RoPE launch take it: the prompt's, which runs more rows than it serves)
    assert bool(rope_calls) == rope_attn
    # the chain's drafts run outside exact mode unless draft_exact=True (the prompt's pass never
    # runs in it)
    if real:
        assert head_exact and (True in head_exact) == opts.get("draft_exact", False)


def test_fused_combine_in_the_output_projection_is_bitwise_the_combine_launch(tiny_bf16, fused):
    """Past 128 slots the attention splits, and with _Fast.oproj_combine (KOALA_OPROJ_COMBINE=1) a one-row
    forward's combine runs in the output projection's prologue (kernels.linear.linear_combine):
    the model's logits at verify and decode sizes and its caches are those of the combine launch
    bit for bit (150 tokens in a 256-slot window: 2 splits)."""
    m = tiny_bf16.model
    m.setup_cache(1, 256)
    ids = torch.randint(3, 128, (1, 156), generator=torch.Generator().manual_seed(0))
    outs = []
    for on in (False, True):
        fused.setattr(_Fast, "oproj_combine", on)
        calls = _spy(fused, L, "linear_combine")
        outs.append(logits_and_caches(m, ids, ((0, 150), (150, 155), (155, 156)), 256))
        assert len(calls) == (2 if on else 0)              # the decode's 2 layers (one-row forwards)
    assert all(torch.equal(u, f) for u, f in zip(*outs))


SAMPLED = dict(max_new_tokens=6, chat=False, ignore_eos=True, temperature=0.9)


def _random_head_gen(lt, kind, opts, draft_vocab=None):
    """A generator with a one-layer head of small random weights (seeded); draft_vocab: its n
    most frequent tokens under random counts."""
    torch.manual_seed(2)
    head = DraftConfig(kind=kind, layers=1).build(lt)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.05)
    if draft_vocab is not None:
        head.token_counts = torch.randint(0, 1000, (lt.model.config.vocab_size,))
    return SpeculativeGenerator(lt, head, max_seq_len=128, draft_vocab=draft_vocab, **opts)


def _spy(monkeypatch, module, name):
    """Count the calls of module.name (the decoder imports it at call time, so it sees the spy)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("kind,opts", [("medusa", dict(mode="chain", depth=2)),
                                       ("eagle", dict(mode="chain", depth=2))], ids=["medusa", "eagle"])
def test_fused_sampled_chain_acceptance_is_the_pytorch_one(tiny_bf16, fused, kind, opts, monkeypatch):
    """Sampling along a chain accepts through kernels/spec_sample.py on the fused path: with the
    same seed (so the same uniforms and noise) it gives the tokens and acceptances of the
    PyTorch acceptance, which also serves trees and truncated sampling."""
    import kernels.spec_sample as ss
    gen = _random_head_gen(tiny_bf16, kind, opts)
    calls = _spy(monkeypatch, ss, "accept_sampling_chain")
    kw = SAMPLED
    got = [gen.generate(PROMPT, seed=s, **kw) for s in (0, 1)]
    assert gen.spec.chain and len(calls) == sum(len(r.stats.accepted_per_step) for r in got)
    gen.spec.chain = False                      # the PyTorch acceptance, _accept_sampling
    ref = [gen.generate(PROMPT, seed=s, **kw) for s in (0, 1)]
    assert len(calls) == sum(len(r.stats.accepted_per_step) for r in got)
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids and g.stats.accepted_per_step == r.stats.accepted_per_step
    assert got[0].token_ids != got[1].token_ids   # the seeds draw different answers


@pytest.mark.parametrize("kind,opts", [("medusa", dict(mode="chain", depth=2)),
                                       ("eagle", dict(mode="chain", depth=2))], ids=["medusa", "eagle"])
@pytest.mark.parametrize("draft_vocab", [None, 40], ids=["all", "vocab40"])
def test_sampled_chain_drafts_from_logits_as_from_probabilities(tiny_bf16, fused, kind, opts, draft_vocab,
                                                                monkeypatch):
    """A sampled chain on the fused path drafts by Gumbel-max over the draft logits and hands the
    acceptance kernel those logits (koala.speculative._SAMPLED_LOGITS). The draws are the same
    in law as the old form's argmax(log q + Gumbel) with q handed over as probabilities; with the
    same seed they are also the same draws here, acceptances included. A draft vocabulary: the
    kernel reads the logits over it through head.vocab_index, the old form q scattered onto V."""
    import kernels.argmax as am
    import kernels.spec_sample as ss
    import koala.speculative as ks
    gen = _random_head_gen(tiny_bf16, kind, opts, draft_vocab)
    assert gen.spec.head.draft_vocab_size == (draft_vocab or tiny_bf16.model.config.vocab_size)
    maps = []
    real = ss.accept_sampling_chain
    monkeypatch.setattr(ss, "accept_sampling_chain",
                        lambda *a, **k: maps.append(k.get("q_ids")) or real(*a, **k))
    calls = _spy(monkeypatch, am, "gumbel_argmax")
    kw = SAMPLED
    got = [gen.generate(PROMPT, seed=s, **kw) for s in (0, 1)]
    steps = sum(len(r.stats.accepted_per_step) for r in got)
    assert len(calls) == steps * (opts["depth"] if kind == "eagle" else 1)
    assert len(maps) == steps and all((m is None) == (draft_vocab is None) for m in maps)
    monkeypatch.setattr(ks, "_SAMPLED_LOGITS", False)
    ref = [gen.generate(PROMPT, seed=s, **kw) for s in (0, 1)]
    assert len(calls) == steps * (opts["depth"] if kind == "eagle" else 1)     # not called again
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids and g.stats.accepted_per_step == r.stats.accepted_per_step


def test_fused_cpu_path_is_the_kernels(tiny_bf16, fused):
    """The switch really routes CPU tensors through the kernels: the fused forward's logits are
    close to the PyTorch path's, not equal (other rounding), and use_kernels(cpu=True) refuses
    to run without the interpreter."""
    from koala.model import causal_mask
    m = tiny_bf16.model
    m.setup_cache(1, 64)
    ids = torch.randint(3, 128, (1, 12))
    s = torch.arange(12)
    with torch.no_grad():
        a = m(ids, s[None], s, causal_mask(s, 64))[0].float()
        Transformer.use_kernels(False)
        b = m(ids, s[None], s, causal_mask(s, 64))[0].float()
    assert (a - b).abs().max() < 0.25 and not torch.equal(a, b)


def test_use_kernels_cpu_needs_the_interpreter(monkeypatch):
    import kernels._common as C
    monkeypatch.setattr(C, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        Transformer.use_kernels(True, cpu=True)
    assert not _Fast.cpu


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("fused32"), "llama", seed=3)
    return load_target(path, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_fused_batch_rows_equal_each_prompt_alone(tiny_fp32, fused, kind):
    """generate_batch through the kernels (per-row masks of pad slots and rejected drafts, a
    (B, T, S) attention mask, B-row caches): in fp32 each row's tokens are those of the prompt
    decoded alone through the same kernels."""
    from tests.test_batch import PROMPTS
    torch.manual_seed(2)
    head = DraftConfig(kind=kind, layers=1).build(tiny_fp32)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    gen = SpeculativeGenerator(tiny_fp32, head, max_seq_len=128, mode="chain", depth=2)
    head_exact = []   # exact mode as each EAGLE head forward saw it
    if kind == "eagle":
        feats = head._features
        fused.setattr(head, "_features", lambda *a: head_exact.append(_Fast.exact) or feats(*a))
    res = gen.generate_batch(PROMPTS, max_new_tokens=N_NEW, chat=False, ignore_eos=True)
    # the batch's drafts ran outside exact mode (draft_exact's default), as the decoder's do
    assert kind != "eagle" or (head_exact and True not in head_exact)
    for p, r in zip(PROMPTS, res):
        one = gen.generate(p, max_new_tokens=N_NEW, chat=False, ignore_eos=True)
        assert r.token_ids == one.token_ids
        assert r.stats.accepted_per_step == one.stats.accepted_per_step


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("fused_qwen3"), "qwen3", seed=3)
    return load_target(path, device="cpu", dtype=torch.bfloat16)


def test_fused_qwen3_norms_q_and_k_in_the_rope_launch(tiny_qwen3, fused):
    """Qwen3's per-head q/k RMSNorm runs inside the RoPE + cache-write launch: the fused forward
    is as close to the PyTorch path as bf16 allows (and far from the same forward with the norm
    weights set to one), and an EAGLE head, whose layers are the target's kind and so norm their
    q and k too, gives plain greedy output."""
    from koala.model import causal_mask
    m = tiny_qwen3.model
    m.setup_cache(1, 64)
    ids = torch.randint(3, 128, (1, 12))
    s = torch.arange(12)

    def logits(kernels: bool):
        Transformer.use_kernels(kernels, cpu=kernels)
        with torch.no_grad():
            return m(ids, s[None], s, causal_mask(s, 64))[0].float()
    fused_out, ref = logits(True), logits(False)
    saved = [(l.attention.q_norm.weight.clone(), l.attention.k_norm.weight.clone()) for l in m.layers]
    with torch.no_grad():
        for l in m.layers:
            l.attention.q_norm.weight.fill_(1.0)
            l.attention.k_norm.weight.fill_(1.0)
    other = logits(False)
    with torch.no_grad():
        for l, (qn, kn) in zip(m.layers, saved):
            l.attention.q_norm.weight.copy_(qn)
            l.attention.k_norm.weight.copy_(kn)
    Transformer.use_kernels(True, exact=True, cpu=True)
    err, moved = (fused_out - ref).abs().max(), (other - ref).abs().max()
    assert err < 0.2 * moved, (err, moved)

    ref_ids, _ = _plain(tiny_qwen3)
    torch.manual_seed(1)
    head = DraftConfig(kind="eagle", layers=2).build(tiny_qwen3)
    assert head.layers[0].attention.q_norm is not None
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.05)
    gen = SpeculativeGenerator(tiny_qwen3, head, max_seq_len=128, mode="chain", depth=2)
    res = gen.generate(PROMPT, max_new_tokens=N_NEW, chat=False, ignore_eos=True)
    assert res.token_ids == ref_ids


def test_exact_tree_verify_gives_plain_decodings_logits(tiny_bf16, fused):
    """exact_trees: a tree's forward (nodes of one path at slots plain decoding would not give
    them, a sibling branch between) gives the path's nodes the bf16 logits of plain one-token
    steps, bit for bit, through the fused kernels in exact mode."""
    from koala.model import causal_mask, exact_tree_tail, tree_mask
    m = tiny_bf16.model
    W, P = 256, 126                                     # the path crosses a 128-slot split
    torch.manual_seed(4)
    prompt = torch.randint(3, 128, (1, P))
    path = torch.randint(3, 128, (4,))                  # x_P .. x_{P+3}
    m.setup_cache(1, W)
    s = torch.arange(P)
    with torch.no_grad():
        m(prompt, s[None], s, causal_mask(s, W))
        saved = [(l.attention.kv_cache.k.clone(), l.attention.kv_cache.v.clone()) for l in m.layers]
        plain = []
        for i in range(4):
            si = torch.tensor([P + i])
            plain.append(m(path[i].view(1, 1), si[None], si, causal_mask(si, W))[0][0, -1])
        for l, (k, v) in zip(m.layers, saved):
            l.attention.kv_cache.k.copy_(k)
            l.attention.kv_cache.v.copy_(v)
        # nodes: 0 root x_P; 1 a sibling of x_{P+1}; 2 x_{P+1}; 3 child of 1; 4 x_{P+2}; 5 x_{P+3}
        parents = [-1, 0, 0, 1, 2, 4]
        tokens = torch.tensor([path[0], 7, path[1], 9, path[2], path[3]])
        N = len(parents)
        anc = torch.zeros(N, N, dtype=torch.bool)
        depth = torch.zeros(N, dtype=torch.long)
        for i in range(N):
            j = i
            while j >= 0:
                anc[i, j] = True
                j = parents[j]
            depth[i] = anc[i].sum() - 1
        slots = P + torch.arange(N)
        logits, _ = m(tokens.view(1, N), (P + depth).view(1, N), slots, tree_mask(P, slots, anc, W),
                      tail=exact_tree_tail(P, slots, depth, anc, W))
    for node, i in ((0, 0), (2, 1), (4, 2), (5, 3)):
        assert torch.equal(logits[0, node], plain[i]), f"node {node} (x_P+{i})"


@pytest.mark.parametrize("layers,opts", [(2, dict(depth=3, tree_size=9, top_k=3)),
                                         (1, dict(depth=1, tree_size=4, top_k=4))],
                         ids=["K2-d3-k3", "K1-d1-k4"])
def test_fused_tree_draft_is_the_pytorch_tree(tiny_fp32, fused, layers, opts):
    """A greedy EAGLE tree on the fused path (kernels/topk.py and kernels/tree_draft.py for
    every level's ranking and bookkeeping) drafts the tree the PyTorch levels draft from the same
    state: the same nodes, parents, depths, ancestors and order (fp32: no ties among the random
    head's logits). Then the decode through it equals plain decoding."""
    import koala.speculative as S
    fused.setattr(S, "_FUSED_TREE", True)          # KOALA_FUSED_TREE=1 (opt-in until timed on a GPU)
    torch.manual_seed(layers)
    head = DraftConfig(kind="eagle", layers=layers).build(tiny_fp32)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.05)
    gen = SpeculativeGenerator(tiny_fp32, head, max_seq_len=128, mode="tree", **opts)
    plain = SpeculativeGenerator(tiny_fp32, None, max_seq_len=128)
    ref = plain.generate(PROMPT, max_new_tokens=6, chat=False, ignore_eos=True).token_ids
    import kernels.tree_draft as TD
    calls = _spy(fused, TD, "tree_expand")
    res = gen.generate(PROMPT, max_new_tokens=6, chat=False, ignore_eos=True)
    assert res.token_ids == ref
    assert len(calls) == opts["depth"] * len(res.stats.accepted_per_step)   # every level, every draft
    spec = gen.spec                      # its state after the decode: draft once more from it
    W = spec.window(int(spec.L))
    with torch.no_grad():
        fused_tree = spec._draft_eagle_tree_fused(W)
        torch_tree = spec._draft_eagle_tree(W)
    for key in ("tokens", "parents", "depth", "anc"):
        assert torch.equal(fused_tree[key], torch_tree[key]), key
    assert fused_tree["Q"] is None and torch_tree["Q"] is None
