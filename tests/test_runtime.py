"""The runtime against the reference, transformers, on tiny random configs of each architecture."""
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
