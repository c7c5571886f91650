"""The split attention's combine: its own launch against the output projection's prologue.

For SmolLM2's shape (9 query heads, 3 kv heads, hd 64, wo 576 x 576, bf16) and a chain's causal
mask, a CUDA graph holds `--layers` layers (each its own cache and wo, so weights come from HBM
as in a step) of
  launch:    tree_attention (split + combine launches), then linear(wo, residual) with the
             default GEMV tiles (`launch`) or those named by --tiles (`launch_<tile>`)
  prologue:  tree_attention(defer_combine=True), then linear_combine(wo, residual) with the GEMV
             tiles named by --tiles: BLOCK_NxNUM_WARPS[xBLOCK_K] (BLOCK_K by default as
             kernels.linear._config sizes it for that BLOCK_N)
and, to see where the time goes, the split launch alone (attn_only) and the combine launch alone
on its partials (combine_only). Prints and writes microseconds a layer (median of 20 replays).

    python -m bench.combine_bench [--contexts 300,1000] [--ts 1,5] [--tiles 2x4,16x4x256]
"""
from __future__ import annotations

import argparse

import torch

from bench.common import write
from bench.linear_bench import graph_us
from kernels.linear import _config, linear, linear_combine
from kernels.tree_attention import _combine, exact_tiles, tree_attention


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="300,1000")
    ap.add_argument("--ts", default="1,5")
    ap.add_argument("--tiles", default="2x4,4x4,8x4,16x4", help="BLOCK_NxNUM_WARPS[xBLOCK_K] of the GEMV")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--out", default="combine_bench.json")
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    h, nkv, hd, D, S_max = 9, 3, 64, 576, 2048
    torch.manual_seed(0)
    ks = [torch.randn(1, nkv, S_max, hd, device=dev, dtype=dt) for _ in range(a.layers)]
    vs = [torch.randn(1, nkv, S_max, hd, device=dev, dtype=dt) for _ in range(a.layers)]
    Ws = [torch.randn(D, h * hd, device=dev, dtype=dt) * 0.04 for _ in range(a.layers)]
    rows = []
    for ctx in [int(x) for x in a.contexts.split(",")]:
        for T in [int(x) for x in a.ts.split(",")]:
            W = 1 << max(7, (ctx + T).bit_length())                       # a power-of-two window
            q = torch.randn(1, h, T, hd, device=dev, dtype=dt)
            res = torch.randn(1, T, D, device=dev, dtype=dt)
            pos = ctx + torch.arange(T, device=dev)
            mask = (torch.arange(W, device=dev)[None, :] <= pos[:, None]).unsqueeze(0)
            tiles = exact_tiles(nkv, W)
            base = _config(T, D, h * hd)._replace(ROWS=1)
            row = dict(context=ctx, T=T, window=W, n_splits=tiles["n_splits"], us={})

            def attn(i):
                return tree_attention(q, ks[i][:, :, :W], vs[i][:, :, :W], mask, **tiles)

            def parts(i):
                return tree_attention(q, ks[i][:, :, :W], vs[i][:, :, :W], mask, defer_combine=True, **tiles)

            def launch(i):
                y = attn(i)
                return linear(y.transpose(1, 2).reshape(1, T, h * hd), Ws[i], residual=res, config=base)

            def run(fn):
                return graph_us(lambda i: [fn(j) for j in range(a.layers)], [0], 1) / a.layers

            row["us"]["launch"] = run(launch)
            row["us"]["attn_only"] = run(parts)
            p0 = parts(0)
            out = torch.empty(1, T, h, hd, device=dev, dtype=dt).transpose(1, 2)
            row["us"]["combine_only"] = run(lambda i: _combine(p0.o_part, p0.lse, out, p0.n_splits))
            for spec in a.tiles.split(","):
                bn, nw, *bk = (int(x) for x in spec.split("x"))
                bk = bk[0] if bk else max(32, min(1024, 4096 // bn))
                cfg = base._replace(BLOCK_N=bn, num_warps=nw, BLOCK_K=bk)

                def launch_cfg(i, cfg=cfg):
                    return linear(attn(i).transpose(1, 2).reshape(1, T, h * hd), Ws[i], residual=res, config=cfg)
                row["us"][f"launch_{spec}"] = run(launch_cfg)
                row["us"][f"prologue_{spec}"] = run(lambda i, cfg=cfg: linear_combine(parts(i), Ws[i], residual=res,
                                                                                      config=cfg))
            rows.append(row)
            print(f"context {ctx:5d} T={T} splits={row['n_splits']:2d}: " +
                  "  ".join(f"{k} {v:.2f}" for k, v in row["us"].items()), flush=True)
    path = write(a.out, {"shape": dict(h=h, n_kv=nkv, hd=hd, D=D, dtype="bfloat16", layers=a.layers),
                         "unit": "us per layer (attention + output projection), CUDA graph replay median",
                         "rows": rows})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
