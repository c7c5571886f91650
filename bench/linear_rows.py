"""The row-tile GEMV (kernels/linear.py, `vec` configs) against exact mode's per-row programs, for
SmolLM2's five products at M = 1 .. 8 rows (issue 5: what an extra verified row costs).

    PYTHONPATH=. python3 bench/linear_rows.py [--ms 1,2,3,4,5,8] [--rows 2,4,8] [--only wo]

Exact mode must give a row the same bits whatever M is, so a tile shape, once chosen, serves
every M: the plain step (M = 1) as well as a verify of M rows. Exact mode today
(koala.model._row_config, `exact` below) gives each row programs of its own, so M rows launch M
times the programs of one. A row tile of R rows (`vec`, R = BLOCK_M) computes R rows in one
(R, BLOCK_N, BLOCK_K) product: up to R rows cost one launch's programs, and M = 1 pays for R
rows of arithmetic (its other rows are masked off, so they read nothing).

For each op, each candidate tile (R in --rows, BLOCK_N 1..16, BLOCK_K 64..1024, 4 warps; at
most 16384 products per K block) is timed at every M <= 8 (CUDA-graph replay, W rotated over
copies so every call reads it from HBM, as a decode step does), with its registers and spills.
The summary gives, per R, each op's tile with the least `cost` (the sum of its times at
M = 1, 2 and R, a plain step and two verify sizes), and the forward's products (30 layers + LM
head) at each M with those tiles, against exact mode's. Its `tiles` list holds, for each op, the
tile (of any family, exact mode's own included) of least time summed over M = 1, 2 and 4: a plain
step and the verifies of chains of depth 1 and 3. `KOALA_EXACT_TILES=linear_rows.json` makes
exact mode use those tiles (koala.model), so the forward's cost can be timed with them next.
Writes linear_rows.json.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

if not torch.cuda.is_available():
    sys.exit("linear_rows.py needs a CUDA GPU")

from bench.common import write  # noqa: E402
from bench.linear_bench import COLD_BYTES, graph_us  # noqa: E402
from bench.linear_waves import EPS, OPS, make_inputs  # noqa: E402  (SmolLM2's five products)
from kernels._common import next_pow2  # noqa: E402
from kernels.linear import LinearConfig, _launch, vec_config  # noqa: E402
from koala.model import _Fast, _row_config  # noqa: E402

LAYER_OPS = [o[0] for o in OPS[:4]]
TILE_MS = (1, 2, 4)     # the tiles file's objective: a plain step and the verifies of depth 1 and 3


def candidates(N: int, K: int, R: int, silu: bool) -> list[LinearConfig]:
    """Row tiles of R rows: vec_config's choice, then BLOCK_N x BLOCK_K on 1, 2 and 4 warps."""
    out = [vec_config(N, K, R, silu)]
    bns = (4, 8, 16, 32) if N >= 16384 else (1, 2, 4, 8)
    for bn in bns:
        for bk in (512, 1024):
            bk = min(bk, next_pow2(K))
            if R * bn * bk * (2 if silu else 1) > 16384 or math.ceil(N / bn) < 32:
                continue
            for w in (1, 2, 4):
                out.append(LinearConfig(False, R, bn, bk, w, 1, 1, True))
    return list(dict.fromkeys(out))


def gemv_candidates(N: int, K: int, R: int) -> list[LinearConfig]:
    """The per-row GEMV with R rows to a program (ROWS; rows past M are skipped, so M = 1 pays
    for one), one K block (or two for K > 1024), on 1, 2 and 4 warps: with one warp a row's
    reductions need no shared memory and no barrier, so its rows' latencies can overlap."""
    out = []
    bns = (8, 16, 32) if N >= 16384 else (1, 2, 4, 8)
    for bn in bns:
        for bk in sorted({next_pow2(K), min(next_pow2(K), 1024)}):
            if bn * bk > 16384 or math.ceil(N / bn) < 32:
                continue
            for w in (1, 2, 4):
                out.append(LinearConfig(False, 1, bn, bk, w, 1, R))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,2,3,4,5,8")
    ap.add_argument("--rows", default="2,4,8", help="row tiles R to sweep")
    ap.add_argument("--only", default="", help="ops whose name contains this")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds; stops sweeping after")
    ap.add_argument("--no-vec", dest="vec", action="store_false", help="skip the row-tile candidates")
    ap.add_argument("--no-gemv", dest="gemv", action="store_false", help="skip the per-row GEMV candidates")
    a = ap.parse_args()
    # `exact` is exact mode's per-row programs, not the tiles of an earlier sweep (the shipped
    # koala/exact_tiles.json or KOALA_EXACT_TILES): this sweep is what chooses those
    _Fast.tiles = {}
    ms = [int(m) for m in a.ms.split(",")]
    Rs = [int(r) for r in a.rows.split(",")]
    ops = [o for o in OPS if a.only in o[0]]
    inputs = make_inputs(ops, ms)
    rows, stopped = [], False
    for op, K, N, kind in ops:
        Ws, nw, per_m = inputs[op]
        silu = kind == "silu"
        cands = [("exact", None)]
        if a.gemv:
            cands += [(f"gemv{R}", c) for R in Rs for c in gemv_candidates(N, K, R)]
        if a.vec:
            cands += [(f"vec{R}", c) for R in Rs for c in candidates(N, K, R, silu)]
        t_op = time.time()
        for name, c in cands:          # each op gets an equal share of the budget
            if time.time() - t_op > a.budget / len(ops):
                stopped = True
                break
            row = dict(op=op, N=N, K=K, variant=name, config=None if c is None else c._asdict(), us={})
            for M in ms:
                if c is not None and M > 8:
                    continue
                x, r, y = per_m[M]
                cfg = c or _row_config(Ws[0], M, silu=silu)

                def call(W, cfg=cfg):
                    return _launch(x, W, None, r if kind == "residual" else None,
                                   nw if kind in ("norm", "silu") else None, EPS, y, N, silu, cfg)
                try:
                    h = call(Ws[0])
                    torch.cuda.synchronize()
                    if M == ms[-1]:
                        row["n_regs"], row["n_spills"] = getattr(h, "n_regs", None), getattr(h, "n_spills", None)
                    row["us"][str(M)] = graph_us(call, Ws, max(20, len(Ws)))
                except Exception as e:       # recorded and printed, never hidden
                    row["error"] = f"M={M}: {type(e).__name__}: {str(e)[:300]}"
                    print(f"  {op} {name} {c} failed: {row['error']}", flush=True)
                    torch.cuda.synchronize()
                    break
            rows.append(row)
            desc = "exact" if c is None else f"{name} {c.BLOCK_N}x{c.BLOCK_K} w{c.num_warps}"
            print(f"{op:<15} {desc:<18} " + " ".join(f"M{m}={v:6.2f}" for m, v in row["us"].items())
                  + f"  regs {row.get('n_regs')} spills {row.get('n_spills')}", flush=True)
        del inputs[op]
        torch.cuda.empty_cache()

    # per R: each op's tile of least cost, then the forward's products at each M
    summary = {}
    exact = {r["op"]: r["us"] for r in rows if r["variant"] == "exact"}
    for fam, R in [(f, R) for f in ("gemv", "vec") for R in Rs]:
        best = {}
        for op in [o[0] for o in ops]:
            got = [r for r in rows if r["op"] == op and r["variant"] == f"{fam}{R}" and len(r["us"]) == len(
                [m for m in ms if m <= 8])]
            keys = [str(m) for m in (1, 2, R) if m in ms]
            if got and keys:
                b = min(got, key=lambda r: sum(r["us"][k] for k in keys))
                best[op] = b
                summary[f"{fam}{R}_{op}_best"] = {"config": b["config"], "us": b["us"]}
        for M in ms:
            for name, table in ((f"{fam}{R}", {op: b["us"] for op, b in best.items()}), ("exact", exact)):
                if all(str(M) in table.get(o, {}) for o in LAYER_OPS + ["lm_head"]):
                    summary[f"M{M}_{name}_forward_ms"] = (30 * sum(table[o][str(M)] for o in LAYER_OPS)
                                                          + table["lm_head"][str(M)]) / 1e3
    # exact mode's tile per op, for KOALA_EXACT_TILES: the least time summed over a plain step
    # (M = 1) and the verifies of depth 1 and 3 (M = 2, 4), over every family timed
    want = [str(m) for m in TILE_MS if m in ms]
    tiles = []
    for op, K, N, kind in ops:
        got = [r for r in rows if r["op"] == op and all(k in r["us"] for k in want)]
        if got and want:
            b = min(got, key=lambda r: sum(r["us"][k] for k in want))
            tiles.append(dict(op=op, N=N, K=K, silu=kind == "silu", variant=b["variant"], config=b["config"],
                              us=b["us"], exact_us=exact.get(op)))
            if b["config"] is not None:
                print(f"tile {op:<15} {b['variant']:<6} {b['config']['BLOCK_N']}x{b['config']['BLOCK_K']} "
                      f"w{b['config']['num_warps']} R{b['config']['ROWS']}  "
                      + " ".join(f"M{k}={b['us'][k]:.2f}" for k in want) + "  (exact "
                      + " ".join(f"M{k}={exact[op][k]:.2f}" for k in want if k in exact.get(op, {})) + ")")
    if want:
        for M in ms:
            t = {d["op"]: d["us"] for d in tiles}
            if all(str(M) in t.get(o, {}) for o in LAYER_OPS + ["lm_head"]):
                summary[f"M{M}_tiles_forward_ms"] = (30 * sum(t[o][str(M)] for o in LAYER_OPS)
                                                     + t["lm_head"][str(M)]) / 1e3
    for k, v in summary.items():
        if k.startswith("M"):
            print(f"{k:<28} {v:.3f} ms")
    for k, v in summary.items():
        if not k.startswith("M"):
            c = v["config"]
            print(f"{k:<28} {c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} R{c['ROWS']}  " + " ".join(f"M{m}={u:.2f}" for m, u in v["us"].items()))
    print(f"wrote {write('linear_rows.json', dict(dtype='bfloat16', cold_bytes=COLD_BYTES, rows_swept=Rs, ms=ms, stopped_at_budget=stopped, exact_row_tile=_Fast.row_tile, summary=summary, tiles=tiles, rows=rows))}")


if __name__ == "__main__":
    main()
