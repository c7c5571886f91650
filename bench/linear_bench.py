"""kernels/linear.py against the ops it replaces, under CUDA-graph replay (issue 5).

    PYTHONPATH=. python3 bench/linear_bench.py            # on the H100, about 1 minute
    PYTHONPATH=. python3 bench/linear_bench.py --sweep    # + other tile configs, a few minutes
    PYTHONPATH=. python3 bench/linear_bench.py --only smollm2 --ms 1,2,4,5,8   # verify sizes

Per row (bf16, M = 1, 2, 4, 5, 8, 64 rows by default: decode, chain verification of depth
M - 1 through the multi-row GEMV, a tree through the MMA path), microseconds per call, each the
median of 20 replays of one CUDA graph holding n calls, divided by n:
  * kernel_us: linear / linear_silu with the fused norm, residual or SiLU; the config column
    is _config's choice (gemv BLOCK_M x BLOCK_N x BLOCK_K and ROWS, rows per program).
  * runtime_us: what koala.model's fused path runs above SMALL_M (non-exact mode): Triton
    rms_norm + cuBLAS F.linear (addmm for the residual) + Triton silu_mul; 1 to 3 launches.
  * cublas_us: the GEMM alone (F.linear, or addmm with the residual).
  * exact_us: the kernel with exact mode's tiles (koala.model._row_config: a row's bits do not
    depend on M).
  * kernel_l2_us: the kernel on one W 20 times (W stays in the 50 MB L2); the others rotate over
    enough copies of W (>= 150 MB in all) that every call reads W from HBM, as a decode step does
    (SmolLM2's 270 MB of weights do not fit in L2).
GB/s = bytes the kernel must move (W, x, output, residual, norm weight) / kernel_us, against the
3.0 TB/s copy ceiling. Every input is allocated before the first capture (torch.randn during or
after a failed capture corrupts the RNG's graph state); a row whose capture fails is recorded
with its error and skipped. Results: $OUT/linear.json when OUT is set, else bench/results/.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    sys.exit("linear_bench.py needs a CUDA GPU (the kernels' CPU path is the Triton interpreter)")

from bench.common import write  # noqa: E402
from kernels._common import next_pow2  # noqa: E402
from kernels.linear import LinearConfig, _config, linear, linear_silu  # noqa: E402
from koala.model import _row_config  # noqa: E402
from kernels.rmsnorm import rms_norm  # noqa: E402
from kernels.swiglu import silu_mul  # noqa: E402

DEV = "cuda"
DT = torch.bfloat16
EPS = 1e-5
CEILING_GBS = 3000.0
COLD_BYTES = 150e6          # weight copies per row: 3x the H100's 50 MB L2
MS = (1, 2, 4, 5, 8, 64)  # default --ms
# (model, op, K, N, kind): N is the output width (I for silu, whose weight is (2I, K))
OPS = [
    ("smollm2", "wqkv+norm", 576, 960, "norm"),     # 9 query + 2 x 3 kv heads of 64
    ("smollm2", "wo+residual", 576, 576, "residual"),
    ("smollm2", "w13+norm+silu", 576, 1536, "silu"),
    ("smollm2", "w2+residual", 1536, 576, "residual"),
    ("smollm2", "lm_head", 576, 49152, "plain"),
    ("7b", "wqkv+norm", 4096, 12288, "norm"),
    ("7b", "wo+residual", 4096, 4096, "residual"),
    ("7b", "w13+norm+silu", 4096, 11008, "silu"),
    ("7b", "w2+residual", 11008, 4096, "residual"),
]


def graph_us(fn, Ws, n_calls: int) -> float:
    """Median GPU time per call of a graph holding n_calls calls fn(Ws[i % len(Ws)])."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                   # compile and cuBLAS set-up off-capture
        for _ in range(2):
            fn(Ws[0])
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_calls):
            fn(Ws[i % len(Ws)])
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n_calls)
    del g
    times.sort()
    return times[len(times) // 2]


def timed(row: dict, key: str, fn, Ws, n_calls: int):
    try:
        row[key] = graph_us(fn, Ws, n_calls)
    except Exception as e:                       # recorded and printed, never hidden
        row[key] = None
        row[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"    {key} failed: {row[key + '_error']}", flush=True)
        try:
            torch.cuda.synchronize()
        except Exception:
            pass


def inv_candidates(N: int, K: int) -> list[LinearConfig]:
    """Batch-invariant MMA tiles, the alternative to exact mode's GEMV: BLOCK_M = 16 whatever M
    is; one K block up to 1024, or blocks of 128 or 256 (2 stages); 4 or 8 warps; BLOCK_N 16 or
    32 (and 64 for N >= 16384). Slower than the GEMV on the H100 at M = 1, 5 and 16
    (bench/results/linear_mma_sweep.json, timed with a variant of the MMA path that loaded its
    first K block before the PDL wait)."""
    out = []
    for bn in (16, 32, 64) if N >= 16384 else (16, 32):
        for bk in sorted({min(next_pow2(K), 1024), 256, 128}):
            for w in (4, 8):
                out.append(LinearConfig(True, 16, bn, min(bk, next_pow2(K)), w, 1 if bk >= K else 2))
    return list(dict.fromkeys(out))


def candidates(M: int, N: int, K: int) -> list[LinearConfig]:
    """Alternatives to _config for --sweep: GEMV at several BLOCK_N and ROWS (any M: ROWS=1
    spreads the rows over programs, each re-reading W from L2, and is bitwise what M=1 gives),
    MMA tile shapes at BLOCK_M = 16 (a tile that does not depend on M) and at _config's BLOCK_M."""
    out = []
    for rows in sorted({1, 2, min(8, next_pow2(M))}):
        if rows > next_pow2(M):
            continue
        for bn in (1, 2, 4, 8, 16, 32):
            if 64 <= math.ceil(N / bn) * math.ceil(M / rows) <= 16384:
                for e in (4096, 2048):
                    bk = max(32, min(next_pow2(K), e // bn))
                    out.append(LinearConfig(False, 1, bn, bk, 4, 1, rows))
    for bm in sorted({16, min(64, max(16, next_pow2(M)))}):
        for bn, bk, st in ((16, 64, 3), (16, 128, 3), (16, 256, 3), (32, 64, 3), (32, 128, 3),
                           (64, 64, 3), (16, 128, 4), (32, 128, 4), (16, 64, 2), (32, 256, 2)):
            if bm == 64 and bk * (bm + bn) > 16384:
                continue
            out.append(LinearConfig(True, bm, bn, min(bk, next_pow2(K)), 4, st))
    return list(dict.fromkeys(out + inv_candidates(N, K)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also time the candidates() configs")
    ap.add_argument("--sweep-inv", action="store_true",
                    help="also time inv_candidates() only (batch-invariant MMA tiles of 16 rows)")
    ap.add_argument("--only", default="", help="run only rows whose model/op contains this")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated row counts M")
    args = ap.parse_args()
    ms = tuple(int(m) for m in args.ms.split(","))
    torch.manual_seed(0)
    ops = [o for o in OPS if args.only in f"{o[0]}/{o[1]}"]

    # every input first: no torch.randn once a graph has been captured
    inputs = {}
    for model, op, K, N, kind in ops:
        rows_w = 2 * N if kind == "silu" else N
        W0 = (torch.randn(rows_w, K, device=DEV) / K ** 0.5).to(DT)
        nc = max(2, math.ceil(COLD_BYTES / W0.nbytes))
        Ws = list(W0.unsqueeze(0).repeat(nc, 1, 1).unbind(0))
        nw = (1 + 0.1 * torch.randn(K, device=DEV)).to(DT)
        per_m = {M: (torch.randn(M, K, device=DEV, dtype=DT), torch.randn(M, N, device=DEV, dtype=DT))
                 for M in ms}
        inputs[(model, op)] = (Ws, nw, per_m)
    torch.cuda.synchronize()

    rows = []
    print(f"{'model':<8} {'op':<15} {'M':>3} {'N':>6} {'K':>6} {'kernel':>8} {'GB/s':>6} {'%ceil':>5} "
          f"{'runtime':>8} {'cublas':>8} {'x rt':>5} {'L2-hot':>7} {'exact':>7}  config", flush=True)
    for model, op, K, N, kind in ops:
        Ws, nw, per_m = inputs[(model, op)]
        n_cold = max(20, len(Ws))
        for M in ms:
            x, r = per_m[M]
            kern = {
                "norm": lambda W, cfg=None: linear(x, W, norm_weight=nw, eps=EPS, config=cfg),
                "residual": lambda W, cfg=None: linear(x, W, residual=r, config=cfg),
                "silu": lambda W, cfg=None: linear_silu(x, W, nw, EPS, config=cfg),
                "plain": lambda W, cfg=None: linear(x, W, config=cfg),
            }[kind]
            runtime = {
                "norm": lambda W: F.linear(rms_norm(x, nw, EPS), W),
                "residual": lambda W: torch.addmm(r, x, W.t()),
                "silu": lambda W: silu_mul(F.linear(rms_norm(x, nw, EPS), W)),
                "plain": lambda W: F.linear(x, W),
            }[kind]
            cublas = (lambda W: torch.addmm(r, x, W.t())) if kind == "residual" else (lambda W: F.linear(x, W))
            W_rows = Ws[0].shape[0]
            nbytes = 2 * (W_rows * K + M * K + M * N + (M * N if kind == "residual" else 0)
                          + (K if kind in ("norm", "silu") else 0))
            cfg = _config(M, N, K)
            row = dict(model=model, op=op, kind=kind, M=M, N=N, K=K, W_shape=[W_rows, K], bytes=nbytes,
                       config=cfg._asdict(), cold_calls_per_graph=n_cold, weight_copies=len(Ws))
            timed(row, "kernel_us", kern, Ws, n_cold)
            timed(row, "runtime_us", runtime, Ws, n_cold)
            timed(row, "cublas_us", cublas, Ws, n_cold)
            timed(row, "kernel_l2_us", kern, Ws[:1], 20)
            ex = _row_config(Ws[0], M, silu=kind == "silu")      # exact mode's tiles
            row["exact_config"] = ex._asdict()
            timed(row, "exact_us", lambda W: kern(W, ex), Ws, n_cold)
            k_us = row["kernel_us"]
            if k_us:
                row["kernel_GBs"] = nbytes / k_us / 1e3
                row["kernel_pct_ceiling"] = 100 * row["kernel_GBs"] / CEILING_GBS
            if k_us and row["runtime_us"]:
                row["speedup_vs_runtime"] = row["runtime_us"] / k_us
            if args.sweep or args.sweep_inv:
                sweep = []
                for c in (candidates(M, N, K) if args.sweep else inv_candidates(N, K)):
                    t = {}
                    timed(t, "us", lambda W, c=c: kern(W, c), Ws, n_cold)
                    if t["us"]:
                        sweep.append(dict(config=c._asdict(), us=t["us"]))
                sweep.sort(key=lambda s: s["us"])
                row["sweep"] = sweep
            rows.append(row)
            f = lambda v, w=8, p=1: f"{v:{w}.{p}f}" if v else f"{'-':>{w}}"  # noqa: E731
            extra = ""
            if row.get("sweep"):
                b = row["sweep"][0]
                extra = f"  best {b['us']:.1f} us {tuple(b['config'].values())}"
            print(f"{model:<8} {op:<15} {M:>3} {N:>6} {K:>6} {f(k_us)} {f(row.get('kernel_GBs'), 6, 0)} "
                  f"{f(row.get('kernel_pct_ceiling'), 5, 0)} {f(row['runtime_us'])} {f(row['cublas_us'])} "
                  f"{f(row.get('speedup_vs_runtime'), 5, 2)} {f(row['kernel_l2_us'], 7)} {f(row['exact_us'], 7)}  "
                  f"{'mma' if cfg.use_dot else 'gemv'} {cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}"
                  f"{'' if cfg.use_dot else f' ROWS={cfg.ROWS}'}{extra}",
                  flush=True)
        del inputs[(model, op)]
        torch.cuda.empty_cache()

    # SmolLM2 per forward: the four layer GEMMs x 30 layers + the LM head, kernel vs runtime, at
    # each M timed (M=1: a decode step; M = d+1: verifying a chain of depth d)
    summary = {}
    layer_ops = ("wqkv+norm", "wo+residual", "w13+norm+silu", "w2+residual")
    for M in ms:
        sm = {r["op"]: r for r in rows if r["model"] == "smollm2" and r["M"] == M}
        got = {}
        for key in ("kernel_us", "runtime_us", "exact_us"):
            if all(sm.get(o, {}).get(key) for o in layer_ops + ("lm_head",)):
                got[key[:-3]] = (30 * sum(sm[o][key] for o in layer_ops) + sm["lm_head"][key]) / 1e3
                summary[f"smollm2_M{M}_gemms_ms_{key[:-3]}"] = got[key[:-3]]
        if got:
            print(f"SmolLM2 M={M}, 30 layers' GEMMs (+norm/silu) + LM head per forward: "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in got.items()))
    path = write("linear.json", dict(dtype="bfloat16", ceiling_GBs=CEILING_GBS, cold_bytes=COLD_BYTES,
                                     sweep=args.sweep, summary=summary, rows=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
