"""Per-iteration cost of drafting and verifying against one plain decode step, on SmolLM2
(bf16, H100), for Medusa and EAGLE heads with K = 1..4, chain depths 1..8 and tree sizes up
to 64. Untrained heads: acceptance is not measured here, only cost. Each iteration runs as two
CUDA graphs (draft, verify+accept+commit); times are medians of graph replays, both as CUDA events
around one replay on an idle GPU (draft_ms, verify_ms) and as do_bench queues with L2 flushed
(draft_gpu_ms, verify_gpu_ms; see bench.common.gpu_time_ms).
With --unfused, the depth-4 chain iteration of every kind and K is measured again on the PyTorch
path (KOALA_KERNELS=0, still graph-captured): the fused draft against the unfused head.

    python -m bench.spec_cost [--quick] [--ks 1,2,3,4] [--kinds medusa,eagle] [--depths 1,2]
                              [--trees 16,64 | --trees ""] [--unfused] [--random-weights] [--out F]
"""
from __future__ import annotations

import argparse
import os

import torch

from bench.common import cuda_time_ms, gpu_time_ms, plain_step_gpu_ms, plain_step_ms, write
from koala import SpeculativeGenerator, load_target
from koala.heads import DraftConfig


def iteration_ms(lt, head, opts: dict, context: int, max_seq_len: int = 2048):
    """(draft_ms, verify_ms, N, draft_gpu_ms, verify_gpu_ms) of one greedy speculative iteration
    at `context` committed tokens, each half a graph replay. draft_ms and verify_ms: median of CUDA
    events around one replay on an idle GPU, the host's launch latency included; the _gpu_ms pair:
    do_bench medians, replays queued, L2 flushed before each (bench.common.gpu_time_ms)."""
    gen = SpeculativeGenerator(lt, head, max_seq_len=max_seq_len, **opts)
    spec = gen.spec
    spec.greedy = True
    W = spec.window(context)
    spec.L.fill_(context); spec.cu_n.fill_(1)
    spec._run(W, [torch.cuda.Event(enable_timing=True) for _ in range(3)])
    gd, gv = spec.graphs[("greedy", W)]

    def reset():
        spec.L.fill_(context); spec.cu_n.fill_(1)
    draft = cuda_time_ms(lambda: (reset(), gd.replay()), iters=50)
    verify = cuda_time_ms(lambda: (reset(), gv.replay()), iters=50)
    draft_gpu = gpu_time_ms(lambda: (reset(), gd.replay()))
    verify_gpu = gpu_time_ms(lambda: (reset(), gv.replay()))
    return draft, verify, spec.N, draft_gpu, verify_gpu


def random_head(lt, kind: str, K: int, n_heads: int = 5):
    """An untrained head with random (not identity) weights, so no kernel sees zeros."""
    torch.manual_seed(0)
    head = DraftConfig(kind=kind, layers=K, n_heads=n_heads).build(lt)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.02)
    return head


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--context", type=int, default=300, help="committed tokens when timing")
    ap.add_argument("--ks", default="1,2,3,4", help="layers per head")
    ap.add_argument("--unfused", action="store_true", help="also the depth-4 chains on the PyTorch path")
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2's shape with random weights (bench.scale's target): no model to stage; "
                         "costs only, like the heads")
    ap.add_argument("--kinds", default="medusa,eagle", help="head kinds")
    ap.add_argument("--depths", default=None, help="chain depths (default 1,2,4,8 with --quick, else 1..8)")
    ap.add_argument("--trees", default=None, help="tree sizes (default 16,64 with --quick, else 8,16,32,64; "
                                                  "'' for none)")
    ap.add_argument("--out", default="spec_cost.json", help="result file name")
    a = ap.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    kinds = [k for k in a.kinds.split(",") if k]
    if not kinds or set(kinds) - {"medusa", "eagle"}:
        ap.error(f"--kinds takes medusa and/or eagle, got {a.kinds!r}")
    if a.random_weights:
        from bench.scale import random_target
        lt = random_target("smollm2-135m", "cuda", torch.bfloat16)
    else:
        lt = load_target("smollm2-135m-instruct", device="cuda", dtype=torch.bfloat16)
    plain_ms = plain_step_ms(lt, a.context)
    plain_gpu = plain_step_gpu_ms(lt, a.context)
    rows = []
    depths = ([1, 2, 4, 8] if a.quick else list(range(1, 9))) if a.depths is None else \
        [int(d) for d in a.depths.split(",") if d]
    trees = ([16, 64] if a.quick else [8, 16, 32, 64]) if a.trees is None else \
        [int(n) for n in a.trees.split(",") if n]
    configs = []
    for kind in kinds:
        for K in ks:
            for d in depths:
                if kind == "medusa" and d > 5:
                    continue  # 5 Medusa heads
                configs.append((kind, K, dict(mode="chain", depth=d)))
            for n in trees:
                configs.append((kind, K, dict(mode="tree", tree_size=n, top_k=8 if kind == "eagle" else 10,
                                              depth=6 if kind == "eagle" else 5)))
    configs = [(kind, K, opts, True) for kind, K, opts in configs]
    if a.unfused:
        configs += [(kind, K, dict(mode="chain", depth=4), False) for kind in kinds for K in ks]
    for kind, K, opts, fused in configs:
        os.environ["KOALA_KERNELS"] = "1" if fused else "0"   # read when the generator is built
        draft_ms, verify_ms, N, draft_gpu, verify_gpu = iteration_ms(lt, random_head(lt, kind, K), opts, a.context)
        row = {"kind": kind, "K": K, **opts, "kernels": fused, "draft_ms": draft_ms, "verify_ms": verify_ms,
               "iteration_ms": draft_ms + verify_ms, "iteration_over_plain_step": (draft_ms + verify_ms) / plain_ms,
               "draft_over_plain_step": draft_ms / plain_ms,
               "draft_gpu_ms": draft_gpu, "verify_gpu_ms": verify_gpu,
               "draft_gpu_over_plain_step_gpu": draft_gpu / plain_gpu,
               "iteration_gpu_over_plain_step_gpu": (draft_gpu + verify_gpu) / plain_gpu}
        rows.append(row)
        print(f"{kind:7}K={K} {opts['mode']:5} depth={opts.get('depth')} N={N:3} {'fused  ' if fused else 'unfused'} "
              f"draft {draft_ms:7.3f} ms  "
              f"verify {verify_ms:7.3f} ms  = {row['iteration_over_plain_step']:5.2f} x plain step  | queued: "
              f"draft {draft_gpu:7.3f} verify {verify_gpu:7.3f} = {row['iteration_gpu_over_plain_step_gpu']:5.2f} x",
              flush=True)
        torch.cuda.empty_cache()
    os.environ["KOALA_KERNELS"] = "1"
    path = write(a.out, {"model": "SmolLM2-135M-Instruct" + (" shape, random weights" if a.random_weights else ""),
                         "dtype": "bfloat16", "context": a.context,
                                    "plain_step_ms": plain_ms, "plain_step_gpu_ms": plain_gpu, "rows": rows,
                                    "note": "untrained heads with random weights; median of CUDA-graph replays (*_ms: events "
                                            "around one replay on an idle GPU; *_gpu_ms: do_bench, queued, cold L2); "
                                            "draft includes EAGLE's catch-up, verify includes acceptance and "
                                            "KV compaction"})
    print(f"plain decode step {plain_ms:.3f} ms (queued, cold L2: {plain_gpu:.3f} ms) -> {path}")


if __name__ == "__main__":
    main()
