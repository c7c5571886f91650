"""What one of the target's own layers costs, set against issue 5's bar for a draft layer.

Issue 5 asks that each EAGLE draft layer beyond the first add at most 3% of one plain decode
step. An EAGLE draft layer has the target's layer shape (SmolLM2: D = 576, 9 query and 3 kv
heads, I = 1536), so the bar is only reachable if a draft layer costs less than 3% of the 30
such layers plus the LM head that make up a plain step. This measures the target's layer in the
same run: SmolLM2-shaped targets with random bf16 weights and 6 to 30 layers; the plain step
(one row a layer) and a depth-1 chain's verify (two rows a layer) are timed for each, and a least
squares line through the points gives the cost of one layer (the slope) and of everything else
(the intercept: embedding, final norm, LM head, argmax, acceptance). The EAGLE draft's cost per
layer (K = 1 and K = 2 heads at depth 1 on the 30-layer target, two rows a layer) comes from the
same run, as `bench.spec_cost` measures it. All figures are do_bench medians (queued, L2 flushed).

    python -m bench.layer_share [--layers 6,12,18,24,30] [--context 300] [--out layer_share.json]
"""
from __future__ import annotations

import argparse

import torch

from bench.common import plain_step_gpu_ms, write
from bench.scale import random_target
from bench.spec_cost import iteration_ms, random_head


def fit_line(xs, ys):
    """Least squares y = a + b x: (a, b, largest residual)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) for x, y in zip(xs, ys))


def iteration_gpu_ms(lt, kind: str, K: int, context: int):
    """(draft, verify) do_bench ms of one greedy depth-1 chain iteration (bench.spec_cost)."""
    _, _, _, draft, verify = iteration_ms(lt, random_head(lt, kind, K), {"mode": "chain", "depth": 1}, context)
    return draft, verify


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="6,12,18,24,30", help="target layer counts")
    ap.add_argument("--context", type=int, default=300, help="committed tokens when timing")
    ap.add_argument("--out", default="layer_share.json", help="result file name")
    a = ap.parse_args()
    counts = sorted({int(n) for n in a.layers.split(",") if n})
    if len(counts) < 2 or 30 not in counts:
        ap.error("--layers needs at least two counts, 30 (SmolLM2's) among them")
    points = []
    for n in counts:
        lt = random_target("smollm2-135m", "cuda", torch.bfloat16, n_layers=n)
        plain = plain_step_gpu_ms(lt, a.context)
        d1, verify = iteration_gpu_ms(lt, "eagle", 1, a.context)
        points.append({"layers": n, "plain_step_gpu_ms": plain, "verify_depth1_gpu_ms": verify})
        print(f"{n:3} layers: plain step {plain:.4f} ms, depth-1 verify {verify:.4f} ms", flush=True)
        if n == 30:
            d2, _ = iteration_gpu_ms(lt, "eagle", 2, a.context)
            draft = {"eagle_k1_draft_gpu_ms": d1, "eagle_k2_draft_gpu_ms": d2,
                     "eagle_layer_depth1_us": (d2 - d1) * 1e3}
        del lt
        torch.cuda.empty_cache()
    xs = [p["layers"] for p in points]
    a0, b0, r0 = fit_line(xs, [p["plain_step_gpu_ms"] for p in points])
    a1, b1, r1 = fit_line(xs, [p["verify_depth1_gpu_ms"] for p in points])
    step30 = next(p["plain_step_gpu_ms"] for p in points if p["layers"] == 30)
    fit = {"plain_layer_us": b0 * 1e3, "plain_rest_us": a0 * 1e3, "plain_fit_max_residual_us": r0 * 1e3,
           "verify_layer_us": b1 * 1e3, "verify_rest_us": a1 * 1e3, "verify_fit_max_residual_us": r1 * 1e3,
           "plain_step_30_gpu_ms": step30,
           "bar_3pct_us": 0.03 * step30 * 1e3,
           "plain_layer_pct_of_step": 100 * b0 / step30,
           "verify_layer_pct_of_step": 100 * b1 / step30,
           "eagle_layer_pct_of_step": draft["eagle_layer_depth1_us"] / (step30 * 1e3) * 100}
    path = write(a.out, {"model": "SmolLM2-135M shape, random bf16 weights", "context": a.context,
                         "points": points, "draft": draft, "fit": fit,
                         "note": "do_bench medians (queued, L2 flushed); layer costs are the slopes of "
                                 "least-squares lines over the layer counts; the plain step runs one row "
                                 "a layer, a depth-1 verify and a depth-1 EAGLE draft two"})
    print(f"one target layer: {fit['plain_layer_us']:.1f} us at one row "
          f"({fit['plain_layer_pct_of_step']:.2f}% of the {step30:.3f} ms step; the rest {fit['plain_rest_us']:.1f} us), "
          f"{fit['verify_layer_us']:.1f} us at two rows in a verify ({fit['verify_layer_pct_of_step']:.2f}%)")
    print(f"EAGLE draft layer at depth 1: {draft['eagle_layer_depth1_us']:.1f} us "
          f"({fit['eagle_layer_pct_of_step']:.2f}%); the 3% bar: {fit['bar_3pct_us']:.1f} us")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
