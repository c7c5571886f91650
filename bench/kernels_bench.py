"""Per-kernel timings of kernels/ against the unfused PyTorch code they replace (issue 5).

    PYTHONPATH=. python3 bench/kernels_bench.py            # on the H100, about 2-3 minutes

Two figures per op, both bf16, batch 1:
  * eager_us: host wall-clock per call in a tight loop, L2 warm. Eager decoding is host-bound
    (7.4 us per PyTorch launch on the H100 machine), so this is what an uncaptured step pays.
  * graph_us: triton.testing.do_bench median of replaying a CUDA graph that holds the op once;
    do_bench zeroes a 256 MB buffer before every replay, so L2 is cold (as it is in decoding,
    where each step streams the whole model) and the host launch is hidden behind that flush:
    this is GPU time, what the op costs inside a captured decode step.
GB/s = the bytes the op must move / graph_us, against the 3.0 TB/s copy ceiling (GPU.md).
Shapes: D=576 (SmolLM2-135M: h=9, n_kv=3, hd=64, I=1536, 30 layers) and D=4096 (a 7B: h=32,
n_kv=32, hd=128, I=11008, 32 layers). Medusa: H=4 heads, K=1..4 layers, M=1 row.
Results go to $OUT/kernels.json when OUT is set, else bench/results/kernels.json; a table last.
"""
from __future__ import annotations

import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    sys.exit("kernels_bench.py needs a CUDA GPU (the kernels' CPU path is the Triton interpreter)")

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from bench.common import write  # noqa: E402
from kernels.accept import accept_greedy, accept_greedy_ref, compact_kv, make_cache_table  # noqa: E402
from kernels.medusa import medusa_resblocks, medusa_resblocks_ref  # noqa: E402
from kernels.rmsnorm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from kernels.rope_cache import rope_and_cache_write, rope_and_cache_write_ref  # noqa: E402
from kernels.swiglu import silu_mul, silu_mul_ref  # noqa: E402
from kernels.tree_attention import tree_attention  # noqa: E402

DEV = "cuda"
DT = torch.bfloat16
CEILING_GBS = 3000.0
SHAPES = {
    "smollm2": dict(D=576, h=9, n_kv=3, hd=64, I=1536, layers=30),
    "7b": dict(D=4096, h=32, n_kv=32, hd=128, I=11008, layers=32),
}
S_CACHE = 2048          # cache slots
PREFIX = 1024           # tokens already cached when attention / compaction run


def eager_us(fn, target_s: float = 0.02) -> float:
    """Host wall-clock per call, steady state."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t) / 5
    n = max(5, min(2000, int(target_s / max(est, 1e-6))))
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def graph_us(fn) -> float:
    """GPU time of one replay of a graph holding fn once, cold L2 (do_bench median)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                       # warm-up (and Triton compiles) off-capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=10, rep=40, return_mode="median") * 1e3


ROWS: list[dict] = []


def measure(op: str, model: str, shape: str, fused, ref, nbytes: float | None, **extra):
    row = dict(op=op, model=model, shape=shape, bytes=nbytes, **extra)
    for name, fn in (("fused", fused), ("ref", ref)):
        for mode, timer in (("eager_us", eager_us), ("graph_us", graph_us)):
            try:
                row[f"{name}_{mode}"] = timer(fn)
            except Exception as e:                   # recorded and printed, never hidden
                row[f"{name}_{mode}"] = None
                row[f"{name}_{mode}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"  {op} {model} {shape} {name} {mode} failed: {row[f'{name}_{mode}_error']}")
                torch.cuda.synchronize()
    for mode in ("eager_us", "graph_us"):
        f, r = row.get(f"fused_{mode}"), row.get(f"ref_{mode}")
        row[f"speedup_{mode[:-3]}"] = r / f if f and r else None
    if nbytes and row.get("fused_graph_us"):
        row["fused_GBs"] = nbytes / row["fused_graph_us"] / 1e3
        row["fused_pct_ceiling"] = 100 * row["fused_GBs"] / CEILING_GBS
    ROWS.append(row)
    print(f"  {op:<12} {model:<8} {shape:<26} eager {row['fused_eager_us'] or float('nan'):8.1f} vs "
          f"{row['ref_eager_us'] or float('nan'):8.1f} us   graph {row['fused_graph_us'] or float('nan'):8.1f} vs "
          f"{row['ref_graph_us'] or float('nan'):8.1f} us", flush=True)


def bench_norm_swiglu(model, c):
    D, I = c["D"], c["I"]
    for M in (1, 64):
        x = torch.randn(M, D, device=DEV, dtype=DT)
        w = torch.rand(D, device=DEV, dtype=DT) + 0.5
        measure("rms_norm", model, f"M={M} D={D}", lambda: rms_norm(x, w, 1e-5),
                lambda: rms_norm_ref(x, w, 1e-5), 2 * (2 * M * D + D))
        r = torch.randn(M, D, device=DEV, dtype=DT)
        measure("add_rms_norm", model, f"M={M} D={D}", lambda: add_rms_norm(x, r, w, 1e-5),
                lambda: add_rms_norm_ref(x, r, w, 1e-5), 2 * (4 * M * D + D))
        gu = torch.randn(M, 2 * I, device=DEV, dtype=DT)
        measure("silu_mul", model, f"M={M} I={I}", lambda: silu_mul(gu), lambda: silu_mul_ref(gu),
                2 * 3 * M * I)


def bench_rope(model, c):
    h, nkv, hd = c["h"], c["n_kv"], c["hd"]
    for T in (1, 64):
        qkv = torch.randn(1, T, (h + 2 * nkv) * hd, device=DEV, dtype=DT)
        cos, sin = torch.randn(2, 1, T, hd, device=DEV, dtype=DT)
        slots = torch.arange(PREFIX, PREFIX + T, device=DEV)
        kc, vc = torch.randn(2, 1, nkv, S_CACHE, hd, device=DEV, dtype=DT)
        kr, vr = kc.clone(), vc.clone()
        nbytes = 2 * (2 * T * (h + 2 * nkv) * hd + 2 * T * hd)
        measure("rope_cache", model, f"T={T} h={h} nkv={nkv} hd={hd}",
                lambda: rope_and_cache_write(qkv, cos, sin, slots, kc, vc, h, nkv),
                lambda: rope_and_cache_write_ref(qkv, cos, sin, slots, kr, vr, h, nkv), nbytes)


def bench_medusa(model, c):
    D, H, M = c["D"], 4, 1
    x = torch.randn(M, D, device=DEV, dtype=DT)
    for K in (1, 2, 3, 4):
        W = (torch.randn(H, K, D, D, device=DEV) / math.sqrt(D)).to(DT)
        b = (torch.randn(H, K, D, device=DEV) * 0.1).to(DT)
        out = torch.empty(H, M, D, device=DEV, dtype=DT)
        measure("medusa", model, f"H={H} K={K} M={M} D={D}",
                lambda: medusa_resblocks(x, W, b, out=out),
                lambda: medusa_resblocks_ref(x, W, b), 2 * H * K * (D * D + D), K=K,
                launches_fused=K, launches_ref=3 * H * K + 1)
        del W, b


def bench_accept(model, c):
    # a 64-node binary tree (heap order: parent (i-1)//2, depth 6) in which the target accepts
    # the chain 0-1-3-7-15-31-63, the full depth
    N, md = 64, 6
    parents = torch.tensor([-1] + [(i - 1) // 2 for i in range(1, N)])
    depth = torch.tensor([int(math.log2(i + 1)) for i in range(N)])
    tok = torch.randint(0, 100, (N,))
    tgt = torch.randint(0, 100, (N,))
    for i in (1, 3, 7, 15, 31, 63):
        tgt[parents[i]] = tok[i]
    tok, parents, depth, tgt = (t.to(DEV) for t in (tok, parents, depth, tgt))
    measure("accept", model, f"N={N} depth={md}", lambda: accept_greedy(tok, parents, depth, tgt, md),
            lambda: accept_greedy_ref(tok, parents, depth, tgt, md), None)

    n, path, _, _ = accept_greedy(tok, parents, depth, tgt, md)
    nkv, hd, L = c["n_kv"], c["hd"], c["layers"]
    caches = [torch.randn(1, nkv, S_CACHE, hd, device=DEV, dtype=DT) for _ in range(2 * L)]
    table = make_cache_table(caches)
    prefix = torch.tensor(PREFIX, device=DEV)
    ar = torch.arange(path.shape[0], device=DEV)

    def ref():                                   # koala.model.Transformer.keep_cache, graph-safe
        src, dst = prefix + path, prefix + ar
        for cc in caches:
            cc.index_copy_(2, dst, cc.index_select(2, src))

    measure("compact_kv", model, f"layers={L} nkv={nkv} hd={hd} n={int(n)}",
            lambda: compact_kv(table, path, n, prefix), ref, 2 * L * 2 * nkv * int(n) * hd * 2 * 2)


def bench_attention(model, c):
    h, nkv, hd = c["h"], c["n_kv"], c["hd"]
    g = h // nkv
    for T in (1, 64):
        q = torch.randn(1, h, T, hd, device=DEV, dtype=DT)
        kc, vc = torch.randn(2, 1, nkv, S_CACHE, hd, device=DEV, dtype=DT)
        mask = torch.zeros(1, T, S_CACHE, dtype=torch.bool, device=DEV)
        mask[:, :, :PREFIX] = True
        mask[0, :, PREFIX:PREFIX + T] = torch.tril(torch.ones(T, T, dtype=torch.bool, device=DEV))
        kv_len = torch.tensor(PREFIX + T, device=DEV)

        def ref():                                   # koala.model.Attention's SDPA call
            m = mask.unsqueeze(1)
            if g > 1:
                m = m.repeat(1, 1, g, 1)
            return F.scaled_dot_product_attention(q.reshape(1, nkv, g * T, hd), kc, vc, attn_mask=m)

        nbytes = 2 * (2 * nkv * (PREFIX + T) * hd + 2 * h * T * hd) + T * (PREFIX + T)
        measure("attention", model, f"T={T} kv={PREFIX + T}/{S_CACHE} h={h}/{nkv}",
                lambda: tree_attention(q, kc, vc, mask, kv_len=kv_len), ref, nbytes)


def table() -> str:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)
    lines = ["| op | model | shape | eager fused / ref us | x | graph fused / ref us | x | GB/s (% of 3.0 TB/s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ROWS:
        gbs = "-" if r.get("fused_GBs") is None else f"{r['fused_GBs']:.0f} ({r['fused_pct_ceiling']:.0f}%)"
        lines.append(f"| {r['op']} | {r['model']} | {r['shape']} | {f(r['fused_eager_us'])} / {f(r['ref_eager_us'])} | "
                     f"{f(r['speedup_eager'], '{:.1f}')} | {f(r['fused_graph_us'])} / {f(r['ref_graph_us'])} | "
                     f"{f(r['speedup_graph'], '{:.1f}')} | {gbs} |")
    return "\n".join(lines)


def main():
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    t0 = time.time()
    for model, c in SHAPES.items():
        for fn in (bench_norm_swiglu, bench_rope, bench_medusa, bench_accept, bench_attention):
            try:
                fn(model, c)
            except Exception:
                print(f"{fn.__name__} {model} failed:\n{traceback.format_exc()}")
    medusa = {f"{r['model']} K={r['K']}": {k: r[k] for k in ("fused_graph_us", "ref_graph_us", "speedup_graph",
                                                           "fused_eager_us", "ref_eager_us", "speedup_eager")}
              for r in ROWS if r["op"] == "medusa"}
    path = write("kernels.json", {"dtype": "bfloat16", "ceiling_GBs": CEILING_GBS, "cache_slots": S_CACHE,
                                  "prefix": PREFIX, "rows": ROWS, "medusa_draft_cost": medusa,
                                  "wall_s": time.time() - t0})
    print(f"\nwrote {path} ({time.time() - t0:.0f} s)\n")
    print(table())


if __name__ == "__main__":
    main()
