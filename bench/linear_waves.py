"""Why an extra verified row costs what it does: exact mode's GEMV tiles against variants, with
each compiled kernel's registers and the waves of programs they allow (issue 5).

    PYTHONPATH=. python3 bench/linear_waves.py [--ms 1,2,3,5]

Exact mode (koala.model._row_config) gives each row its own programs (ROWS=1) for SmolLM2's
layer weights, so M rows launch M times the programs of one. If a program needs many registers,
fewer fit on an SM at once, and the M-th row's programs may start a second wave. For each of
SmolLM2's products at its real shape (wqkv 960 x 576, wo 576 x 576, w13 2x1536 x 576,
w2 576 x 1536, LM head 49152 x 576) and each M, this times (CUDA-graph replay, W rotated over
copies so every call reads it from HBM, as a decode step does):
  * exact: _row_config's tiles, 4 warps;
  * w8 / w2: the same tiles on 8 / 2 warps (fewer / more registers per thread);
  * rows: all M rows in one program row (ROWS = next_pow2(M) <= 8), bitwise what exact gives;
  * bn/2, bn*2: half / twice the output columns per program (more / fewer programs).
and records n_regs, n_spills, programs, resident programs per SM (from registers and threads)
and waves. Variants other than `rows` change the reduction layout, so each would have to be used
at every M (the plain step too) to keep exact mode's invariance. Writes linear_waves.json.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("linear_waves.py needs a CUDA GPU")

from bench.common import write  # noqa: E402
from bench.linear_bench import COLD_BYTES, graph_us  # noqa: E402
from kernels._common import next_pow2  # noqa: E402
from kernels.linear import _launch  # noqa: E402
from koala.model import _row_config  # noqa: E402

DT = torch.bfloat16
EPS = 1e-5
# SmolLM2-135M: D 576, 9 query / 3 kv heads of 64, intermediate 1536, vocabulary 49152
OPS = [("wqkv+norm", 576, 960, "norm"), ("wo+residual", 576, 576, "residual"),
       ("w13+norm+silu", 576, 1536, "silu"), ("w2+residual", 1536, 576, "residual"),
       ("lm_head", 576, 49152, "plain")]
LAYER_OPS = OPS[:4]


def resident_per_sm(n_regs: int, warps: int, smem: int) -> int:
    """Programs an H100 SM holds at once: 64K registers (allocated per warp in units of 256),
    2048 threads, 32 blocks, 228 KB shared memory."""
    per_warp = math.ceil(max(n_regs, 1) * 32 / 256) * 256
    by_regs = 65536 // (per_warp * warps)
    by_smem = (228 * 1024) // smem if smem else 32
    return max(0, min(by_regs, 2048 // (32 * warps), 32, by_smem))


def make_inputs(ops, ms) -> dict:
    """{op: (Ws, nw, {M: (x, residual, out)})}, seeded, all made before any graph is captured:
    Ws is W in enough copies (>= COLD_BYTES) that a graph of calls rotating over them reads W from
    HBM each call, as a decode step does."""
    torch.manual_seed(0)
    inputs = {}
    for op, K, N, kind in ops:
        rows_w = 2 * N if kind == "silu" else N
        W0 = (torch.randn(rows_w, K, device="cuda") / K ** 0.5).to(DT)
        nc = max(2, math.ceil(COLD_BYTES / W0.nbytes))
        Ws = list(W0.unsqueeze(0).repeat(nc, 1, 1).unbind(0))
        nw = (1 + 0.1 * torch.randn(K, device="cuda")).to(DT)
        per_m = {M: (torch.randn(M, K, device="cuda", dtype=DT), torch.randn(M, N, device="cuda", dtype=DT),
                     torch.empty(M, N, device="cuda", dtype=DT)) for M in ms}
        inputs[op] = (Ws, nw, per_m)
    torch.cuda.synchronize()
    return inputs


def variants(cfg, M):
    out = {"exact": cfg, "w8": cfg._replace(num_warps=8), "w2": cfg._replace(num_warps=2)}
    if M > 1:
        out["rows"] = cfg._replace(ROWS=min(8, next_pow2(M)))
    if cfg.BLOCK_N > 1:
        out["bn/2"] = cfg._replace(BLOCK_N=cfg.BLOCK_N // 2)
    out["bn*2"] = cfg._replace(BLOCK_N=cfg.BLOCK_N * 2, BLOCK_K=max(32, cfg.BLOCK_K // 2)
                               if cfg.BLOCK_N * 2 * cfg.BLOCK_K > 8192 else cfg.BLOCK_K)
    return out


def sweep_variants(cfg, M, K):
    """--sweep: every BLOCK_N in 1..8 (16..32 for the LM head) x 1, 2, 4 warps x BLOCK_K of
    next_pow2(K) or half of it (or 256 / 512 for the LM head), ROWS as exact mode's."""
    out = {"exact": cfg}
    lm = cfg.BLOCK_N >= 16
    for bn in ((4, 8, 16, 32) if lm else (1, 2, 4, 8)):
        for w in ((2, 4) if lm else (1, 2, 4)):
            for bk in ((256, 512) if lm else (next_pow2(K), next_pow2(K) // 2)):
                out[f"n{bn}k{bk}w{w}"] = cfg._replace(BLOCK_N=bn, BLOCK_K=bk, num_warps=w)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,2,3,5")
    ap.add_argument("--sweep", action="store_true", help="the grid of sweep_variants instead of variants")
    ap.add_argument("--only", default="", help="ops whose name contains this")
    a = ap.parse_args()
    ms = [int(m) for m in a.ms.split(",")]
    ops = [o for o in OPS if a.only in o[0]]
    inputs = make_inputs(ops, ms)
    rows = []
    print(f"{'op':<15} {'M':>2} {'variant':<6} {'us':>7} {'regs':>4} {'spill':>5} {'progs':>6} {'/SM':>3} "
          f"{'waves':>5}  config", flush=True)
    for op, K, N, kind in ops:
        Ws, nw, per_m = inputs[op]
        for M in ms:
            x, r, y = per_m[M]
            cfg = _row_config(Ws[0], M, silu=kind == "silu")
            vs = sweep_variants(cfg, M, K) if a.sweep else variants(cfg, M)
            for name, c in vs.items():
                def call(W, c=c):
                    return _launch(x, W, None, r if kind == "residual" else None,
                                   nw if kind in ("norm", "silu") else None, EPS, y, N, kind == "silu", c)
                row = dict(op=op, M=M, N=N, K=K, variant=name, config=c._asdict())
                try:
                    h = call(Ws[0])
                    torch.cuda.synchronize()
                    row["n_regs"] = getattr(h, "n_regs", None)
                    row["n_spills"] = getattr(h, "n_spills", None)
                    smem = getattr(getattr(h, "metadata", None), "shared", 0) or 0
                    row["shared_bytes"] = smem
                    progs = math.ceil(N / c.BLOCK_N) * math.ceil(M / c.ROWS)
                    row["programs"] = progs
                    if row["n_regs"]:
                        per = resident_per_sm(row["n_regs"], c.num_warps, smem)
                        row["resident_per_sm"] = per
                        row["waves"] = progs / (132 * per) if per else None
                    row["us"] = graph_us(call, Ws, max(20, len(Ws)))
                except Exception as e:       # recorded and printed, never hidden
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"  {op} M={M} {name} failed: {row['error']}", flush=True)
                    torch.cuda.synchronize()
                rows.append(row)
                if "us" in row:
                    print(f"{op:<15} {M:>2} {name:<6} {row['us']:7.2f} {row.get('n_regs') or 0:>4} "
                          f"{row.get('n_spills') or 0:>5} {row['programs']:>6} {row.get('resident_per_sm', 0):>3} "
                          f"{row.get('waves') or 0:5.2f}  {c.BLOCK_N}x{c.BLOCK_K} w{c.num_warps} R{c.ROWS}",
                          flush=True)
        del inputs[op]
        torch.cuda.empty_cache()
    # a forward's products (30 layers + LM head) per variant where every op has it
    summary = {}
    for M in ms:
        for op, *_ in ops:     # each op's fastest config at this M
            got = [r for r in rows if r["op"] == op and r["M"] == M and r.get("us")]
            if got:
                b = min(got, key=lambda r: r["us"])
                summary[f"M{M}_{op}_best"] = {"variant": b["variant"], "us": b["us"],
                                              "exact_us": next((r["us"] for r in got if r["variant"] == "exact"), None)}
        for name in ("exact", "w8", "w2", "rows", "bn/2", "bn*2"):
            got = {r["op"]: r.get("us") for r in rows if r["M"] == M and r["variant"] == name}
            lm = got.get("lm_head") or next((r.get("us") for r in rows if r["M"] == M and r["op"] == "lm_head"
                                             and r["variant"] == "exact"), None)
            if all(got.get(o[0]) for o in LAYER_OPS) and lm:
                summary[f"M{M}_{name}_forward_ms"] = (30 * sum(got[o[0]] for o in LAYER_OPS) + lm) / 1e3
    for k, v in summary.items():
        print(f"{k:<28} {v:.3f} ms" if isinstance(v, float) else f"{k:<28} {v}")
    print(f"wrote {write('linear_waves_sweep.json' if a.sweep else 'linear_waves.json', dict(dtype='bfloat16', cold_bytes=COLD_BYTES, summary=summary, rows=rows))}")


if __name__ == "__main__":
    main()
