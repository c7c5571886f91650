"""Batch size > 1 (koala/batch.py): every row of a batch gets exactly the tokens that decoding it
alone gives (fp32, greedy), plainly and with Medusa and EAGLE chains, prompts of different lengths,
rows that accept different amounts and rows that stop early."""
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from koala import KoalaError, SpeculativeGenerator, load_target
from koala.errors import ContextLengthError
from koala.heads import DraftConfig, EagleHead, MedusaHead
from tests.helpers import make_hf_checkpoint

PROMPTS = [" ".join(f"w{i}" for i in range(5, 13)), "w3 w9", " ".join(f"w{i}" for i in range(20, 41, 3))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("batch"), "llama", seed=3)
    return load_target(path, device="cpu")


@pytest.fixture(scope="module")
def refs(tiny):
    """Each prompt decoded alone, plainly: (prompt ids + answer ids, answer ids)."""
    plain = SpeculativeGenerator(tiny, None, max_seq_len=256)
    out = []
    for p in PROMPTS:
        r = plain.generate(p, max_new_tokens=40, chat=False, ignore_eos=True)
        out.append((plain.encode(p, chat=False) + r.token_ids, r.token_ids))
    return out


def _wrong(pos):   # a deterministic wrong guess at some positions, so rows accept different amounts
    return (pos * 7919) % 3 == 0


class BatchOracleMedusa(MedusaHead):
    """Head i proposes row b's true token at pos_b + 1 + i (pos: the decoder's positions of the
    rows' last tokens), wrong at some positions (test only)."""

    def bind(self, full, dec):
        self.full, self.dec = full, dec
        return self

    def forward(self, hidden):
        H, V = self.config.n_heads, self.target_config.vocab_size
        pos = self.dec.pos[None, :] + 1 + torch.arange(H)[:, None]                  # (H, B)
        tok = torch.stack([self.full[b][pos[:, b].clamp_max(len(self.full[b]) - 1)] for b in range(pos.shape[1])], 1)
        tok = torch.where(_wrong(pos), (tok + 1) % V, tok)
        return torch.nn.functional.one_hot(tok, V).float().mul(8.0)[:, :, None]     # (H, B, 1, V)


class BatchOracleEagle(EagleHead):
    """The entry at position t of row b proposes row b's x_{t+2}, wrong at some positions."""

    def bind(self, full):
        self.full = full
        return self

    def forward(self, tokens, features, positions=None, slots=None, mask=None):
        V = self.target_config.vocab_size
        pos = positions + 2
        tok = torch.stack([self.full[b][pos[b].clamp_max(len(self.full[b]) - 1)] for b in range(pos.shape[0])])
        tok = torch.where(_wrong(pos), (tok + 1) % V, tok)
        return torch.nn.functional.one_hot(tok, V).float().mul(8.0), features


def _full(refs):
    return [torch.tensor(f) for f, _ in refs]


def _jittered_head(target, kind, layers, seed, scale=0.05):
    """An untrained head (None for kind None) with its weights moved off their init, seeded: it
    drafts junk, so rows take the reject path and accept different amounts."""
    torch.manual_seed(seed)
    if kind is None:
        return None
    head = DraftConfig(kind=kind, layers=layers).build(target)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * scale)
    return head


@contextmanager
def _eos_as(target, tok):
    """The target's EOS ids replaced by [tok] for the block."""
    eos = target.model.config.eos_token_ids[:]
    target.model.config.eos_token_ids[:] = [tok]
    try:
        yield
    finally:
        target.model.config.eos_token_ids[:] = eos


def test_plain_batch_equals_each_prompt_alone(tiny, refs):
    gen = SpeculativeGenerator(tiny, None, max_seq_len=256)
    res = gen.generate_batch(PROMPTS, max_new_tokens=40, chat=False, ignore_eos=True)
    assert [r.token_ids for r in res] == [a for _, a in refs]
    assert [r.stats.prompt_tokens for r in res] == [len(f) - 40 for f, _ in refs]
    assert len({r.stats.prompt_tokens for r in res}) == 3          # the rows really were ragged
    assert all(r.stats.tau is None for r in res)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
@pytest.mark.parametrize("depth", [1, 3])
def test_untrained_heads_batch_equals_plain(tiny, refs, kind, depth):
    head = _jittered_head(tiny, kind, 2, seed=depth)   # drafts junk: the reject path, row by row
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=depth)
    res = gen.generate_batch(PROMPTS, max_new_tokens=40, chat=False, ignore_eos=True)
    assert [r.token_ids for r in res] == [a for _, a in refs]
    for p, r in zip(PROMPTS, res):
        assert len(r.stats.accepted_per_step) == r.stats.target_forwards
        # the same drafts as the batch-1 decoder's, step by step (the head's own cache and masks)
        one = gen.generate(p, max_new_tokens=40, chat=False, ignore_eos=True)
        assert r.stats.accepted_per_step == one.stats.accepted_per_step
    if depth == 3:   # some row accepted drafts, so the comparison above had something to compare
        assert sum(sum(r.stats.accepted_per_step) for r in res) > 0


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_oracle_heads_accept_long_and_ragged_runs(tiny, refs, kind):
    cls = BatchOracleMedusa if kind == "medusa" else BatchOracleEagle
    head = cls(DraftConfig(kind=kind), tiny.model, "tiny")
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=4)
    head.bind(_full(refs), None) if kind == "medusa" else head.bind(_full(refs))
    if kind == "medusa":
        from koala import batch
        real = batch.BatchDecoder.__init__

        def init(self, *a, **k):    # the oracle reads the decoder's positions
            real(self, *a, **k)
            head.dec = self
        batch.BatchDecoder.__init__ = init
    try:
        res = gen.generate_batch(PROMPTS, max_new_tokens=40, chat=False, ignore_eos=True)
    finally:
        if kind == "medusa":
            batch.BatchDecoder.__init__ = real
    assert [r.token_ids for r in res] == [a for _, a in refs]
    for r in res:
        assert r.stats.tau > 1.8, r.stats.tau
        assert max(r.stats.accepted_per_step) >= 2 and len(r.stats.alpha) == 3
    # rows advance at their own pace: their per-step acceptances differ
    assert len({tuple(r.stats.accepted_per_step) for r in res}) > 1


def test_rows_stop_on_their_own_eos(tiny, refs):
    head = BatchOracleEagle(DraftConfig(kind="eagle"), tiny.model, "tiny").bind(_full(refs))
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=4)
    a0 = refs[0][1]
    stop_tok = max(set(a0), key=a0.index)   # the token that first appears latest in row 0's answer
    first = a0.index(stop_tok)
    assert first >= 3
    with _eos_as(tiny, stop_tok):
        res = gen.generate_batch(PROMPTS, max_new_tokens=40, chat=False)
    for r, (_, a) in zip(res, refs):
        want = a[:a.index(stop_tok) + 1] if stop_tok in a else a
        assert r.token_ids == want
    assert len(res[0].token_ids) == first + 1


def test_batch_leaves_the_generator_as_it_was(tiny, refs):
    head = DraftConfig(kind="eagle", layers=1).build(tiny)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=2)
    caches = [l.attention.kv_cache for l in tiny.model.layers] + [l.attention.kv_cache for l in head.layers]
    one = gen.generate(PROMPTS[0], max_new_tokens=20, chat=False, ignore_eos=True)
    gen.generate_batch(PROMPTS, max_new_tokens=20, chat=False, ignore_eos=True)
    assert [l.attention.kv_cache for l in tiny.model.layers] + [l.attention.kv_cache for l in head.layers] == caches
    assert gen.generate(PROMPTS[0], max_new_tokens=20, chat=False, ignore_eos=True).token_ids == one.token_ids


def test_bad_batch_input(tiny):
    plain = SpeculativeGenerator(tiny, None, max_seq_len=64)
    from koala.errors import SamplingError
    with pytest.raises(SamplingError, match="temperature must be"):
        plain.generate_batch(PROMPTS, temperature=-1.0)
    with pytest.raises(SamplingError, match="top_p"):
        plain.generate_batch(PROMPTS, temperature=0.7, top_p=0.0)
    with pytest.raises(KoalaError, match="non-empty list"):
        plain.generate_batch([])
    with pytest.raises(KoalaError, match="max_new_tokens"):
        plain.generate_batch(PROMPTS, max_new_tokens=0)
    with pytest.raises(ContextLengthError, match="longest prompt"):
        plain.generate_batch(PROMPTS, max_new_tokens=60, chat=False)
    head = DraftConfig(kind="medusa").build(tiny)
    tree = SpeculativeGenerator(tiny, head, max_seq_len=64, mode="tree", tree_size=8, top_k=2)
    with pytest.raises(KoalaError, match="chains only"):
        tree.generate_batch(PROMPTS, chat=False)
    chain = SpeculativeGenerator(tiny, head, max_seq_len=64, mode="chain")
    with pytest.raises(KoalaError, match="drafts at most"):
        chain.generate_batch(PROMPTS, chat=False, max_new_tokens=4, depth=head.config.n_heads + 1)


def test_eagle_drafted_levels_match_batch_one(tiny, monkeypatch):
    """The EAGLE head's deeper levels (fed at scratch slots, each seeing the levels before it)
    draft, row by row, the tokens the batch-1 decoder drafts at the same positions."""
    head = _jittered_head(tiny, "eagle", 2, seed=5, scale=0.2)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=4)
    calls = []
    real = type(head).forward

    def spy(self, tokens, features, positions=None, slots=None, mask=None, **kw):   # kw: draft=True
        lg, f = real(self, tokens, features, positions, slots, mask, **kw)
        if tokens.shape[1] == 1 and slots is not None:          # a drafted level (or a first catch-up)
            calls.append((positions[:, 0].tolist(), lg[:, 0].argmax(-1).tolist()))
        return lg, f
    monkeypatch.setattr(type(head), "forward", spy)
    gen.generate_batch(PROMPTS, max_new_tokens=24, chat=False, ignore_eos=True)
    batch = [{} for _ in PROMPTS]
    for pos, tok in calls:
        for b, (p, t) in enumerate(zip(pos, tok)):
            batch[b].setdefault(p, []).append(t)
    n_levels = 0
    for b, prompt in enumerate(PROMPTS):
        calls.clear()
        gen.generate(prompt, max_new_tokens=24, chat=False, ignore_eos=True)
        n = len(gen.encode(prompt, chat=False))
        alone = {}
        for pos, tok in calls:
            alone.setdefault(pos[0], []).append(tok[0])
        # a position is drafted again after a rejection; a batch row that is done keeps drafting
        # while the others finish, so compare the visits both made, in order
        for p, toks in alone.items():
            if p >= n and p in batch[b]:
                k = min(len(toks), len(batch[b][p]))
                assert batch[b][p][:k] == toks[:k], (b, p)
                n_levels += k
    assert n_levels >= 10


# ---- sampling: every row's tokens are distributed as the target's (exact distribution by
# enumeration on a 3-token continuation, as tests/test_speculative.py does for batch 1)
from tests.test_speculative import NEW, V_SMALL, _exact_distribution, small  # noqa: E402,F401


class BatchSkewedMedusa(MedusaHead):
    """A draft that disagrees with the target everywhere: fixed random logits for every row."""

    def forward(self, hidden):
        g = torch.Generator().manual_seed(11)
        H, V = self.config.n_heads, self.target_config.vocab_size
        lg = (torch.randn(H, 1, 1, V, generator=g) * 2).to(hidden.dtype)
        return lg.expand(H, hidden.shape[0], 1, V)


def _batch_tv(gen, small, rows=1500, temperature=1.0, seed=0):
    ids = gen.encode("w3 w5 w7", chat=False)
    exact = _exact_distribution(small, ids, temperature)
    res = gen.generate_batch([ids] * rows, max_new_tokens=NEW, temperature=temperature, seed=seed,
                             ignore_eos=True)
    counts = np.zeros(V_SMALL ** NEW)
    for r in res:
        t = r.token_ids
        counts[(t[0] * V_SMALL + t[1]) * V_SMALL + t[2]] += 1
    tv = 0.5 * np.abs(counts / rows - exact).sum()
    rng = np.random.default_rng(0)
    null = [0.5 * np.abs(rng.multinomial(rows, exact / exact.sum()) / rows - exact).sum() for _ in range(300)]
    return tv, float(np.quantile(null, 0.999)), res


@pytest.mark.parametrize("kind", [None, "medusa", "eagle"])
def test_sampled_rows_follow_the_target(small, kind):
    torch.manual_seed(0)
    if kind == "medusa":
        head = BatchSkewedMedusa(DraftConfig(kind="medusa", n_heads=3), small.model, "small")
    elif kind == "eagle":
        head = DraftConfig(kind="eagle").build(small)
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 0.3)
    else:
        head = None
    gen = SpeculativeGenerator(small, head, max_seq_len=64, mode="chain", depth=3)
    tv, bound, res = _batch_tv(gen, small)
    assert tv < bound, (tv, bound)
    if head is not None:   # drafts were both kept and rejected, so both branches were sampled
        steps = [a for r in res for a in r.stats.accepted_per_step]
        assert 0 < sum(steps) and min(steps) == 0


def test_batch_distribution_test_detects_a_lossy_verifier(small, monkeypatch):
    from koala import batch
    head = BatchSkewedMedusa(DraftConfig(kind="medusa", n_heads=3), small.model, "small")
    gen = SpeculativeGenerator(small, head, max_seq_len=64, mode="chain", depth=3)
    real = batch.BatchDecoder._accept

    def keep_all(self, drafts, Q, logits):   # accepts every draft: lossy
        acc, nxt = real(self, drafts, Q, logits)
        return torch.full_like(acc, drafts.shape[1]), nxt
    monkeypatch.setattr(batch.BatchDecoder, "_accept", keep_all)
    tv, bound, _ = _batch_tv(gen, small, rows=600)
    assert tv > bound


def test_seeded_batch_sampling_repeats(tiny):
    head = DraftConfig(kind="eagle").build(tiny)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=2)
    kw = dict(max_new_tokens=20, temperature=0.9, top_p=0.95, chat=False, ignore_eos=True)
    a, b, c = ([r.token_ids for r in gen.generate_batch(PROMPTS, seed=s, **kw)] for s in (1, 1, 2))
    assert a == b and a != c


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_cuda_batch_rows_equal_each_prompt_alone(kind, tmp_path):
    """On the GPU (fused kernels, fp32): each row of a batch, decoded through the batch's CUDA
    graphs, gets the tokens and acceptances of its prompt decoded alone by generate() with its
    CUDA graphs; in fp32 and bf16 the graphs give the tokens of the same batch run eagerly."""
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3)
    for dtype in (torch.float32, torch.bfloat16):
        lt = load_target(path, device="cuda", dtype=dtype)
        head = _jittered_head(lt, kind, 2, seed=4)
        gen = SpeculativeGenerator(lt, head, max_seq_len=256, mode="chain", depth=3)
        res = gen.generate_batch(PROMPTS, max_new_tokens=40, chat=False, ignore_eos=True)
        assert [len(r.token_ids) for r in res] == [40] * len(PROMPTS)
        dec = gen._batch_decoder
        assert dec.use_graph and dec.graphs                     # every iteration was a graph replay
        eager = SpeculativeGenerator(lt, head, max_seq_len=256, mode="chain", depth=3, use_cuda_graph=False)
        want = eager.generate_batch(PROMPTS, max_new_tokens=40, chat=False, ignore_eos=True)
        assert [r.token_ids for r in res] == [r.token_ids for r in want]     # the same kernels, eagerly
        if dtype == torch.float32:
            for p, r in zip(PROMPTS, res):
                one = gen.generate(p, max_new_tokens=40, chat=False, ignore_eos=True)
                assert gen.spec.use_graph
                assert r.token_ids == one.token_ids
                assert r.stats.accepted_per_step == one.stats.accepted_per_step
        sampled = gen.generate_batch(PROMPTS, max_new_tokens=20, temperature=0.8, seed=0, chat=False,
                                     ignore_eos=True)
        assert [len(r.token_ids) for r in sampled] == [20] * len(PROMPTS)


def test_cli_prompts_file_decodes_a_batch(tiny, tmp_path, capsys):
    from koala.__main__ import main
    head = DraftConfig(kind="medusa", layers=1).build(tiny)
    head.save_pretrained(tmp_path / "head")
    f = tmp_path / "prompts.txt"
    f.write_text("w3 w9\n\nw5 w6 w7\n")
    target = str(tiny.source)
    rc = main(["--target", target, "--draft", str(tmp_path / "head"), "--device", "cpu", "--prompts-file", str(f),
               "--max-new-tokens", "6", "--max-seq-len", "128"])
    out = capsys.readouterr().out
    assert rc == 0 and "> w3 w9" in out and "> w5 w6 w7" in out and "a batch of 2" in out and "tau" in out
    assert main(["--target", target, "--draft", "none", "--device", "cpu", "--max-seq-len", "128",
                 "--prompts-file", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read --prompts-file" in capsys.readouterr().err


def test_one_token_prompt_beside_longer_ones(tiny):
    """A 1-token prompt has no EAGLE head entries before its first catch-up: every query of its
    row in the head's prefill attends to nothing (SDPA and kernels/tree_attention.py give such a
    row zeros), and the row must still decode as it does alone."""
    plain = SpeculativeGenerator(tiny, None, max_seq_len=256)
    prompts = ["w3", PROMPTS[0]]
    want = [plain.generate(p, max_new_tokens=20, chat=False, ignore_eos=True).token_ids for p in prompts]
    head = _jittered_head(tiny, "eagle", 2, seed=3)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=2)
    res = gen.generate_batch(prompts, max_new_tokens=20, chat=False, ignore_eos=True)
    assert [r.token_ids for r in res] == want
    one = gen.generate(prompts[0], max_new_tokens=20, chat=False, ignore_eos=True)
    assert res[0].stats.accepted_per_step == one.stats.accepted_per_step


class _ReplayByRerun:
    """A stand-in for a captured CUDA graph on the CPU: replay() runs the captured function."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def _fake_capture(log):
    def capture(fns, reset, pool=None):
        for _ in range(2):            # the warm-up runs, which change every state buffer
            reset()
            for f in fns:
                f()
        reset()
        log.append(len(fns))
        return [_ReplayByRerun(f) for f in fns], pool
    return capture


@pytest.mark.parametrize("kind", [None, "medusa", "eagle"])
def test_graph_mode_bookkeeping_on_cpu(tiny, refs, monkeypatch, kind):
    """The CUDA-graph path's host logic, run on the CPU with a capture that runs the iteration
    twice as warm-up (as koala.graphs.capture does) and a replay that reruns it: the state put
    back after capture must be complete, one graph per (mode, window) must serve many steps,
    windows must grow as the slots fill, and a second call must reuse the decoder and its
    graphs. The rows still equal each prompt decoded alone."""
    from koala import batch, graphs
    log = []
    monkeypatch.setattr(batch, "capture", _fake_capture(log))
    monkeypatch.setattr(graphs, "MIN_WINDOW", 16)          # several windows within 40 tokens
    head = _jittered_head(tiny, kind, 1, seed=7)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=2, use_cuda_graph=True)
    res = gen.generate_batch(PROMPTS, max_new_tokens=40, chat=False, ignore_eos=True)
    assert [r.token_ids for r in res] == [a for _, a in refs]
    dec = gen._batch_decoder
    assert dec.use_graph and len(dec.graphs) == len(log) >= 3    # windows 16, 32, 64, ...
    assert len({L for _, L, _ in dec.graphs}) >= 3                   # the target's window grew
    assert len(dec.graphs) < max(r.stats.target_forwards for r in res)    # a graph serves many steps
    n = len(log)
    again = gen.generate_batch(PROMPTS, max_new_tokens=40, chat=False, ignore_eos=True)
    assert [r.token_ids for r in again] == [a for _, a in refs]
    assert gen._batch_decoder is dec and len(log) == n               # nothing captured again
    short = gen.generate_batch(PROMPTS, max_new_tokens=10, chat=False, ignore_eos=True)
    assert [r.token_ids for r in short] == [a[:10] for _, a in refs]
    assert gen._batch_decoder is dec and len(log) == n               # a smaller call fits too
    if head is not None:
        eager = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=2, use_cuda_graph=False)
        want = eager.generate_batch(PROMPTS, max_new_tokens=40, chat=False, ignore_eos=True)
        assert [r.stats.accepted_per_step for r in res] == [r.stats.accepted_per_step for r in want]
        kw = dict(max_new_tokens=16, temperature=0.9, seed=3, chat=False, ignore_eos=True)
        assert ([r.token_ids for r in gen.generate_batch(PROMPTS, **kw)]
                == [r.token_ids for r in eager.generate_batch(PROMPTS, **kw)])   # the same draws


@pytest.mark.parametrize("kind", [None, "eagle"])
def test_warmup_batch_captures_what_later_calls_need(tiny, refs, monkeypatch, kind):
    """After warmup_batch(B, prompt_tokens, max_new_tokens), a call of B prompts that fits
    captures no graph (greedy here; a sampled call after a greedy-only warmup does), and still
    decodes each row as alone."""
    from koala import batch, graphs
    log = []
    monkeypatch.setattr(batch, "capture", _fake_capture(log))
    monkeypatch.setattr(graphs, "MIN_WINDOW", 16)
    head = None if kind is None else DraftConfig(kind=kind, layers=1).build(tiny)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=2, use_cuda_graph=True)
    longest = max(len(gen.encode(p, chat=False)) for p in PROMPTS)
    n = gen.warmup_batch(len(PROMPTS), longest + 4, max_new_tokens=40)
    assert n == len(log) >= 3
    res = gen.generate_batch(PROMPTS, max_new_tokens=40, chat=False, ignore_eos=True)
    assert [r.token_ids for r in res] == [a for _, a in refs]
    assert len(log) == n                                            # nothing captured
    gen.generate_batch(PROMPTS, max_new_tokens=5, temperature=0.8, seed=1, chat=False, ignore_eos=True)
    assert len(log) > n                                             # another mode's graphs
    with pytest.raises(KoalaError, match="batch_size must be a positive integer"):
        gen.warmup_batch(0, 8)
    with pytest.raises(ContextLengthError, match="reaches past"):
        gen.warmup_batch(2, 200, max_new_tokens=100)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", [None, "eagle"])
def test_cuda_warmup_batch_captures_what_later_calls_need(kind, tmp_path, monkeypatch):
    """With real CUDA graphs: after warmup_batch for greedy and sampling, calls of that batch
    size that fit capture no graph, and give the rows of a generator that was not warmed up."""
    from koala import batch
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3)
    lt = load_target(path, device="cuda", dtype=torch.float32)
    head = _jittered_head(lt, kind, 2, seed=4)
    gen = SpeculativeGenerator(lt, head, max_seq_len=256, mode="chain", depth=2)
    cold = SpeculativeGenerator(lt, head, max_seq_len=256, mode="chain", depth=2)
    longest = max(len(gen.encode(p, chat=False)) for p in PROMPTS)
    n = gen.warmup_batch(len(PROMPTS), longest, max_new_tokens=60, temperatures=(0.0, 0.7))
    assert n >= 2                              # a window's graph at least, for each sampling mode
    calls = []
    real = batch.capture
    monkeypatch.setattr(batch, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    for T in (0.0, 0.7):
        got = gen.generate_batch(PROMPTS, max_new_tokens=60, temperature=T, seed=3, chat=False, ignore_eos=True)
        assert calls == []                     # the warmed generator captures nothing ...
        want = cold.generate_batch(PROMPTS, max_new_tokens=60, temperature=T, seed=3, chat=False, ignore_eos=True)
        assert calls                           # ... where the cold one captures its graphs
        calls.clear()
        assert [r.token_ids for r in got] == [r.token_ids for r in want]


@pytest.mark.parametrize("kind", [None, "medusa", "eagle"])
def test_pipelined_batch_gives_the_same_rows(tiny, refs, monkeypatch, kind):
    """KOALA_BATCH_PIPELINE=1 queues the next iteration before the host reads the last one: the
    same tokens, acceptances and seeded samples as one iteration at a time, early EOS included
    (its queued iteration is discarded)."""
    head = _jittered_head(tiny, kind, 1, seed=11)
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("KOALA_BATCH_PIPELINE", flag)
        gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=2)
        greedy = gen.generate_batch(PROMPTS, max_new_tokens=40, chat=False, ignore_eos=True)
        assert gen._batch_decoder.pipeline == (flag == "1")
        sampled = gen.generate_batch(PROMPTS, max_new_tokens=12, temperature=0.9, seed=5, chat=False,
                                     ignore_eos=True)
        stop_tok = refs[0][1][5]
        with _eos_as(tiny, stop_tok):
            stopped = gen.generate_batch(PROMPTS, max_new_tokens=40, chat=False)
        runs[flag] = [[(r.token_ids, r.stats.accepted_per_step) for r in rs] for rs in (greedy, sampled, stopped)]
        assert [r.token_ids for r in greedy] == [a for _, a in refs]
        assert len(stopped[0].token_ids) <= 6
    assert runs["0"] == runs["1"]
