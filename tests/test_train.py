"""CPU smoke tests of the training path on a tiny random target and tiny synthetic data."""
import json
import os
import socket

import numpy as np
import pytest
import torch

from koala.config import ModelConfig
from koala.heads import DraftConfig, load_head
from koala.model import Transformer, causal_mask
from train.data import ShardData, normalize, recover_records, write_split
from train.discriminator import Discriminator, fc_layers_for
from train.losses import eagle_rollout, medusa_terms, medusa_valid, rollout_mask
from train.selfdistill import generate, regenerate
from train.trainer import CKPT, TrainConfig, Trainer


def tiny_target(seed=0, sharpen=4.0, qk_norm=False):
    """Tiny random target; its LM head is scaled up so its distributions are peaked (a random
    model's near-uniform distributions leave a head little to learn). qk_norm: Qwen3's per-head
    q/k norms, with weights away from one."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny")
    cfg.qk_norm = qk_norm
    m = Transformer(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        m.output.weight.mul_(sharpen)
        for layer in m.layers if qk_norm else []:
            layer.attention.q_norm.weight.normal_(1, 0.3)
            layer.attention.k_norm.weight.normal_(1, 0.3)
    return m


def make_data(root, n_train=48, n_eval=8, seed=0):
    rng = np.random.default_rng(seed)
    def split(n):
        ids = [rng.integers(0, 256, int(rng.integers(10, 33))).tolist() for _ in range(n)]
        return ids, [[0] * 3 + [1] * (len(x) - 3) for x in ids]
    write_split(root, "train", *split(n_train))
    write_split(root, "eval", *split(n_eval))
    return str(root)


def cfg_for(tmp_path, data, **kw):
    base = dict(data=data, out=str(tmp_path / "run"), kind="eagle", layers=2, batch_size=8, steps=8,
                warmup=2, lr=5e-4, disc_lr=5e-4, eval_every=4, eval_batches=1, ckpt_every=3,
                disc_tokens=64, disc_width=32, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


# ---------------------------------------------------------------------------------------------
# data

def test_recover_records_from_truncated_json():
    recs = [{"id": "a", "conversations": [{"from": "human", "value": "hi ]},{"}, {"from": "gpt", "value": "yo"}]},
            {"id": "b", "conversations": [{"from": "human", "value": "é\n\"q\""}]},
            {"id": "c", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    text = json.dumps(recs, indent=2)
    assert recover_records(text) == recs                       # complete file
    cut_in_c = text[: text.index('"c"') + 10]
    assert recover_records(cut_in_c) == recs[:2]               # cut inside the third record
    cut_after_b = text[: text.index('"c"') - 8]
    assert recover_records(cut_after_b) == recs[:2]
    assert recover_records(text[:3]) == []
    assert recover_records("[]") == []
    with pytest.raises(ValueError):
        recover_records('{"a": 1}')


def test_normalize_roles():
    rec = {"conversations": [{"from": "gpt", "value": "orphan"}, {"from": "human", "value": "q"},
                             {"from": "human", "value": "again"}, {"from": "gpt", "value": "a"},
                             {"from": "bard", "value": "dup"}, {"from": "human", "value": " "}]}
    assert normalize(rec) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert normalize({"conversations": [{"from": "human", "value": "q"}]}) is None
    assert normalize({"nothing": 1}) is None


def test_shard_data_deterministic_batches(tmp_path):
    root = make_data(tmp_path, n_train=40)
    a, b = ShardData(root, batch_size=4, seed=3), ShardData(root, batch_size=4, seed=3)
    assert len(a) == 10
    for step in (0, 7, 10, 23):                                # across epochs too
        x, y = a.batch(step), b.batch(step)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.mask, y.mask)
    assert not torch.equal(a.batch(0).tokens[:, :5], a.batch(10).tokens[:, :5])  # epochs reshuffle
    order = a._epoch_order(0)
    assert sorted(order.ravel().tolist()) == list(range(40))   # an epoch covers every sequence once
    for step in range(10):                                     # batches group similar lengths
        lens = a.lens[order[step]]
        assert a.batch(step).tokens.shape[1] == lens.max()
    bt = a.batch(1)
    L = bt.mask.sum(1) + 3
    for r in range(4):                                          # padding is never trained
        assert not bt.mask[r, L[r]:].any()


# ---------------------------------------------------------------------------------------------
# self-distillation

def _greedy_ref(m, prompt, n, eos):
    x, out = torch.tensor([prompt]), []
    for _ in range(n):
        nxt = int(m(x)[0][0, -1].argmax())
        out.append(nxt)
        if nxt in eos:
            break
        x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return out


def test_batched_generation_equals_unbatched_greedy():
    m = tiny_target()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    refs = [_greedy_ref(m, p, 12, []) for p in prompts]
    assert generate(m, prompts, 12, []) == refs
    eos = [refs[0][4]]                                         # row 0 stops early, others go on
    refs = [_greedy_ref(m, p, 12, eos) for p in prompts]
    assert len(refs[0]) == 5
    assert generate(m, prompts, 12, eos) == refs


def test_per_prompt_limits_and_room_up_to_max_len():
    """Each row stops at its own limit; in regenerate a long prompt no longer shortens the answers
    of the short prompts batched with it."""
    m = tiny_target()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 5)]
    got = generate(m, prompts, [2, 7, 4], [])
    assert got == [_greedy_ref(m, p, n, []) for p, n in zip(prompts, (2, 7, 4))]
    with pytest.raises(ValueError, match="one per prompt"):
        generate(m, prompts, [2, 7], [])
    short = (np.array([5, 6, 7, 50, 51]), np.array([0, 0, 0, 1, 1], dtype=bool))
    long_ = (np.arange(40) % 200 + 3, np.array([0] * 38 + [1, 1], dtype=bool))
    (ids_s, _), (ids_l, _) = regenerate(m, [short, long_], batch_size=2, max_new=10, max_len=48,
                                       eos_ids=[], end_of_turn=[198])
    assert ids_s[3:] == _greedy_ref(m, [5, 6, 7], 10, [])          # the full 10, not 48 - 38 - 1 = 9
    assert len(ids_l) == 38 + 9                                     # the long one keeps within max_len


def test_sampled_generation_is_seeded():
    m = tiny_target()
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(m, prompts, 8, [], temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = generate(m, prompts, 8, [], temperature=1.0, generator=torch.Generator().manual_seed(0))
    c = generate(m, prompts, 8, [], temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert a == b and a != c


def test_regenerate_replaces_assistant_turns():
    m = tiny_target()
    tok = np.array([5, 6, 7, 50, 51, 52, 8, 9, 60, 61])
    msk = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1], dtype=bool)
    (ids, mask), = regenerate(m, [(tok, msk)], batch_size=2, max_new=4, max_len=64, eos_ids=[],
                              end_of_turn=[198], turns=2)
    assert ids[:3] == [5, 6, 7] and mask[:3] == [0, 0, 0]
    assert ids[3:] == _greedy_ref(m, [5, 6, 7], 4, []) and all(mask[3:])  # no EOS: turn 2 not asked


@pytest.mark.parametrize("turns", [1, 2])
def test_selfdistill_from_prompts_only_is_the_same(tmp_path, turns):
    """--prompts-out keeps what regenerate reads: self-distilling the reduced set gives the
    sequences that self-distilling the whole set gives, and the reduced set is smaller."""
    from train.selfdistill import run, write_prompts
    m = tiny_target()
    rng = np.random.default_rng(1)
    ids, masks = [], []
    for _ in range(5):   # system+user, answer, user, answer, user, answer
        lens = rng.integers(2, 6, 6)
        ids.append(rng.integers(1, 256, int(lens.sum())).tolist())
        masks.append(sum(([i % 2] * int(n) for i, n in enumerate(lens)), []))
    for split in ("train", "eval"):
        write_split(tmp_path / "src", split, ids, masks)
    write_prompts(str(tmp_path / "src"), str(tmp_path / "prompts"), turns)
    small = ShardData(tmp_path / "prompts", "train", batch_size=1)
    assert small.offsets[-1] < ShardData(tmp_path / "src", "train", batch_size=1).offsets[-1]
    kw = dict(batch_size=4, max_new=5, max_len=64, turns=turns)
    eos = list(range(1000))   # every token ends a turn, so the second turn is asked too
    assert run(m, eos, [198], str(tmp_path / "src"), str(tmp_path / "sd_full"), **kw)
    assert run(m, eos, [198], str(tmp_path / "prompts"), str(tmp_path / "sd_small"), **kw)
    for split in ("train", "eval"):
        a = ShardData(tmp_path / "sd_full", split, batch_size=1)
        b = ShardData(tmp_path / "sd_small", split, batch_size=1)
        assert a.n == b.n == 5
        for i in range(a.n):
            (ta, ma), (tb, mb) = a.sequence(i), b.sequence(i)
            assert ta.tolist() == tb.tolist() and ma.tolist() == mb.tolist()
            assert int(np.diff(ma.astype(int)).clip(min=0).sum()) == turns   # answers regenerated


# ---------------------------------------------------------------------------------------------
# losses

def test_medusa_targets_are_shifted():
    m = tiny_target()
    head = DraftConfig("medusa", 1, 3).build(m)
    B, T = 2, 9
    hidden = torch.randn(B, T, 64)
    teacher = torch.arange(T).float()[None, :, None].expand(B, T, 256)   # row value = position
    mask = torch.ones(B, T, dtype=torch.bool)
    for i, term in enumerate(medusa_terms(head, hidden, teacher, mask)):
        assert term.draft.shape[0] == B * (T - 2 - i)
        pos = torch.arange(T - 2 - i).repeat(B)
        assert torch.equal(term.teacher[:, 0], (pos + 1 + i).float())     # teacher z_{t+1+i}
        torch.testing.assert_close(term.cond, hidden[:, : T - 2 - i].reshape(-1, 64))
    v = medusa_valid(torch.tensor([[1, 1, 1, 0, 1]], dtype=torch.bool), 1)
    assert v.tolist() == [[False, True, False, False, False]]


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3-norms"])
def test_eagle_rollout_matches_drafting_with_cache(qk_norm):
    """Step 0 is the head's own forward; step 1 at u equals what the head computes when drafting:
    true features cached for positions < u, then its own step-0 feature fed back at u. With
    Qwen3's q/k norms the training rollout norms its heads as the cached decoder does."""
    m = tiny_target(qk_norm=qk_norm)
    head = DraftConfig("eagle", 2).build(m)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    T = 7
    tokens = torch.randint(0, 256, (1, T))
    feats = torch.randn(1, T, 64)
    outs = eagle_rollout(head, tokens, feats, 3)
    torch.testing.assert_close(outs[0], head(tokens, feats)[1])
    S = 16
    head.setup_cache(1, S)
    for u in range(2, T):
        sl = torch.arange(u - 1)                               # true features at 0..u-2
        head(tokens[:, : u - 1], feats[:, : u - 1], sl[None], sl, causal_mask(sl, S))
        f1 = outs[0][:, u - 2: u - 1]                          # step-0 output at u-2 feeds u-1
        s1 = torch.tensor([u - 1])
        _, o1 = head(tokens[:, u - 1: u], f1, s1[None], s1, causal_mask(s1, S))
        torch.testing.assert_close(o1, outs[1][:, u - 1: u], rtol=1e-5, atol=1e-5)
        s2 = torch.tensor([u])                                 # and step 2 at u feeds on step 1's
        _, o2 = head(tokens[:, u: u + 1], o1, s2[None], s2, causal_mask(s2, S))
        torch.testing.assert_close(o2, outs[2][:, u: u + 1], rtol=1e-5, atol=1e-5)
    assert rollout_mask(3, 1, "cpu").tolist() == [[0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1]]


def test_discriminator_shapes_and_layers():
    for k, n in ((1, 1), (2, 2), (3, 3), (5, 3)):
        assert fc_layers_for(k) == n
        d = Discriminator(64, 256, n, width=16)
        assert sum(isinstance(x, torch.nn.Linear) for x in d.fc) == n
        assert d(torch.randn(5, 64), torch.randn(5, 256)).shape == (5,)
    with pytest.raises(ValueError):
        Discriminator(64, 256, 4)


def test_discriminator_prob_inputs():
    """inputs="prob" reads softmax rows: same parameters, another function of the logits, and one
    that (unlike log-softmax) changes little when a far tail logit moves."""
    torch.manual_seed(0)
    a = Discriminator(64, 256, 2, width=16)
    b = Discriminator(64, 256, 2, width=16, inputs="prob")
    b.load_state_dict(a.state_dict())
    h, z = torch.randn(5, 64), torch.randn(5, 256)
    assert not torch.allclose(a(h, z), b(h, z))
    z2 = z.clone()
    z2[:, 0] = -60.0                                   # a tail token made far less likely
    da, db = (a(h, z2) - a(h, z)).abs().max(), (b(h, z2) - b(h, z)).abs().max()
    assert db < da
    with pytest.raises(ValueError, match="inputs"):
        Discriminator(64, 256, 1, inputs="logits")
    with pytest.raises(ValueError, match="disc_input"):
        TrainConfig(disc_input="raw")


# ---------------------------------------------------------------------------------------------
# training

@pytest.mark.parametrize("bad", [dict(lam=0.6), dict(lam=0.01), dict(lr=1e-3), dict(disc_lr=1e-6),
                                 dict(rollout=4), dict(layers=9), dict(kind="x")])
def test_config_validates(bad, tmp_path):
    with pytest.raises(ValueError):
        cfg_for(tmp_path, "d", **bad)


@pytest.fixture(scope="module")
def pattern_data(tmp_path_factory):
    """Arithmetic sequences (x_{t+1} = x_t + c mod 256): the tokens ahead are predictable, so the
    heads can learn to match the target's distributions there (on random tokens they cannot)."""
    rng = np.random.default_rng(0)
    def split(n):
        ids = []
        for _ in range(n):
            a, c, L = int(rng.integers(0, 256)), int(rng.integers(1, 4)), int(rng.integers(10, 33))
            ids.append([(a + c * i) % 256 for i in range(L)])
        return ids, [[0] * 3 + [1] * (len(x) - 3) for x in ids]
    root = tmp_path_factory.mktemp("pattern")
    write_split(root, "train", *split(32))
    write_split(root, "eval", *split(8))
    return str(root)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_loss_falls(kind, tmp_path, pattern_data):
    tr = Trainer(cfg_for(tmp_path, pattern_data, kind=kind, steps=40, warmup=2, eval_every=100),
                 target=tiny_target())
    before = [tr.batch_loss(s) for s in range(4)]
    s = tr.fit()
    after = [tr.batch_loss(s) for s in range(4)]
    assert s["status"] == "finished"
    # a Medusa head reading a 2-layer random target's hidden state has a high floor: 40 steps
    # give about -7.5% (the first steps barely move its zero-initialised blocks); EAGLE about -24%
    assert np.mean(after) < {"medusa": 0.95, "eagle": 0.85}[kind] * np.mean(before), (before, after)


def test_adversarial_step_updates_both(tmp_path, data):
    tr = Trainer(cfg_for(tmp_path, data, adversarial=True, lam=0.5), target=tiny_target())
    h0 = {k: v.clone() for k, v in tr.head.state_dict().items()}
    d0 = {k: v.clone() for k, v in tr.disc.state_dict().items()}
    rec = tr.train_step()
    for k in ("loss", "disc/loss", "adv/step0", "adv/step1", "disc/D_real", "disc/D_fake"):
        assert np.isfinite(rec[k]), k
    assert all(not torch.equal(h0[k], v) for k, v in tr.head.state_dict().items() if k.endswith("weight"))
    assert all(not torch.equal(d0[k], v) for k, v in tr.disc.state_dict().items())
    assert len(tr.disc.fc) == 3                                 # K=2 -> 2 FC layers (+ activation)


def test_checkpoint_round_trip_and_export(tmp_path, data):
    t = tiny_target()
    tr = Trainer(cfg_for(tmp_path, data, kind="medusa", adversarial=True, steps=4), target=t, target_name="tiny")
    s = tr.fit()
    assert s["status"] == "finished" and len(s["final_eval"]["eval/top1"]) == 4
    tr2 = Trainer(cfg_for(tmp_path, data, kind="medusa", adversarial=True, steps=4), target=t, resume=True)
    assert tr2.step == 4
    for a, b in ((tr.head, tr2.head), (tr.disc, tr2.disc)):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k])
    assert tr2.opt.state_dict()["state"].keys() == tr.opt.state_dict()["state"].keys()
    head = load_head(tmp_path / "run" / "head", t)
    for k, v in tr.head.state_dict().items():
        assert torch.equal(v, head.state_dict()[k])
    with pytest.raises(ValueError, match="settings differ"):
        Trainer(cfg_for(tmp_path, data, kind="medusa", adversarial=True, steps=4, lam=0.2), target=t, resume=True)
    # a checkpoint written before disc_input existed was trained with log-probability inputs
    ck = tmp_path / "run" / "checkpoint.pt"
    st = torch.load(ck, weights_only=False)
    del st["config"]["disc_input"]
    torch.save(st, ck)
    assert Trainer(cfg_for(tmp_path, data, kind="medusa", adversarial=True, steps=4), target=t, resume=True).step == 4
    with pytest.raises(ValueError, match="disc_input"):
        Trainer(cfg_for(tmp_path, data, kind="medusa", adversarial=True, steps=4, disc_input="prob"), target=t,
                resume=True)


def test_resume_after_kill_is_identical(tmp_path, data, monkeypatch):
    t = tiny_target()
    kw = dict(adversarial=True, steps=8, ckpt_every=3)
    full = Trainer(cfg_for(tmp_path / "a", data, **kw), target=t)
    full.fit()
    killed = Trainer(cfg_for(tmp_path / "b", data, **kw), target=t)
    orig = Trainer.train_step

    def dying(self):
        if self.step == 5:
            raise KeyboardInterrupt("killed")
        return orig(self)
    monkeypatch.setattr(Trainer, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    monkeypatch.setattr(Trainer, "train_step", orig)
    resumed = Trainer(cfg_for(tmp_path / "b", data, **kw), target=t, resume=True)
    assert resumed.step == 3                                    # the last interval: lost at most one
    resumed.fit()
    assert resumed.step == 8
    for a, b in ((full.head, resumed.head), (full.disc, resumed.disc)):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    assert [r["loss"] for r in full.history] == [r["loss"] for r in resumed.history]


@pytest.mark.gpu
def test_resume_on_cuda(tmp_path, data, monkeypatch):
    """A checkpoint written on the GPU resumes there (torch.load moves the saved RNG states to
    the GPU; they must go back to the CPU) and continues the same run."""
    t = tiny_target()
    kw = dict(adversarial=True, steps=6, ckpt_every=3)
    full = Trainer(cfg_for(tmp_path / "a", data, **kw), target=t, device="cuda")
    full.fit()
    killed = Trainer(cfg_for(tmp_path / "b", data, **kw), target=t, device="cuda")
    killed.fit(stop_after=4)                      # checkpoint at step 3, stopped at step 4
    resumed = Trainer(cfg_for(tmp_path / "b", data, **kw), target=t, device="cuda", resume=True)
    assert resumed.step == 4 and resumed.device.type == "cuda"
    resumed.fit()
    assert resumed.step == 6
    a, b = [r["loss"] for r in full.history], [r["loss"] for r in resumed.history]
    assert a == pytest.approx(b, rel=1e-4)       # GPU reductions may differ in the last bits


def test_divergence_guard_keeps_last_good(tmp_path, data, monkeypatch):
    import train.trainer as T
    t = tiny_target()
    tr = Trainer(cfg_for(tmp_path, data, steps=8, ckpt_every=3), target=t)
    orig = T.distill_sums

    def poisoned(term):
        kl, agree = orig(term)
        return (kl * float("nan") if tr.step == 5 else kl), agree
    monkeypatch.setattr(T, "distill_sums", poisoned)
    s = tr.fit()
    assert s["status"] == "diverged" and "last good checkpoint" in s["message"]
    assert tr.step == 3                                         # rolled back to the checkpoint
    ck = torch.load(tmp_path / "run" / CKPT, weights_only=False)
    head = load_head(tmp_path / "run" / "head", t)
    for k, v in ck["head"].items():
        assert torch.equal(v, head.state_dict()[k])
        assert torch.isfinite(v).all()


# ---------------------------------------------------------------------------------------------
# several processes

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_kw, result_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tr = Trainer(TrainConfig(**cfg_kw), target=tiny_target())
        tr.history.append(tr.train_step())
        grads = {n: p.grad.clone() for n, p in tr.head.named_parameters()}
        tr.fit()
        if rank == 0:
            torch.save({"head": tr.head.state_dict(), "disc": tr.disc.state_dict(), "grads": grads,
                        "loss": [r["loss"] for r in tr.history]}, os.path.join(result_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_equals_one_process(tmp_path, data):
    import torch.multiprocessing as mp
    kw = dict(data=data, out=str(tmp_path / "ddp"), kind="eagle", layers=1, batch_size=8, steps=4, warmup=1,
              adversarial=True, lam=0.3, lr=5e-4, disc_lr=5e-4, eval_every=100, ckpt_every=100,
              disc_tokens=64, disc_width=16, progress=False, autocast=False)   # fp32 on a GPU too
    mp.spawn(_ddp_worker, args=(2, _free_port(), kw, str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    one = Trainer(TrainConfig(**{**kw, "out": str(tmp_path / "one")}), target=tiny_target())
    one.history.append(one.train_step())
    for n, p in one.head.named_parameters():                   # the averaged gradient itself
        torch.testing.assert_close(ddp["grads"][n], p.grad, rtol=1e-4, atol=1e-6)
    one.fit()
    np.testing.assert_allclose(ddp["loss"], [r["loss"] for r in one.history], rtol=1e-5)
    for mod, key in ((one.head, "head"), (one.disc, "disc")):
        for k, v in mod.state_dict().items():
            torch.testing.assert_close(ddp[key][k], v, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(ddp["head"][k].cpu(), v) for k, v in DraftConfig("eagle", 1).build(tiny_target())
               .state_dict().items()), "training changed nothing"


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_fused_kl_step_equals_reference_step(tmp_path, data, monkeypatch, kind):
    """One adversarial training step with the fused distillation kernel (what CUDA runs; here under
    the Triton interpreter) gives the reference formula's loss, statistics and gradients."""
    import os
    import train.losses as L
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        pytest.skip("the fused kernel needs a GPU or TRITON_INTERPRET=1")
    runs = {}
    for backend in ("reference", "fused"):
        monkeypatch.setattr(L, "kl_backend", lambda device, b=backend: b)
        # fp32 on a GPU too (no bf16 autocast): this compares the formulas; the kernel's bf16
        # accuracy is tests/kernels/test_distill.py's business
        tr = Trainer(cfg_for(tmp_path / backend, data, kind=kind, adversarial=True, lam=0.3, autocast=False),
                     target=tiny_target())
        rec = tr.train_step()
        runs[backend] = (rec, {n: p.grad.clone() for n, p in tr.head.named_parameters() if p.grad is not None})
    (ra, ga), (rb, gb) = runs["reference"], runs["fused"]
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    for k in ra:
        if k.startswith(("kl/", "top1/")):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), k
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6)


def test_chunked_kl_equals_plain():
    from train.losses import _kl, kl_sum
    d = torch.randn(37, 50, requires_grad=True)
    t = torch.randn(37, 50)
    a = kl_sum(d, t, chunk=8)
    ga, = torch.autograd.grad(a, d)
    b = _kl(d, t)
    gb, = torch.autograd.grad(b, d)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    assert float(b.detach()) > 0


def test_selfdistill_run_writes_resumable_parts(tmp_path):
    from train.selfdistill import run
    m = tiny_target()
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 256, 12).tolist() for _ in range(6)]
    masks = [[0] * 5 + [1] * 7 for _ in ids]
    write_split(tmp_path / "src", "train", ids, masks)
    write_split(tmp_path / "src", "eval", ids[:2], masks[:2])
    assert run(m, [], [198], str(tmp_path / "src"), str(tmp_path / "sd"), batch_size=4, max_new=6, max_len=32,
               part_size=4)
    parts = sorted(p.name for p in (tmp_path / "sd" / "parts").iterdir())
    assert parts == ["eval-0000000.npz", "train-0000000.npz", "train-0000004.npz"]
    d = ShardData(tmp_path / "sd", "train", batch_size=2)
    assert d.n == 6
    meta = json.loads((tmp_path / "sd" / "meta.json").read_text())
    assert meta["train"] == {"sequences": 6, "tokens": 6 * 11, "train_tokens": 6 * 6}   # 5 prompt + 6 new
    assert meta["eval"]["sequences"] == 2
    for i in range(6):
        tok, msk = d.sequence(i)
        assert tok[:5].tolist() == ids[i][:5] and not msk[:5].any() and msk[5:].all()
        assert tok[5:].tolist() == _greedy_ref(m, ids[i][:5], 6, [])
    stamp = (tmp_path / "sd" / "parts" / parts[1]).stat().st_mtime_ns
    assert run(m, [], [198], str(tmp_path / "src"), str(tmp_path / "sd"), batch_size=4, max_new=6, max_len=32,
               part_size=4)
    assert (tmp_path / "sd" / "parts" / parts[1]).stat().st_mtime_ns == stamp   # done parts are kept
