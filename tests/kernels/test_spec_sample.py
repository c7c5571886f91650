"""kernels/spec_sample.py against its PyTorch reference: the same accepted length and bonus token
from the same logits, draft probabilities, uniforms and exponential noise."""
import pytest
import torch

from conftest import DEVICE, ON_GPU
from kernels.spec_sample import BLOCK, accept_sampling_chain, accept_sampling_chain_ref

SHAPES = [(1, 7), (2, 5), (2, BLOCK), (4, BLOCK + 3), (9, 3 * BLOCK - 5)] + \
    ([(2, 49152), (9, 49152), (17, 152064)] if ON_GPU else [])


def _case(N, V, dtype, seed, temperature=0.8, closeness=0.7):
    """A chain whose drafts come from a q near p, so that acceptances run to every length."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 2).to(dtype)
    T = torch.tensor(temperature)
    p = torch.softmax(logits.float() / T, -1)
    q = torch.softmax((logits.float() + torch.randn(N, V, generator=g) * closeness) / T, -1)
    tokens = torch.cat([torch.randint(0, V, (1,), generator=g),
                        torch.multinomial(q[: N - 1], 1, generator=g).view(-1)]) if N > 1 else \
        torch.randint(0, V, (1,), generator=g)
    u = torch.rand(N + 3, 2, generator=g)[:, 0]                         # a strided view, as the decoder's
    noise = torch.empty(V).exponential_(generator=g).clamp_min_(1e-30)
    return [t.to(DEVICE) for t in (logits, q, tokens, u, noise, T)], p


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_reference_at_every_accepted_length(N, V, dtype):
    seen = set()
    for seed in range(12):
        # drafts from a q near p and from one far from it: acceptances end at every level
        args, _ = _case(N, V, dtype, seed * 31 + N, closeness=0.3 if seed % 2 else 3.0)
        a, b = accept_sampling_chain(*args)
        ra, rb = accept_sampling_chain_ref(*args)
        assert a.dtype == b.dtype == torch.int64 and a.shape == b.shape == ()
        assert (int(a), int(b)) == (int(ra), int(rb)), seed
        assert 0 <= int(a) <= N - 1 and 0 <= int(b) < V
        seen.add(int(a))
    if N in (2, 4):                                       # both ends reached, so both branches ran
        assert {0, N - 1} <= seen, seen


def test_a_vanished_residual_draws_from_p():
    # q >= p everywhere (q = p up to a margin above the kernel's rounding of p) and the drafted
    # token has probability 0 under both: rejected, and the residual max(0, p - q) is all zero
    V = BLOCK + 9
    args, _ = _case(2, V, torch.float32, 5)
    logits, q, tokens, u, noise, T = args
    logits[0, 3] = float("-inf")
    q[0] = torch.softmax(logits[0].float() / T, -1) * 1.001
    tokens[1] = 3
    a, b = accept_sampling_chain(logits, q, tokens, u, noise, T)
    assert int(a) == 0
    assert int(b) == int((torch.softmax(logits[0].float() / T, -1) / noise).argmax())
    assert (int(a), int(b)) == tuple(int(x) for x in accept_sampling_chain_ref(*args))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_is_read_from_the_device_tensor(temperature):
    args, _ = _case(4, BLOCK + 100, torch.float32, 9, temperature)
    got = accept_sampling_chain(*args)
    assert tuple(map(int, got)) == tuple(map(int, accept_sampling_chain_ref(*args)))


def test_acceptance_frequency_is_min_one_p_over_q():
    # one level, one fixed draft token: accepted with probability min(1, p/q) over the uniforms
    V = 64
    args, p = _case(2, V, torch.float32, 3, closeness=1.5)
    logits, q, tokens, _, noise, T = args
    x = int(tokens[1])
    want = min(1.0, float(p[0, x] / q[0, x].cpu()))
    runs = 400
    g = torch.Generator().manual_seed(0)
    acc = sum(int(accept_sampling_chain(logits, q, tokens, torch.rand(1, generator=g).to(DEVICE), noise, T)[0])
              for _ in range(runs))
    assert abs(acc / runs - want) < 4 * (want * (1 - want) / runs) ** 0.5 + 1e-9


def test_out_buffers_and_bad_inputs():
    args, _ = _case(3, 40, torch.float32, 1)
    a_out = torch.full((), -1, dtype=torch.int64, device=DEVICE)
    b_out = torch.full((), -1, dtype=torch.int64, device=DEVICE)
    a, b = accept_sampling_chain(*args, a_out=a_out, bonus_out=b_out)
    assert a is a_out and b is b_out and int(a) >= 0
    logits, q, tokens, u, noise, T = args
    with pytest.raises(ValueError, match="shapes disagree"):
        accept_sampling_chain(logits, q[:, :30], tokens, u, noise, T)
    with pytest.raises(ValueError, match="dtype"):
        accept_sampling_chain(logits, q.double(), tokens, u, noise, T)
    with pytest.raises(ValueError, match="one value"):
        accept_sampling_chain(logits, q, tokens, u, noise, torch.ones(2, device=DEVICE))


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draft_logits_give_what_their_probabilities_give(N, V, dtype):
    """q_logits=True: the kernel softmaxes the draft's logits itself. Against its reference, and
    against the probability form given softmax(q_logits / T) (the decisions of both agree)."""
    seen = set()
    for seed in range(10):
        g = torch.Generator().manual_seed(seed * 17 + N)
        args, _ = _case(N, V, dtype, seed * 29 + N, closeness=0.3 if seed % 2 else 3.0)
        logits, _, tokens, u, noise, T = args
        ql = ((logits.float().cpu() + torch.randn(N, V, generator=g) * (0.3 if seed % 2 else 3.0))
              .to(dtype).to(DEVICE))[: max(N - 1, 0)]
        q = torch.softmax(ql.float() / T, -1)
        x = torch.multinomial(q.cpu(), 1, generator=g).view(-1).to(DEVICE) if N > 1 else tokens[:0]
        tokens = torch.cat([tokens[:1], x])
        a, b = accept_sampling_chain(logits, ql, tokens, u, noise, T, q_logits=True)
        ra, rb = accept_sampling_chain_ref(logits, ql, tokens, u, noise, T, q_logits=True)
        assert (int(a), int(b)) == (int(ra), int(rb)), seed
        pa, pb = accept_sampling_chain(logits, q.contiguous(), tokens, u, noise, T)
        assert (int(a), int(b)) == (int(pa), int(pb)), seed
        seen.add(int(a))
    if N in (2, 4):
        assert {0, N - 1} <= seen, seen


def _vocab_case(N, V, Vq, dtype, seed):
    """A draft over Vq of the V tokens (ascending ids): its logits (N-1, Vq), the map q_ids (V,),
    and a chain drawn from it."""
    g = torch.Generator().manual_seed(seed)
    args, _ = _case(N, V, dtype, seed, closeness=0.3 if seed % 2 else 3.0)
    logits, _, tokens, u, noise, T = args
    ids = torch.randperm(V, generator=g)[:Vq].sort().values
    q_ids = torch.full((V,), -1, dtype=torch.int32)
    q_ids[ids] = torch.arange(Vq, dtype=torch.int32)
    # the target's mass mostly on the subset too (else no chain is ever accepted whole)
    logits = logits.float().cpu().index_add_(1, ids, torch.full((N, Vq), 4.0)).to(dtype).to(DEVICE)
    # near the target's own logits on the subset, so that runs of acceptances happen
    ql = (logits.float().cpu()[: max(N - 1, 0)][:, ids] + torch.randn(max(N - 1, 0), Vq, generator=g)).to(dtype)
    q = torch.softmax(ql.float() / T.cpu(), -1)
    x = ids[torch.multinomial(q, 1, generator=g).view(-1)] if N > 1 else tokens[:0].cpu()
    tokens = torch.cat([tokens[:1], x.to(DEVICE)])
    q_full = torch.zeros(max(N - 1, 0), V).index_copy_(1, ids, q)
    return (logits, tokens, u, noise, T), ql.to(DEVICE), q.to(DEVICE), q_full.to(DEVICE), q_ids.to(DEVICE)


@pytest.mark.parametrize("N,V,Vq", [(2, 37, 11), (4, BLOCK + 3, 700), (5, 3 * BLOCK - 5, BLOCK + 1), (3, 40, 40)]
                         + ([(9, 49152, 8192)] if ON_GPU else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_draft_vocabulary_read_through_its_map(N, V, Vq, dtype):
    """q_ids: q over a draft vocabulary, read through the token -> column map, in both forms,
    against the reference and against the same q scattered onto all V tokens (zero elsewhere)."""
    seen = set()
    for seed in range(10):
        (logits, tokens, u, noise, T), ql, q, q_full, q_ids = _vocab_case(N, V, Vq, dtype, seed * 13 + N)
        full = tuple(map(int, accept_sampling_chain(logits, q_full, tokens, u, noise, T)))
        for form, qq in ((True, ql), (False, q)):
            got = tuple(map(int, accept_sampling_chain(logits, qq, tokens, u, noise, T, q_logits=form, q_ids=q_ids)))
            ref = tuple(map(int, accept_sampling_chain_ref(logits, qq, tokens, u, noise, T, q_logits=form,
                                                           q_ids=q_ids)))
            assert got == ref == full, (seed, form)
        seen.add(full[0])
    if N in (2, 4):
        assert {0, N - 1} <= seen, seen


def test_a_draft_vocabulary_map_is_checked():
    (logits, tokens, u, noise, T), ql, _, _, q_ids = _vocab_case(3, 40, 11, torch.float32, 2)
    with pytest.raises(ValueError, match="q_ids"):
        accept_sampling_chain(logits, ql, tokens, u, noise, T, q_logits=True, q_ids=q_ids.long())
    with pytest.raises(ValueError, match="q_ids"):
        accept_sampling_chain(logits, ql, tokens, u, noise, T, q_logits=True, q_ids=q_ids[:30])
    wide = torch.zeros(2, 41, device=DEVICE)
    with pytest.raises(ValueError, match="1 to V"):
        accept_sampling_chain(logits, wide, tokens, u, noise, T, q_logits=True, q_ids=q_ids)
