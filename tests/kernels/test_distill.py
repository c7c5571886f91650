import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close_to_baseline, max_err
from kernels.distill import BLOCK, fused_kl, kl_div_rows, kl_div_rows_ref

# vocabularies below, at and across the loop's block, odd sizes; SmolLM2's on the GPU
SHAPES = [(1, 5), (3, BLOCK), (4, BLOCK + 3), (5, 3 * BLOCK - 7)] + ([(64, 49152), (300, 4099)] if ON_GPU else [])


def _inputs(N, V, dtype, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    d = (torch.randn(N, V, generator=g) * scale).to(dtype)
    t = (torch.randn(N + 3, V, generator=g) * scale).to(dtype)
    rows = torch.randperm(N + 3, generator=g)[:N]
    return d.to(DEVICE), t.to(DEVICE), rows.to(DEVICE)


def _floor(d, t):
    """An absolute fp32 allowance for a KL: both log-sum-exps are rounded at the scale of the
    largest logit, and a shift of log q by delta moves the KL by delta."""
    return 4 * torch.finfo(torch.float32).eps * max(d.abs().max().item(), t.abs().max().item(), 1.0)


def _exact(d, t, rows):
    """fp64 truth: kl and its gradient q - p."""
    tt = t[rows].double()
    logq, logp = torch.log_softmax(d.double(), -1), torch.log_softmax(tt, -1)
    return (logp.exp() * (logp - logq)).sum(-1), logq.exp() - logp.exp()


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_rows_matches_reference(N, V, dtype):
    d, t, rows = _inputs(N, V, dtype, N * 7 + V)
    kl, g, agree = kl_div_rows(d, t, rows)
    kl_true, g_true = _exact(d, t, rows)
    # the reference in fp32 (what training ran before), and its gradient by autograd
    dr = d.clone().requires_grad_(True)
    kl_ref, agree_ref = kl_div_rows_ref(dr, t, rows)
    kl_ref.sum().backward()
    assert kl.dtype == torch.float32 and g.dtype == dtype and agree.dtype == torch.bool
    assert_close_to_baseline(kl, kl_true, kl_ref.detach(), floor=_floor(d, t), factor=4.0, what="kl")
    # the gradient is rounded to the draft's dtype by both; fp32 math before that differs only in
    # summation order, so allow the reference's own error plus one rounding step of the dtype
    # q = exp(d - lse_d) carries lse_d's rounding (fp32 eps at the largest logit's scale, see
    # _floor) as a relative error; the reference's softmax backward subtracts the max instead
    ulp = torch.finfo(dtype).eps * g_true.abs().max().item()
    lse_err = _floor(d, t) * g_true.abs().max().item()
    assert max_err(g, g_true) <= 2 * max_err(dr.grad, g_true) + ulp + lse_err + 1e-7
    assert torch.equal(agree, agree_ref)


def test_kl_rows_without_rows_and_on_views():
    d, t, _ = _inputs(6, BLOCK + 11, torch.float32, 3)
    t = t[:6]
    kl, _, agree = kl_div_rows(d, t, grad=False)
    kl_ref, agree_ref = kl_div_rows_ref(d, t)
    assert_close_to_baseline(kl, _exact(d, t, torch.arange(6, device=DEVICE))[0], kl_ref, floor=_floor(d, t), factor=4.0)
    assert torch.equal(agree, agree_ref)
    # evenly strided views (every other row of a wider buffer), as the trainer passes
    big = torch.randn(12, BLOCK + 11, device=DEVICE)
    kl2, _, _ = kl_div_rows(big[::2], big[1::2], grad=False)
    assert_close_to_baseline(kl2, _exact(big[::2], big[1::2], torch.arange(6, device=DEVICE))[0],
                             kl_div_rows_ref(big[::2], big[1::2])[0], floor=_floor(big, big), factor=4.0)


def test_kl_rows_agreement_ties_and_identical_rows():
    V = 2 * BLOCK + 5
    d = torch.zeros(3, V, device=DEVICE)
    t = torch.zeros(3, V, device=DEVICE)
    d[0, [7, BLOCK + 1]] = 5.0          # tie across blocks: argmax 7
    t[0, 7] = 5.0                       # -> agree
    d[1, [BLOCK + 1, 2 * BLOCK + 2]] = 5.0   # argmax BLOCK+1
    t[1, 2 * BLOCK + 2] = 5.0           # -> disagree
    t[2] = d[2] = torch.randn(V, device=DEVICE)   # identical rows: KL 0
    kl, g, agree = kl_div_rows(d, t)
    assert agree.tolist() == [True, False, True]
    assert torch.equal(agree, kl_div_rows_ref(d, t)[1])
    assert abs(kl[2].item()) < 1e-5 and g[2].abs().max().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kl_autograd(dtype):
    d, t, rows = _inputs(5, BLOCK + 9, dtype, 11)
    w = torch.rand(5, device=DEVICE)
    a = d.clone().requires_grad_(True)
    kl, agree = fused_kl(a, t, rows)
    (kl * w).sum().backward()
    b = d.clone().requires_grad_(True)
    kl_ref, _ = kl_div_rows_ref(b, t, rows)
    (kl_ref * w).sum().backward()
    assert a.grad.dtype == dtype
    g_true = _exact(d, t, rows)[1] * w.double()[:, None]
    ulp = torch.finfo(dtype).eps * g_true.abs().max().item()
    assert max_err(a.grad, g_true) <= 2 * max_err(b.grad, g_true) + 2 * ulp + 1e-7
    assert not agree.requires_grad


def test_kl_rows_rejects_bad_inputs():
    d = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="vocabularies differ"):
        kl_div_rows(d, torch.randn(3, 9, device=DEVICE))
    with pytest.raises(ValueError, match="teacher must have"):
        kl_div_rows(d, torch.randn(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="rows has"):
        kl_div_rows(d, torch.randn(4, 8, device=DEVICE), torch.arange(2, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        kl_div_rows(d, torch.randn(4, 8, device=DEVICE), torch.arange(3, device=DEVICE).float())
    with pytest.raises(ValueError, match="unit stride"):
        kl_div_rows(torch.randn(8, 3, device=DEVICE).t(), torch.randn(3, 8, device=DEVICE))
    with pytest.raises(ValueError, match="must not require grad"):
        fused_kl(d, torch.randn(3, 8, device=DEVICE, requires_grad=True))
