"""Draft vocabularies (koala.heads.set_draft_vocab, python -m train.vocab): a head that drafts from
its n most frequent tokens keeps the output lossless (greedy: the same tokens as plain decoding;
sampled: the target's distribution, also when the target puts mass outside the n), drafts only
tokens of the n, drafts what the whole vocabulary would have drafted whenever that token is among
the n, and travels with the head's checkpoint."""
import json

import numpy as np
import pytest
import torch

from koala import KoalaError, SpeculativeGenerator, load_target
from koala.errors import CheckpointError
from koala.heads import COUNTS, DraftConfig, load_head
from tests.helpers import make_hf_checkpoint
from tests.test_batch import BatchSkewedMedusa, _batch_tv
from tests.test_speculative import (MODES, IDS, PROMPT, V_SMALL, OracleEagle, OracleMedusa, SkewedMedusa,
                                    _tv_test)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("vocab"), "llama", seed=3)
    return load_target(path, device="cpu")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("vocab_small"), "llama", seed=5, vocab=V_SMALL, scale=6.0)
    return load_target(path, device="cpu")


def _head(target, kind, seed=0, scale=0.05, layers=1):
    torch.manual_seed(seed)
    head = DraftConfig(kind=kind, layers=layers).build(target)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * scale)
    return head


def _counts(V, favour=(), seed=0):
    """Random counts, with the tokens of `favour` above all others."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 50, (V,), generator=g, dtype=torch.int64)
    for t in favour:
        c[t] = 1000 + c[t]
    return c


def _record_drafts(gen, monkeypatch):
    """Every iteration's drafted tokens (the tree's nodes after the root), in order."""
    from koala import speculative
    seen = []
    real = speculative.SpeculativeDecoder.verify

    def spy(self, W):
        seen.append(self.tree["tokens"][1:].tolist())
        return real(self, W)
    monkeypatch.setattr(speculative.SpeculativeDecoder, "verify", spy)
    return seen


# ---------------------------------------------------------------------------------------------
# the head's side

def test_set_draft_vocab_takes_the_most_frequent_in_id_order(tiny):
    head = _head(tiny, "eagle")
    V = tiny.model.config.vocab_size
    c = torch.zeros(V, dtype=torch.int64)
    c[[7, 3, 90, 41, 5]] = torch.tensor([9, 9, 30, 2, 9])      # a three-way tie at 9
    head.token_counts = c
    head.set_draft_vocab(3)                                      # 90, then the two lowest ids of the tie
    assert head.vocab_ids.tolist() == [3, 5, 90]
    assert head.draft_vocab_size == 3
    # the inverse map (kernels/spec_sample.py's q_ids): each draft token's column, -1 elsewhere
    idx = head.vocab_index
    assert idx.dtype == torch.int32 and idx.shape == (V,)
    assert idx[[3, 5, 90]].tolist() == [0, 1, 2] and int((idx >= 0).sum()) == 3
    x = torch.randn(2, tiny.model.config.dim)
    full = head.lm_head(x)
    torch.testing.assert_close(head.draft_project(x), full[:, [3, 5, 90]])
    assert head.to_token_ids(torch.tensor([2, 0])).tolist() == [90, 3]
    q = torch.tensor([[0.5, 0.3, 0.2]])
    qf = head.to_full_probs(q)
    assert qf.shape == (1, V) and torch.equal(qf[0, [3, 5, 90]], q[0]) and qf.sum() == pytest.approx(1.0)
    head.set_draft_vocab(V)                                      # all of it: the plain path again
    assert head.vocab_ids is None and head.vocab_index is None and head.draft_vocab_size == V
    head.set_draft_vocab(None)
    assert head.vocab_ids is None


def test_draft_vocab_errors(tiny):
    head = _head(tiny, "medusa")
    with pytest.raises(KoalaError, match="token counts"):
        head.set_draft_vocab(16)
    with pytest.raises(KoalaError, match="token counts"):
        SpeculativeGenerator(tiny, head, max_seq_len=128, draft_vocab=16)
    head.token_counts = _counts(tiny.model.config.vocab_size)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(KoalaError, match="positive integer"):
            head.set_draft_vocab(bad)
    with pytest.raises(KoalaError, match="draft_vocab"):
        SpeculativeGenerator(tiny, head, max_seq_len=128, draft_vocab="some")
    with pytest.raises(ValueError, match="draft_vocab"):
        DraftConfig(kind="eagle", draft_vocab=0)


def test_counts_and_default_travel_with_the_checkpoint(tiny, tmp_path):
    head = _head(tiny, "eagle")
    V = tiny.model.config.vocab_size
    head.token_counts = _counts(V)
    head.config.draft_vocab = 20
    head.save_pretrained(tmp_path / "h")
    back = load_head(tmp_path / "h", tiny)
    assert torch.equal(back.token_counts, head.token_counts)
    assert back.config.draft_vocab == 20
    gen = SpeculativeGenerator(tiny, back, max_seq_len=128)     # the config's default
    assert gen.spec.draft_vocab == 20 and back.draft_vocab_size == 20
    gen = SpeculativeGenerator(tiny, back, max_seq_len=128, draft_vocab=None)   # overridden: all
    assert gen.spec.draft_vocab is None and back.vocab_ids is None
    # re-saved without counts: no stale counts file is left behind
    back.token_counts = None
    back.config.draft_vocab = None
    back.save_pretrained(tmp_path / "h")
    assert not (tmp_path / "h" / COUNTS).exists()


def test_bad_counts_files_are_named(tiny, tmp_path):
    from koala.heads import save_token_counts
    head = _head(tiny, "eagle")
    head.token_counts = _counts(tiny.model.config.vocab_size)
    head.config.draft_vocab = 20
    head.save_pretrained(tmp_path / "h")
    f = tmp_path / "h" / COUNTS
    f.write_bytes(f.read_bytes()[:40])                            # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_head(tmp_path / "h", tiny)
    save_token_counts(tmp_path / "h", torch.ones(7, dtype=torch.int64))   # another vocabulary's
    with pytest.raises(CheckpointError, match="non-negative int64"):
        load_head(tmp_path / "h", tiny)
    f.unlink()                                                   # the config asks for it: missing
    with pytest.raises(CheckpointError, match="missing"):
        load_head(tmp_path / "h", tiny)


# ---------------------------------------------------------------------------------------------
# decoding: lossless, and the drafts are the whole vocabulary's where it allows

@pytest.mark.parametrize("kind,opts", MODES, ids=IDS)
def test_greedy_with_a_draft_vocab_equals_plain_and_drafts_inside_it(tiny, kind, opts, monkeypatch):
    plain = SpeculativeGenerator(tiny, None, max_seq_len=256)
    ref = plain.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True)
    head = _head(tiny, kind, seed=1)
    head.token_counts = _counts(tiny.model.config.vocab_size, seed=2)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, draft_vocab=24, **opts)
    seen = _record_drafts(gen, monkeypatch)
    res = gen.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True)
    assert res.token_ids == ref.token_ids
    allowed = set(head.vocab_ids.tolist())
    assert len(allowed) == 24 and seen
    assert all(t in allowed for step in seen for t in step)


def test_generators_sharing_a_head_keep_their_own_vocabulary(tiny, monkeypatch):
    """Two generators over one head, one with a draft vocabulary and one without: each decodes
    with its own, whichever was made or ran last (the graphs of one must not read the other's)."""
    head = _head(tiny, "eagle", seed=1)
    head.token_counts = _counts(tiny.model.config.vocab_size, seed=2)
    a = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=3, draft_vocab=20)
    allowed = set(head.vocab_ids.tolist())
    solo = a.generate(PROMPT, max_new_tokens=30, chat=False, ignore_eos=True)
    b = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=3, draft_vocab=None)
    b_solo = b.generate(PROMPT, max_new_tokens=30, chat=False, ignore_eos=True)
    seen = _record_drafts(a, monkeypatch)
    again = a.generate(PROMPT, max_new_tokens=30, chat=False, ignore_eos=True)
    assert all(t in allowed for step in seen for t in step)
    assert again.stats.accepted_per_step == solo.stats.accepted_per_step
    batch = a.generate_batch([PROMPT, "w3 w9"], max_new_tokens=30, chat=False, ignore_eos=True)
    assert batch[0].stats.accepted_per_step == solo.stats.accepted_per_step
    monkeypatch.undo()
    assert b.generate(PROMPT, max_new_tokens=30, chat=False, ignore_eos=True).stats.accepted_per_step \
        == b_solo.stats.accepted_per_step


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_chain_drafts_what_the_whole_vocabulary_drafts_when_it_is_inside(tiny, kind, monkeypatch):
    """A vocabulary holding every token the whole-vocabulary head drafted gives the very same
    drafts and acceptances, iteration by iteration: the subset's indices map back to the right
    ids (a decoder that fed subset indices on as token ids would draft other tokens)."""
    head = _head(tiny, kind, seed=4, scale=0.3 if kind == "eagle" else 0.05, layers=2)
    opts = dict(mode="chain", depth=3)
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, draft_vocab=None, **opts)
    seen_full = _record_drafts(gen, monkeypatch)
    full = gen.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True)
    drafted = sorted({t for step in seen_full for t in step})
    V = tiny.model.config.vocab_size
    assert len(drafted) < V // 2                                  # a real subset below
    head.token_counts = _counts(V, favour=drafted, seed=5)
    n = len(drafted) + 6
    monkeypatch.undo()
    gen = SpeculativeGenerator(tiny, head, max_seq_len=256, draft_vocab=n, **opts)
    seen_sub = _record_drafts(gen, monkeypatch)
    sub = gen.generate(PROMPT, max_new_tokens=40, chat=False, ignore_eos=True)
    assert sub.token_ids == full.token_ids
    assert seen_sub == seen_full
    assert sub.stats.accepted_per_step == full.stats.accepted_per_step


@pytest.mark.parametrize("kind,opts", [("medusa", dict(mode="chain")), ("eagle", dict(mode="chain", depth=4))],
                         ids=["medusa-chain", "eagle-chain"])
def test_oracle_keeps_its_acceptance_when_the_vocabulary_covers_the_text(tiny, kind, opts):
    """Heads with their own forward (gathered to the vocabulary) accept as much with a vocabulary
    that holds the text's tokens as with all of them, and less with one that misses them; the
    output is the plain one either way."""
    plain = SpeculativeGenerator(tiny, None, max_seq_len=256)
    ref = plain.generate(PROMPT, max_new_tokens=60, chat=False, ignore_eos=True)
    full = plain.encode(PROMPT, chat=False) + ref.token_ids
    V = tiny.model.config.vocab_size
    taus = {}
    for name, favour, n in (("all", (), None), ("covering", sorted(set(full)), len(set(full))),
                            ("missing", [t for t in range(V) if t not in set(ref.token_ids)], 8)):
        cls = OracleMedusa if kind == "medusa" else OracleEagle
        head = cls(DraftConfig(kind=kind), tiny.model, "tiny")
        head.token_counts = _counts(V, favour=favour, seed=7)
        gen = SpeculativeGenerator(tiny, head, max_seq_len=256, draft_vocab=n, **opts)
        head.bind(full, gen.spec) if kind == "medusa" else head.bind(full)
        res = gen.generate(PROMPT, max_new_tokens=60, chat=False, ignore_eos=True)
        assert res.token_ids == ref.token_ids, name
        taus[name] = res.stats.tau
    # (at least: where the oracle guesses wrong on purpose, a token outside the vocabulary becomes
    # the vocabulary's first one, which may happen to be right)
    assert taus["covering"] >= taus["all"] > 1.8
    assert taus["missing"] == 1.0                                 # nothing it drafts is ever right


@pytest.mark.parametrize("kind,opts", [("medusa", dict(mode="chain", depth=3)),
                                       ("eagle", dict(mode="chain", depth=3)),
                                       ("eagle", dict(mode="tree", depth=3, tree_size=8, top_k=3))],
                         ids=["medusa-chain", "eagle-chain", "eagle-tree"])
def test_sampling_with_a_draft_vocab_follows_the_target(small, kind, opts):
    """q is zero outside the 5 tokens of the vocabulary while p is not: the residual must give
    the other 7 their probability."""
    torch.manual_seed(0)
    if kind == "medusa":
        head = SkewedMedusa(DraftConfig(kind="medusa", n_heads=3), small.model, "small")
    else:
        head = DraftConfig(kind="eagle").build(small)
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 0.3)
    head.token_counts = _counts(V_SMALL, seed=3)
    gen = SpeculativeGenerator(small, head, max_seq_len=64, draft_vocab=5, **opts)
    assert gen.spec.draft_vocab == 5
    tv, bound = _tv_test(gen, small)
    assert tv < bound, (tv, bound)


def test_batch_rows_with_a_draft_vocab(tiny, small):
    """generate_batch drafts from the vocabulary too: greedy rows equal plain decoding and the
    batch-1 decoder's acceptances; sampled rows follow the target."""
    prompts = [PROMPT, "w3 w9", " ".join(f"w{i}" for i in range(20, 41, 3))]
    plain = SpeculativeGenerator(tiny, None, max_seq_len=256)
    refs = [plain.generate(p, max_new_tokens=30, chat=False, ignore_eos=True).token_ids for p in prompts]
    for kind in ("medusa", "eagle"):
        head = _head(tiny, kind, seed=6, layers=2)
        head.token_counts = _counts(tiny.model.config.vocab_size, seed=8)
        gen = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=2, draft_vocab=20)
        res = gen.generate_batch(prompts, max_new_tokens=30, chat=False, ignore_eos=True)
        assert [r.token_ids for r in res] == refs
        for p, r in zip(prompts, res):
            one = gen.generate(p, max_new_tokens=30, chat=False, ignore_eos=True)
            assert r.stats.accepted_per_step == one.stats.accepted_per_step
        # a new vocabulary on the same head gets a new batch decoder (its buffers are sized by it)
        dec = gen._batch_decoder
        gen2 = SpeculativeGenerator(tiny, head, max_seq_len=256, mode="chain", depth=2, draft_vocab=None)
        gen2._batch_decoder = dec
        res2 = gen2.generate_batch(prompts, max_new_tokens=30, chat=False, ignore_eos=True)
        assert gen2._batch_decoder is not dec and [r.token_ids for r in res2] == refs
    torch.manual_seed(0)
    head = DraftConfig(kind="eagle").build(small)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    head.token_counts = _counts(V_SMALL, seed=3)
    gen = SpeculativeGenerator(small, head, max_seq_len=64, mode="chain", depth=3, draft_vocab=5)
    tv, bound, res = _batch_tv(gen, small)
    assert tv < bound, (tv, bound)
    medusa = BatchSkewedMedusa(DraftConfig(kind="medusa", n_heads=3), small.model, "small")
    medusa.token_counts = _counts(V_SMALL, seed=3)
    gen = SpeculativeGenerator(small, medusa, max_seq_len=64, mode="chain", depth=3, draft_vocab=5)
    tv, bound, res = _batch_tv(gen, small)
    assert tv < bound, (tv, bound)


# ---------------------------------------------------------------------------------------------
# python -m train.vocab

def _shards(tmp_path, V=40):
    from train.data import write_split
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, V, size=int(rng.integers(5, 30))).tolist() for _ in range(20)]
    masks = [[i % 3 != 0 for i in range(len(s))] for s in seqs]
    write_split(tmp_path, "train", seqs[:16], masks[:16])
    write_split(tmp_path, "eval", seqs[16:], masks[16:])
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": V, "max_len": 64}))
    return seqs, masks


def test_answer_counts_and_coverage(tmp_path):
    from train.vocab import answer_counts, coverage
    seqs, masks = _shards(tmp_path)
    c = answer_counts(tmp_path, "train")
    expect = np.zeros(40, dtype=np.int64)
    for s, m in zip(seqs[:16], masks[:16]):
        for t, keep in zip(s, m):
            expect[t] += keep
    assert c.dtype == np.int64 and (c == expect).all()            # answer tokens only
    held = answer_counts(tmp_path, "eval", 40)
    cov = coverage(c, held, [1, 40])
    assert cov[40] == 1.0 and 0 < cov[1] < 1
    top = int(np.argmax(c))
    assert cov[1] == pytest.approx(held[top] / held.sum())


def test_vocab_cli_writes_the_heads(tiny, tmp_path, capsys):
    from train.vocab import main
    V = tiny.model.config.vocab_size
    (tmp_path / "d").mkdir()
    _shards(tmp_path / "d", V=V)
    head = _head(tiny, "eagle")
    head.save_pretrained(tmp_path / "h")
    assert main(["--data", str(tmp_path / "d"), "--heads", str(tmp_path / "h"), "--draft-vocab", "12",
                 "--sizes", "4,12"]) == 0
    assert "held-out coverage" in capsys.readouterr().out
    back = load_head(tmp_path / "h", tiny)
    assert back.config.draft_vocab == 12 and back.token_counts.sum() > 0
    # another tokenizer's data is refused
    (tmp_path / "d2").mkdir()
    _shards(tmp_path / "d2", V=40)
    with pytest.raises(ValueError, match="another tokenizer"):
        main(["--data", str(tmp_path / "d2"), "--heads", str(tmp_path / "h")])


# ---------------------------------------------------------------------------------------------
# on the GPU: CUDA graphs, the fused kernels, bf16 exact mode

@pytest.mark.gpu
@pytest.mark.parametrize("kind,opts", MODES, ids=IDS)
def test_cuda_graphs_with_a_draft_vocab(kind, opts, tmp_path):
    """Through the graphs and kernels, in fp32 and bf16 (exact mode for chains): greedy output
    equals plain decoding, every draft lies in the vocabulary, and sampling runs; the batch
    path's graphs give its eager tokens."""
    path, _ = make_hf_checkpoint(tmp_path, "llama", seed=3)
    for dtype in (torch.float32, torch.bfloat16):
        lt = load_target(path, device="cuda", dtype=dtype)
        plain = SpeculativeGenerator(lt, None, max_seq_len=256)
        ref = plain.generate(PROMPT, max_new_tokens=48, chat=False, ignore_eos=True)
        head = _head(lt, kind, seed=1, layers=2)
        head.token_counts = _counts(lt.model.config.vocab_size, seed=2)
        gen = SpeculativeGenerator(lt, head, max_seq_len=256, draft_vocab=24, **opts)
        res = gen.generate(PROMPT, max_new_tokens=48, chat=False, ignore_eos=True)
        assert gen.spec.use_graph and res.stats.draft_s is not None
        if dtype == torch.float32 or opts["mode"] == "chain":
            assert res.token_ids == ref.token_ids
        # the graph's static tree holds the last replayed iteration's drafts
        allowed = set(head.vocab_ids.tolist())
        assert all(t in allowed for t in gen.spec.tree["tokens"][1:].tolist())
        s = gen.generate(PROMPT, max_new_tokens=24, temperature=0.8, seed=0, chat=False, ignore_eos=True)
        assert len(s.token_ids) == 24
        if opts["mode"] == "chain":
            prompts = [PROMPT, "w3 w9"]
            b = gen.generate_batch(prompts, max_new_tokens=30, chat=False, ignore_eos=True)
            eager = SpeculativeGenerator(lt, head, max_seq_len=256, draft_vocab=24, use_cuda_graph=False, **opts)
            want = eager.generate_batch(prompts, max_new_tokens=30, chat=False, ignore_eos=True)
            assert gen._batch_decoder.use_graph
            assert [r.token_ids for r in b] == [r.token_ids for r in want]
