"""Decode / verify attention (kernels/tree_attention.py) at SmolLM2's shape in exact mode's tiles,
timed per launch inside a CUDA graph of 30 launches over 30 layers' caches (a step's worth),
for row tiles and split counts:
  base      exact mode's tiles (64-row tile, 128-slot splits, a combine launch)
  bm16      exact mode's 128-slot splits with a 16-row tile (G*T <= 16 rows fill it)
  single    one split (no combine launch), tree_attention's own row tile: sequential over the
            whole context per kv head. Not window-invariant against the split form, so it could
            serve a draft head (whose numerics do not touch the output), not the target.

    python -m bench.attn_variants [--ts 1,2,5] [--contexts 100,300,600,1000,1800]   (the defaults)
                                  [--variants base,bm16,single] [--out attn_variants.json]
"""
from __future__ import annotations

import argparse

import torch

from bench.common import gpu_time_ms, write
from kernels.tree_attention import exact_tiles, tree_attention

# The load-order (K, mask and V issued together) and 128-key-block variants were timed at 75002e7,
# where the kernel had them, and reverted (bench/results/attn_variants_75002e7.json).
VARIANTS = {"base": {}, "bm16": dict(block_m=16), "single": dict(n_splits=1, block_m=None)}


def window(L: int) -> int:
    return next(w for w in (256, 512, 1024, 2048, 4096) if w >= L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="1,2,5")
    ap.add_argument("--contexts", default="100,300,600,1000,1800")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--out", default="attn_variants.json")
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    h, nkv, hd, S_max = 9, 3, 64, 2048           # SmolLM2-135M
    torch.manual_seed(0)
    ks = [torch.randn(1, nkv, S_max, hd, device=dev, dtype=dt) for _ in range(a.layers)]
    vs = [torch.randn(1, nkv, S_max, hd, device=dev, dtype=dt) for _ in range(a.layers)]
    rows = []
    for ctx in [int(x) for x in a.contexts.split(",")]:
        for T in [int(x) for x in a.ts.split(",")]:
            W = window(ctx + T + 1)
            q = torch.randn(1, h, T, hd, device=dev, dtype=dt)
            slots = torch.arange(W, device=dev)
            pos = ctx + torch.arange(T, device=dev)
            mask = (slots[None, :] <= pos[:, None]).unsqueeze(0)          # a chain's causal mask
            tiles = exact_tiles(nkv, W)
            outs, times = {}, {}
            for name in a.variants.split(","):
                kw = {**tiles, **VARIANTS[name]}

                def run():
                    return [tree_attention(q, k[:, :, :W], v[:, :, :W], mask, **kw)
                            for k, v in zip(ks, vs)]
                outs[name] = run()
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run()
                g.replay()
                torch.cuda.synchronize()
                times[name] = gpu_time_ms(g.replay) * 1e3 / a.layers
            ref = outs["base"]
            row = {"context": ctx, "T": T, "window": W, "n_splits": tiles["n_splits"],
                   "us_per_launch": times,
                   "bitwise_equal_to_base": {n: all(torch.equal(x, y) for x, y in zip(o, ref))
                                             for n, o in outs.items()},
                   "max_abs_diff_to_base": {n: max((x.float() - y.float()).abs().max().item()
                                                   for x, y in zip(o, ref)) for n, o in outs.items()}}
            rows.append(row)
            print(f"context {ctx:5} T={T} W={W} splits={tiles['n_splits']}: " +
                  "  ".join(f"{n} {t:5.2f} us{'' if row['bitwise_equal_to_base'][n] else ' (bits differ)'}"
                            for n, t in times.items()), flush=True)
    path = write(a.out, {"shape": dict(h=h, n_kv=nkv, hd=hd, S_max=S_max, dtype="bfloat16"),
                         "layers_per_graph": a.layers, "rows": rows,
                         "note": "exact mode's tiles (block_m 64, 128-slot splits); us per launch = "
                                 "do_bench median of a graph of `layers` launches over distinct caches / layers"})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
