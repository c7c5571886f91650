"""Programmatic Dependent Launch (kernels/_common.py): every kernel gives the same bits with PDL on
and off, launched eagerly and replayed from a captured CUDA graph, in chains of dependent
launches (each reads the previous one's output, so a missing or late gdc_wait shows as a race).
The GPU tests need sm_90+; the switch's own tests run anywhere."""
import pytest
import torch

from conftest import DEVICE
from kernels import _common
from kernels._common import pdl, pdl_enabled, pdl_supported, set_pdl
from kernels import accept as A
from kernels import linear as L
from kernels import medusa as MD
from kernels import rmsnorm as RN
from kernels import rope_cache as RC
from kernels import swiglu as SW
from kernels import tree_attention as TA

needs_pdl = pytest.mark.skipif(not pdl_supported(), reason="PDL needs CUDA sm_90+, not the interpreter")
REPLAYS = 5


def test_switch_off_under_interpreter_and_env(monkeypatch):
    try:
        monkeypatch.setenv("KOALA_PDL", "0")
        set_pdl(None)
        assert pdl() is False
        with pdl_enabled(True):                        # forcing never enables unsupported PDL
            assert pdl() is pdl_supported()
        assert pdl() is False and _common._PDL_FORCED is None
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("KOALA_PDL", "1")
        set_pdl(None)
        assert pdl() is False
    finally:
        monkeypatch.undo()
        set_pdl(None)


def _run(make, graph):
    """make() builds inputs (seeded) and returns step(), which launches the chain and returns its
    outputs. Returns {pdl_on: [outputs of each run]}: one eager run, or REPLAYS graph replays."""
    res = {}
    for on in (False, True):
        with pdl_enabled(on):
            assert pdl() is on
            torch.manual_seed(0)
            step = make()
            if not graph:
                res[on] = [[t.clone() for t in step()]]
                continue
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step()                                 # compile outside the capture
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs = step()
            runs = []
            for _ in range(REPLAYS):
                g.replay()
                runs.append([t.clone() for t in outs])
            res[on] = runs
    torch.cuda.synchronize()
    return res


def _check(make, graph):
    res = _run(make, graph)
    ref = res[False][0]
    for on in (False, True):
        for i, outs in enumerate(res[on]):
            for j, (a, b) in enumerate(zip(outs, ref)):
                assert a.shape == b.shape and a.dtype == b.dtype
                if a.dtype.is_floating_point:
                    assert torch.isfinite(a.float()).all(), f"pdl={on} run {i} output {j}: non-finite"
                assert torch.equal(a, b), (f"pdl={on} run {i} output {j}: differs from PDL off "
                                           f"(max diff {(a.double() - b.double()).abs().max().item():.3g})")
    return res


def _w(*shape, dtype):
    return (torch.randn(*shape, device=DEVICE) / shape[-1] ** 0.5).to(dtype)


def _nw(K, dtype):
    return (1 + 0.2 * torch.randn(K, device=DEVICE)).to(dtype)


def _layers_chain(M, dtype, layers=3, D=576, I=1536, QKV=1728):
    """SmolLM2-shaped decoder MLP/attention projections, `layers` times: qkv (norm), wo on the
    first D columns of qkv (residual), w13 (norm, silu), w2 (residual). 4 launches a layer, each
    reading the previous output; M <= 2 runs the GEMV path, M > 2 the MMA path."""
    def make():
        x = torch.randn(M, D, device=DEVICE).to(dtype)
        ws = [(_w(QKV, D, dtype=dtype), _nw(D, dtype), _w(D, D, dtype=dtype), _w(2 * I, D, dtype=dtype),
               _nw(D, dtype), _w(D, I, dtype=dtype), (0.1 * torch.randn(QKV, device=DEVICE)).to(dtype))
              for _ in range(layers)]

        def step():
            h = x
            outs = []
            for i, (wqkv, n1, wo, w13, n2, w2, b) in enumerate(ws):
                qkv = L.linear(h, wqkv, b if i == 1 else None, norm_weight=n1)
                h = L.linear(qkv[:, :D], wo, residual=h)
                a = L.linear_silu(h, w13, n2)
                h = L.linear(a, w2, residual=h)
                outs += [qkv, a, h]
            return outs
        return step
    return make


@pytest.mark.gpu
@needs_pdl
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("M", [1, 2, 8, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_chain(M, dtype, graph):
    _check(_layers_chain(M, dtype), graph)


@pytest.mark.gpu
@needs_pdl
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_linear_gemv_multi_k_blocks(graph):
    # an LM-head-like GEMV (K spans several BLOCK_K: the prefetched first block, then the loop),
    # odd K (EVEN_K False), bias; then a GEMV reading its output
    def make():
        x = torch.randn(1, 4100, device=DEVICE).to(torch.bfloat16)
        W1, b1, n1 = _w(8192, 4100, dtype=torch.bfloat16), _w(8192, dtype=torch.bfloat16), _nw(4100, torch.bfloat16)
        W2, W3 = _w(4100, 8192, dtype=torch.bfloat16), _w(3000, 4100, dtype=torch.bfloat16)

        def step():
            y1 = L.linear(x, W1, b1, norm_weight=n1)
            y2 = L.linear(y1, W2, residual=x)
            y3 = L.linear(y2, W3, norm_weight=n1)
            return [y1, y2, y3]
        return step
    assert not L._config(1, 8192, 4100).use_dot and L._config(1, 8192, 4100).BLOCK_K < 4100
    _check(make, graph)


@pytest.mark.gpu
@needs_pdl
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_rmsnorm_swiglu_chain(graph):
    def make():
        D, I = 576, 1536
        x = torch.randn(2, D, device=DEVICE).to(torch.bfloat16)
        w1, w2, w3 = (_nw(D, torch.bfloat16) for _ in range(3))
        W13, W2 = _w(2 * I, D, dtype=torch.bfloat16), _w(D, I, dtype=torch.bfloat16)

        def step():
            y = RN.rms_norm(x, w1, 1e-5)
            s, z = RN.add_rms_norm(y, x, w2, 1e-5)
            a = SW.silu_mul(L.linear(z, W13))
            u = RN.rms_norm(L.linear(a, W2, residual=s), w3, 1e-5)
            return [y, s, z, a, u]
        return step
    _check(make, graph)


def _attention_layer(T, n_splits, S=256, prefix=100):
    """qkv GEMV/MMA -> RoPE + cache write -> tree attention (split or single) -> (torch copy)
    -> wo with residual: SmolLM2's head layout (9 q heads, 3 kv heads, hd 64)."""
    h, nkv, hd, D = 9, 3, 64, 576

    def make():
        dt = torch.bfloat16
        x = torch.randn(1, T, D, device=DEVICE).to(dt)
        wqkv, n1, wo = _w((h + 2 * nkv) * hd, D, dtype=dt), _nw(D, dt), _w(D, D, dtype=dt)
        k0 = torch.randn(1, nkv, S, hd, device=DEVICE).to(dt)
        v0 = torch.randn(1, nkv, S, hd, device=DEVICE).to(dt)
        kc, vc = k0.clone(), v0.clone()
        pos = torch.arange(prefix, prefix + T, device=DEVICE)
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=DEVICE).float() / hd))
        ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)
        cos, sin = ang.cos()[None].to(dt), ang.sin()[None].to(dt)
        mask = torch.zeros(1, T, S, dtype=torch.bool, device=DEVICE)
        mask[:, :, :prefix] = True
        mask[0, :, prefix:prefix + T] = torch.tril(torch.ones(T, T, dtype=torch.bool, device=DEVICE))
        kv_len = torch.tensor([prefix + T], device=DEVICE, dtype=torch.int32)

        def step():
            kc.copy_(k0)                                   # a torch op between PDL kernels
            vc.copy_(v0)
            qkv = L.linear(x, wqkv, norm_weight=n1)
            q = RC.rope_and_cache_write(qkv, cos, sin, pos, kc, vc, h, nkv)
            o = TA.tree_attention(q, kc, vc, mask, kv_len, n_splits=n_splits)
            y = L.linear(o.transpose(1, 2).reshape(1, T, h * hd), wo, residual=x)
            return [qkv, q, kc, vc, o, y]
        return step
    return make


@pytest.mark.gpu
@needs_pdl
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("T,n_splits", [(1, None), (1, 1), (6, 4)])
def test_rope_attention_chain(T, n_splits, graph):
    _check(_attention_layer(T, n_splits), graph)


@pytest.mark.gpu
@needs_pdl
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_accept_compact_chain(graph):
    # a tree of 7 nodes (0 -> 1 -> 3 -> 5, 1 -> 4, 0 -> 2 -> 6); the target's choices come from a
    # GEMV's argmax (a torch op), accept_greedy -> compact_kv over 4 caches -> attention over them
    parents = torch.tensor([-1, 0, 0, 1, 1, 3, 2], device=DEVICE)
    depth = torch.tensor([0, 1, 1, 2, 2, 3, 2], device=DEVICE)
    nkv, S, hd, L0 = 3, 64, 64, 20

    def make():
        draft = torch.tensor([0, 5, 9, 7, 2, 4, 1], device=DEVICE)
        # logits whose argmax at nodes 0, 1, 3 names their child's token: path 0-1-3-5 accepted
        x = torch.randn(7, 32, device=DEVICE)
        W = _w(16, 32, dtype=torch.float32)
        boost = torch.zeros(7, 16, device=DEVICE)
        boost[0, 5] = boost[1, 7] = boost[3, 4] = 100.0
        c0 = [torch.randn(1, nkv, S, hd, device=DEVICE).to(torch.bfloat16) for _ in range(4)]
        caches = [c.clone() for c in c0]
        table = A.make_cache_table(caches)
        q = torch.randn(1, 3 * nkv, 1, hd, device=DEVICE).to(torch.bfloat16)
        mask = torch.ones(1, 1, S, dtype=torch.bool, device=DEVICE)
        prefix = torch.tensor(L0, device=DEVICE)   # a device tensor: graph capture cannot copy a host int

        def step():
            for c, c_ in zip(caches, c0):
                c.copy_(c_)
            target = (L.linear(x, W) + boost).argmax(-1)
            n_acc, path, bonus, toks = A.accept_greedy(draft, parents, depth, target, 3)
            A.compact_kv(table, path, n_acc, prefix)
            o = TA.tree_attention(q, caches[0], caches[1], mask)
            return [target, n_acc, path, bonus, toks, o] + caches
        return step
    res = _check(make, graph)
    assert int(res[True][0][1]) == 3                      # the chain is accepted: compaction moved rows


@pytest.mark.gpu
@needs_pdl
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("M,K", [(1, 4), (5, 3)])
def test_medusa_chain(M, K, graph):
    # K >= 3 layers: layer k+2 overwrites the scratch layer k+1 reads (a store that must wait)
    H, D, V = 4, 576, 2048

    def make():
        dt = torch.bfloat16
        x = torch.randn(M, D, device=DEVICE).to(dt)
        Win, W = _w(D, D, dtype=dt), _w(H, K, D, D, dtype=dt)
        b, Wlm = (0.1 * torch.randn(H, K, D, device=DEVICE)).to(dt), _w(V, D, dtype=dt)

        def step():
            y = L.linear(x, Win, residual=x)
            r = MD.medusa_resblocks(y, W, b)
            return [y, r, L.linear(r[0], Wlm), L.linear(r[H - 1], Wlm)]
        return step
    _check(make, graph)
