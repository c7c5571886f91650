import pytest
import torch

from conftest import DEVICE, ON_GPU, assert_close_to_baseline, poison
from kernels import linear as L

# (M, N, K): both paths (GEMV at M <= 8, MMA above), odd sizes, K spanning several BLOCK_K
CASES = [(1, 77, 123), (2, 40, 300), (3, 37, 123), (9, 24, 64), (17, 24, 64)]
if ON_GPU:
    CASES += [(1, 576, 576), (8, 1728, 576), (64, 576, 1536), (1, 4096, 4096), (33, 3000, 4100)]
# (bias, residual, norm)
OPTS = [(False, False, False), (True, False, False), (False, True, True), (True, True, True)]


def _inputs(M, N, K, dtype, scale=1.0):
    x = torch.randn(M, K, device=DEVICE) * scale
    W = torch.randn(N, K, device=DEVICE) / K ** 0.5
    b = torch.randn(N, device=DEVICE) * 0.1
    r = torch.randn(M, N, device=DEVICE)
    nw = 1 + 0.2 * torch.randn(K, device=DEVICE)
    return [t.to(dtype) for t in (x, W, b, r, nw)]


def _run_linear(M, N, K, dtype, opts, config=None):
    has_b, has_r, has_n = opts
    x, W, b, r, nw = _inputs(M, N, K, dtype, scale=3.0)
    args = (b if has_b else None, r if has_r else None, nw if has_n else None, 1e-5)
    y = L.linear(x, W, *args, config=config)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    exact = L.linear_ref(x.double(), W.double(), *map(d, args[:3]), 1e-5)
    # the exact reference normalises x in fp64 without rounding it; the kernel (like the module)
    # rounds the normalised x to the test dtype, so the baseline is the module's own rounding
    assert_close_to_baseline(y, exact, L.linear_ref(x, W, *args), floor=1e-5,
                             what=f"linear M={M} N={N} K={K} {opts}")


@pytest.mark.parametrize("M,N,K", CASES)
@pytest.mark.parametrize("opts", OPTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference(M, N, K, opts, dtype):
    _run_linear(M, N, K, dtype, opts)


def _brackets(t, dtype):
    """The values of `dtype` just below and just above each fp64 value of t (both t itself where
    it is representable)."""
    r = t.to(dtype)
    rd = r.double()
    dn = torch.nextafter(r, torch.full_like(r, float("-inf"))).double()
    up = torch.nextafter(r, torch.full_like(r, float("inf"))).double()
    return torch.where(rd > t, dn, rd), torch.where(rd < t, up, rd)


def _assert_silu_in_rounding_envelope(y, x, W13, nw, eps, what):
    """bf16 linear_silu: each output must be what the kernel's documented numerics can give for
    some admissible rounding, derived element by element instead of from the reference's max error.

    The kernel sums gate g and up u in fp32 (any order: within gamma_K * sum|x w| of the exact
    sums), rounds each to bf16 (nearest, so a sum near a tie may go to either neighbour: both
    brackets are admitted), forms silu(g) * u in fp32 and rounds once. With the norm, x * rstd is
    rounded to bf16 before the weight; where the kernel's fp32 rstd (within (K + 8) fp32 ulps of
    the exact one) leaves x * rstd on either side of a rounding boundary, that element of x may
    differ by one bf16 step, and the sums' slack grows by its |w| times the step. Why not
    assert_close_to_baseline: a one-ulp flip of g or u moves silu(g) * u by up to ~1.5 output ulps,
    and whether PyTorch's reference happens to flip at the worst element decides its max error; a
    numpy model of a correct kernel (another fp32 order) failed 2 x that bound in 10 of 400 random
    draws at M = 1, I = 40, K = 123 (and the H200 in one: the case of this test's first row)."""
    K = x.shape[-1]
    u24 = 2.0 ** -24
    xd = x.double()
    slack_x = torch.zeros_like(xd)
    if nw is not None:
        rstd = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
        t = xd * rstd
        rel = (K + 8) * u24
        xn1 = t.to(x.dtype).double()
        lo_t, hi_t = (t * (1 - rel)).to(x.dtype).double(), (t * (1 + rel)).to(x.dtype).double()
        xn = (xn1 * nw.double()).to(x.dtype).double()
        near_tie = hi_t != lo_t                       # x * rstd may round either way
        # either neighbour of x * rstd, then times the weight and rounded again: one step of each
        alt = torch.maximum(((lo_t * nw.double()).to(x.dtype).double() - xn).abs(),
                            ((hi_t * nw.double()).to(x.dtype).double() - xn).abs())
        slack_x = torch.where(near_tie, alt, slack_x)
    else:
        xn = xd
    Wd = W13.double()
    gu = xn @ Wd.T
    gamma = K * u24 / (1 - K * u24)
    slack = gamma * (xn.abs() @ Wd.abs().T) + slack_x @ Wd.abs().T
    I = W13.shape[0] // 2
    (g, u), (sg, su) = gu.split(I, -1), slack.split(I, -1)
    g_lo, g_hi = _brackets(g - sg, y.dtype)[0], _brackets(g + sg, y.dtype)[1]
    u_lo, u_hi = _brackets(u - su, y.dtype)[0], _brackets(u + su, y.dtype)[1]
    g_min = torch.clamp(torch.full_like(g, -1.2784645427610738), g_lo, g_hi)   # silu's minimum
    silu = lambda v: v * torch.sigmoid(v)  # noqa: E731
    cand = torch.stack([silu(gv) * uv for gv in (g_lo, g_hi, g_min) for uv in (u_lo, u_hi)])
    lo, hi = cand.min(0).values, cand.max(0).values
    r32 = 2.0 ** -20                              # fp32 sigmoid (exp, divide) and two products
    lo = _brackets(lo - lo.abs() * r32, y.dtype)[0]
    hi = _brackets(hi + hi.abs() * r32, y.dtype)[1]
    yd = y.double()
    bad = (yd < lo) | (yd > hi) | ~torch.isfinite(yd)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {y.numel()} outputs outside their rounding "
                           f"envelope, e.g. {yd[bad][:3].tolist()} not in "
                           f"[{lo[bad][:3].tolist()}, {hi[bad][:3].tolist()}]")


def _check_silu(y, x, W13, nw, eps, what):
    """fp32: within 2x PyTorch's own error of the fp64 result; bf16: inside the rounding envelope
    (_assert_silu_in_rounding_envelope, whose docstring says why)."""
    if y.dtype == torch.bfloat16:
        _assert_silu_in_rounding_envelope(y, x, W13, nw, eps, what)
    else:
        d = None if nw is None else nw.double()
        exact = L.linear_silu_ref(x.double(), W13.double(), d, eps)
        assert_close_to_baseline(y, exact, L.linear_silu_ref(x, W13, nw, eps), floor=1e-5, what=what)


@pytest.mark.parametrize("use_dot,BM,BN,BK,ROWS", [(False, 1, 4, 32, 1), (False, 1, 4, 32, 2),
                                                   (True, 16, 16, 64, 1), (True, 32, 32, 32, 1)])
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_forced_configs(use_dot, BM, BN, BK, ROWS, M, dtype):
    # every path must be right at any M (the benchmark compares them), EVEN_K included (K=64);
    # ROWS=2 at M=5: three row groups, the last one half masked
    cfg = L.LinearConfig(use_dot, BM, BN, BK, ROWS=ROWS)
    _run_linear(M, 37, 64, dtype, (True, True, True), cfg)
    _run_linear(M, 37, 70, dtype, (False, False, True), cfg)


# Multi-row GEMV (ROWS rows per program). BK=32 < K: the prefetched first K block, then the loop
# re-read per row; odd N and K (EVEN_K False); N=9 at BN=4: a masked last column tile
GEMV_SMALL_K = L.LinearConfig(False, 1, 4, 32, 4, 1)


def _rows_config(M, base):
    """base with the ROWS _config gives M (M > 8: groups of 8, as koala.model's exact mode)."""
    return base._replace(ROWS=min(8, L.next_pow2(M)))


def test_gemv_config_tiles_do_not_depend_on_M(monkeypatch):
    # the bitwise promise below needs the same tiles at every M; exact mode reuses them for M > 8
    for N, K in ((576, 576), (1728, 576), (1536, 576), (576, 1536), (49152, 576), (11008, 4096), (77, 123)):
        one = L._config(1, N, K)
        assert not one.use_dot and one.ROWS == 1
        for M in range(2, 9):
            assert L._config(M, N, K) == one._replace(ROWS=L.next_pow2(M)), (M, N, K)
        assert L._config(9, N, K).use_dot
    # N = 576 (SmolLM2's wo and w2) still gives >= 2 programs per SM on the H100's 132
    assert 576 // L._config(8, 576, 576).BLOCK_N >= 2 * L.NUM_SMS_H100

    # exact mode's own tiles (no tiles file): a layer's W (L2-resident) gets one row per program;
    # the LM head's 8
    from koala.model import _Fast, _row_config
    monkeypatch.setattr(_Fast, "tiles", {})
    W, W13 = torch.empty(576, 1536, dtype=torch.bfloat16), torch.empty(2 * 1536, 576, dtype=torch.bfloat16)
    lm = torch.empty(49152, 576, dtype=torch.bfloat16)
    for M in (1, 3, 8, 9, 64, 128):
        assert _row_config(W, M) == L._config(1, 576, 1536)
        assert _row_config(W13, M, True) == L._config(1, 1536, 576)
        assert _row_config(lm, M) == L._config(1, 49152, 576)._replace(ROWS=min(8, L.next_pow2(M)))


@pytest.mark.parametrize("M", range(1, 10))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_rows_match_reference(M, dtype):
    # M <= 8: _config's own choice (one K block); then the small-K config at every M (M = 9: 8+1)
    if M <= 8:
        _run_linear(M, 11, 45, dtype, (True, True, True))
    _run_linear(M, 9, 70, dtype, [(False, False, False), (True, False, True), (False, True, True)][M % 3],
                _rows_config(M, GEMV_SMALL_K))


@pytest.mark.parametrize("M", [3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_silu_rows_match_reference(M, dtype):
    x, W13, _, _, nw = _inputs(M, 2 * 9, 70, dtype, scale=3.0)
    W13 = W13 * 2
    for cfg in (None, _rows_config(M, GEMV_SMALL_K)):
        y = L.linear_silu(x, W13, nw, 1e-5, config=cfg)
        _check_silu(y, x, W13, nw, 1e-5, f"linear_silu M={M} {cfg}")


def _assert_rows_bitwise_alone(M, N, K, dtype, silu, cfg_m, cfg_1):
    """Each row of an M-row call (config cfg_m) equals bitwise that row computed alone (cfg_1)."""
    x, W, b, r, nw = _inputs(M, 2 * N if silu else N, K, dtype, scale=3.0)
    if silu:
        call = lambda xs, rs, cfg: L.linear_silu(xs, W, nw, 1e-5, config=cfg)  # noqa: E731
    else:
        call = lambda xs, rs, cfg: L.linear(xs, W, b, rs, nw, 1e-5, config=cfg)  # noqa: E731
    r = r[:, :N]
    many = call(x, r, cfg_m)
    for i in range(M):
        one = call(x[i:i + 1], r[i:i + 1], cfg_1)
        assert torch.equal(many[i:i + 1], one), f"row {i} of M={M} N={N} K={K} {dtype} silu={silu}"


# (M, N, K): odd sizes (N=9 or 5 at BN=4: a masked column tile); M = 10: two row groups (exact
# mode's ROWS=8 over groups), the second one 3/4 masked
BITWISE = [(3, 9, 70), (10, 5, 70)]
if ON_GPU:
    BITWISE += [(M, N, K) for M in (2, 5, 8, 9, 20) for N, K in ((1728, 576), (576, 1536), (49152, 576),
                                                             (4096, 4100))]


@pytest.mark.parametrize("M,N,K", BITWISE)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_row_is_bitwise_the_same_alone(M, N, K, silu, dtype):
    # the property exact mode needs: a row's output does not depend on M or ROWS; with
    # _config's tiles (as koala.model._row_config picks them) and with several K blocks
    _assert_rows_bitwise_alone(M, N, K, dtype, silu, L._config(min(M, 8), N, K), None)
    if not ON_GPU or K <= 576:
        _assert_rows_bitwise_alone(M, N, K, dtype, silu, _rows_config(M, GEMV_SMALL_K), GEMV_SMALL_K)


# The row-tile path (vec): R rows in one (R, BLOCK_N, BLOCK_K) product. Small tiles on the CPU:
# K = 70 at BLOCK_K = 32 is three K blocks (the last masked), N = 9 at BLOCK_N = 4 a masked
# column tile, M = 10 at R = 4 three row tiles (the last half masked)
VEC_SMALL = [L.LinearConfig(False, 4, 4, 32, 4, 1, 1, True), L.LinearConfig(False, 2, 2, 128, 4, 1, 1, True)]


@pytest.mark.parametrize("M", [1, 3, 10])
@pytest.mark.parametrize("cfg", VEC_SMALL, ids=["R4", "R2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_tile_matches_reference(M, cfg, dtype):
    for opts in OPTS:
        _run_linear(M, 9, 70, dtype, opts, cfg)
    x, W13, _, _, nw = _inputs(M, 2 * 9, 70, dtype, scale=3.0)
    W13 = W13 * 2
    y = L.linear_silu(x, W13, nw, 1e-5, config=cfg)
    _check_silu(y, x, W13, nw, 1e-5, f"linear_silu M={M} {cfg}")


VEC_BITWISE = [(3, 9, 70, VEC_SMALL[0]), (10, 5, 70, VEC_SMALL[0]), (5, 9, 300, VEC_SMALL[1])]
if ON_GPU:   # SmolLM2's products with the tiles exact mode would use, R = 2, 4, 8
    VEC_BITWISE += [(M, N, K, L.vec_config(N, K, R, silu=N == 1536))
                    for R in (2, 4, 8) for M in (2, 5, 9) for N, K in ((960, 576), (576, 576), (1536, 576),
                                                                      (576, 1536), (49152, 576))]


@pytest.mark.parametrize("M,N,K,cfg", VEC_BITWISE)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_tile_row_is_bitwise_the_same_alone(M, N, K, cfg, silu, dtype):
    # exact mode with a row tile: the plain step (one row, in the tile's first slot, its other
    # rows masked) and a verify forward (the row in any slot of any tile) give the same bits
    _assert_rows_bitwise_alone(M, N, K, dtype, silu, cfg, cfg)


def test_vec_config_tiles():
    for N, K in ((960, 576), (576, 576), (576, 1536), (49152, 576), (77, 123)):
        for R in (2, 4, 8):
            for silu in (False, True):
                c = L.vec_config(N, K, R, silu)
                assert c.vec and c.BLOCK_M == R and c.ROWS == 1 and not c.use_dot
                assert R * c.BLOCK_N * c.BLOCK_K <= L.VEC_PRODUCTS // (2 if silu else 1) or c.BLOCK_K == 32
    assert 576 // L.vec_config(576, 576, 4).BLOCK_N >= 2 * L.NUM_SMS_H100
    with pytest.raises(ValueError, match="row tile"):
        L.vec_config(576, 576, 3)
    with pytest.raises(ValueError, match="vec"):
        x, W, *_ = _inputs(2, 8, 16, torch.float32)
        L.linear(x, W, config=L.LinearConfig(False, 4, 4, 32, 4, 1, 2, True))


def test_exact_mode_row_tile_config(monkeypatch):
    # KOALA_ROW_TILE=R (koala.model._Fast.row_tile): every exact-mode product, at every M, takes
    # the one row tile of R rows; 0 keeps the per-row programs
    from koala import model as Mdl
    W = torch.empty(576, 1536, dtype=torch.bfloat16)
    monkeypatch.setattr(Mdl._Fast, "row_tile", 4)
    monkeypatch.setattr(Mdl._Fast, "tiles", None)          # the shipped tiles name this shape: R wins
    for M in (1, 2, 5, 128):
        assert Mdl._row_config(W, M) == L.vec_config(576, 1536, 4)
    monkeypatch.setattr(Mdl._Fast, "row_tile", 0)
    monkeypatch.setattr(Mdl._Fast, "tiles", {})
    assert Mdl._row_config(W, 5) == L._config(1, 576, 1536)


def test_exact_mode_tiles_file(tmp_path, monkeypatch):
    # KOALA_EXACT_TILES: bench/linear_rows.py's `tiles` give exact mode its tile per product shape
    # (null keeps exact mode's own); a file without them is refused with what to do
    import json
    from koala import model as Mdl
    vec = L.vec_config(576, 1536, 2)
    gemv = L.LinearConfig(False, 1, 8, 1024, 1, 1, 4)
    f = tmp_path / "linear_rows.json"
    f.write_text(json.dumps({"tiles": [
        dict(op="w2+residual", N=576, K=1536, silu=False, config=vec._asdict()),
        dict(op="w13+norm+silu", N=1536, K=576, silu=True, config=gemv._asdict()),
        dict(op="wo+residual", N=576, K=576, silu=False, config=None)]}))
    monkeypatch.setenv("KOALA_EXACT_TILES", str(f))
    monkeypatch.setattr(Mdl._Fast, "tiles", None)
    monkeypatch.setattr(Mdl._Fast, "row_tile", 0)
    W2, W13, Wo = (torch.empty(576, 1536), torch.empty(2 * 1536, 576), torch.empty(576, 576))
    for M in (1, 3, 64):
        assert Mdl._row_config(W2, M) == vec
        assert Mdl._row_config(W13, M, silu=True) == gemv
        assert Mdl._row_config(Wo, M) == L._config(1, 576, 576)          # exact mode's own
    # every family a tiles file can name computes a row alike at any M (the exact-mode promise)
    _assert_rows_bitwise_alone(5, 9, 70, torch.bfloat16, False, gemv._replace(BLOCK_K=32), gemv._replace(BLOCK_K=32))
    f.write_text(json.dumps({"rows": []}))
    monkeypatch.setattr(Mdl._Fast, "tiles", None)
    with pytest.raises(ValueError, match="KOALA_EXACT_TILES.*point KOALA_EXACT_TILES at linear_rows.json, "
                                         "or set it to none"):
        Mdl._row_config(W2, 1)
    monkeypatch.setattr(Mdl._Fast, "tiles", None)


def test_exact_mode_default_tiles(monkeypatch):
    # unset, KOALA_EXACT_TILES gives exact mode the shipped koala/exact_tiles.json (swept on the
    # GPU for SmolLM2's shapes); "none" gives every shape exact mode's per-row programs
    import json
    from koala import model as Mdl
    shipped = json.loads(Mdl.DEFAULT_TILES.read_text())
    named = [e for e in shipped["tiles"] if e["config"] is not None]
    assert named and shipped["device"] and shipped["commit"]          # provenance travels with it
    assert shipped["arch"] == "sm_90"
    monkeypatch.setattr(Mdl._Fast, "row_tile", 0)
    monkeypatch.delenv("KOALA_EXACT_TILES", raising=False)
    # on a GPU of another architecture (or none) the tiles are untimed: exact mode keeps its own
    for arch in ("sm_80", None):
        monkeypatch.setattr(Mdl, "_cuda_arch", lambda arch=arch: arch)
        assert Mdl.exact_tiles() == {}
        assert Mdl.exact_tiles_source() is None          # what result files record
    monkeypatch.setattr(Mdl, "_cuda_arch", lambda: "sm_90")
    assert Mdl.exact_tiles_source() == "koala/exact_tiles.json"
    monkeypatch.setattr(Mdl._Fast, "tiles", None)
    for e in named:
        W = torch.empty(2 * e["N"] if e["silu"] else e["N"], e["K"])
        assert Mdl._row_config(W, 1, silu=e["silu"]) == L.LinearConfig(**e["config"])
        assert Mdl._row_config(W, 5, silu=e["silu"]) == L.LinearConfig(**e["config"])
    for off in ("none", "0"):
        monkeypatch.setenv("KOALA_EXACT_TILES", off)
        assert Mdl.exact_tiles_source() is None
        monkeypatch.setattr(Mdl._Fast, "tiles", None)
        for e in named:
            W = torch.empty(2 * e["N"] if e["silu"] else e["N"], e["K"])
            assert Mdl._row_config(W, 1, silu=e["silu"]) == L._config(1, e["N"], e["K"])._replace(ROWS=1)
    monkeypatch.setattr(Mdl._Fast, "tiles", None)


# An MMA tile of 16 rows (bench/linear_bench.py's inv_candidates): M = 17 is two row tiles, the
# second one masked but for one row; K = 70 at BLOCK_K = 32 is three K blocks, the last masked
INV_SMALL = L.LinearConfig(True, 16, 16, 32, 4, 2)


@pytest.mark.parametrize("M", [1, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mma_row_tile_matches_reference(M, dtype):
    _run_linear(M, 37, 70, dtype, [(False, False, False), (True, False, True), (False, True, True)][M % 3],
                INV_SMALL)
    x, W13, _, _, nw = _inputs(M, 2 * 9, 70, dtype, scale=3.0)
    y = L.linear_silu(x, W13, nw, 1e-5, config=INV_SMALL)
    _check_silu(y, x, W13, nw, 1e-5, f"linear_silu M={M} inv")


@pytest.mark.parametrize("M,I,K", [(1, 40, 123), (3, 24, 64), (2, 33, 70)])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_silu_matches_reference(M, I, K, norm, dtype):
    x, W13, _, _, nw = _inputs(M, 2 * I, K, dtype, scale=3.0)
    W13 = W13 * 2                                     # gate values of a few units: silu's curve
    nw = nw if norm else None
    y = L.linear_silu(x, W13, nw, 1e-5)
    _check_silu(y, x, W13, nw, 1e-5, f"linear_silu M={M} I={I} K={K}")


def test_norm_prologue_is_bit_identical_to_rmsnorm_then_linear():
    # the prologue rounds like koala.model.RMSNorm: fused == rms_norm_ref then the same kernel
    x, W, _, _, nw = _inputs(3, 20, 48, torch.bfloat16)
    fused = L.linear(x, W, norm_weight=nw, eps=1e-6)
    from kernels.rmsnorm import rms_norm_ref
    torch.testing.assert_close(fused, L.linear(rms_norm_ref(x, nw, 1e-6), W), atol=0, rtol=0)


def test_linear_leading_dims_strided_rows_and_static_output():
    B, T, K, N = 2, 3, 40, 24
    Wbig = torch.randn(3 * N, K + 8, device=DEVICE)
    W = Wbig[N:2 * N, :K]                             # a row slice of a fused weight, row stride K+8
    x = torch.randn(B, T, K + 5, device=DEVICE)[..., :K]
    r = torch.randn(B, T, N, device=DEVICE)
    y = L.linear(x, W, residual=r)
    assert y.shape == (B, T, N)
    torch.testing.assert_close(y, L.linear_ref(x, W, residual=r), atol=1e-4, rtol=1e-4)


def test_linear_writes_every_output():
    # outputs come from torch.empty: a NaN left anywhere would mean an unwritten tile
    x, W, b, r, nw = _inputs(5, 19, 33, torch.float32)
    y = L.linear(x, W, b, r, nw)
    assert torch.isfinite(y).all()
    poison(x[2:])                                     # rows are independent: row 0-1 unaffected
    y2 = L.linear(x, W, b, r, nw)
    torch.testing.assert_close(y2[:2], y[:2], atol=0, rtol=0)
    assert torch.isnan(y2[2:]).all()


def test_linear_empty_rows():
    x, W, *_ = _inputs(1, 8, 16, torch.float32)
    assert L.linear(x[:0], W).shape == (0, 8)


def test_linear_rejects_bad_inputs():
    x, W, b, r, nw = _inputs(2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="W has shape"):
        L.linear(x, W[:, :8])
    with pytest.raises(ValueError, match="dtype"):
        L.linear(x, W.to(torch.bfloat16))
    with pytest.raises(ValueError, match="residual has shape"):
        L.linear(x, W, residual=r[:1])
    with pytest.raises(ValueError, match="norm_weight"):
        L.linear(x, W, norm_weight=nw[:4])
    with pytest.raises(ValueError, match="unit stride"):
        L.linear(x, W.t().contiguous().t())
    with pytest.raises(ValueError, match="2\\*I"):
        L.linear_silu(x, W[:7])
