"""Batch size > 1: throughput of SpeculativeGenerator.generate_batch (greedy) at several batch
sizes, plainly and with the shipped heads' chains, on MT-bench first turns; batch 1 also through
generate() (CUDA graphs) for reference. Writes batch.json.

    python -m bench.batch [--batches 1,2,4,8] [--heads none,eagle,medusa] [--new-tokens 128] [--eager 1,8]
                          [--prompts 8] [--model PATH --device cpu --dtype float32]   (CPU: smoke only)

Per (head, B): the first `--prompts` questions (one a category, then the next ones) in groups of
B, each group decoded by two generate_batch calls in a row; tokens/s = all new tokens / all wall
time of the second calls (the batch's caches and CUDA graphs made), `cold_tokens_per_s` the same
for the first calls (which allocate and capture what they need), with tau over all rows. Each
head's first group runs once untimed first (compilation). `--eager` batch sizes are also timed
through the same path without CUDA graphs (`eager_tokens_per_s`).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import koala

from bench.common import mt_bench, write
from koala import SpeculativeGenerator, load_target
from koala.heads import load_head

_SHIPPED = Path(koala.__file__).parent / "default_heads"
HEADS = {"none": None, "eagle": _SHIPPED / "eagle", "medusa": _SHIPPED / "medusa"}


def _prompts(n: int) -> list[str]:
    qs = mt_bench()
    order = [q for i in range(10) for q in qs[i::10]]      # round-robin over the categories
    return [q["turns"][0] for q in order[:n]]


def _time_groups(gen, groups, new_tokens):
    """Each group decoded twice in a row: the first call may allocate the batch's caches and
    capture its graphs (cold), the second reuses them (warm). Returns both sums and tau."""
    cold = warm = 0.0
    new = produced = steps = 0
    for g in groups:
        cold += gen.generate_batch(g, max_new_tokens=new_tokens, ignore_eos=True)[0].stats.wall_s
        res = gen.generate_batch(g, max_new_tokens=new_tokens, ignore_eos=True)
        warm += res[0].stats.wall_s
        new += sum(r.stats.new_tokens for r in res)
        for r in res:
            produced += sum(a + 1 for a in r.stats.accepted_per_step)
            steps += len(r.stats.accepted_per_step)
    return cold, warm, new, produced / steps if steps else None


def run(lt, heads, batches, prompts, new_tokens, max_seq_len, eager_batches=()):
    rows = []
    for name in heads:
        head = None if HEADS.get(name, name) is None else load_head(HEADS.get(name, name), lt)
        gen = SpeculativeGenerator(lt, head, max_seq_len=max_seq_len, mode="chain")
        eager = SpeculativeGenerator(lt, head, max_seq_len=max_seq_len, mode="chain", use_cuda_graph=False)
        for B in batches:
            groups = [prompts[i:i + B] for i in range(0, len(prompts) - B + 1, B)]
            gen.generate_batch(groups[0], max_new_tokens=8, ignore_eos=True)        # compile the kernels
            cold, warm, new, tau = _time_groups(gen, groups, new_tokens)
            row = {"head": name, "batch": B, "groups": len(groups), "new_tokens": new,
                   "wall_s": warm, "tokens_per_s": new / warm if warm > 0 else 0.0, "tau": tau if head else None,
                   "cold_wall_s": cold, "cold_tokens_per_s": new / cold if cold > 0 else 0.0}
            if B in eager_batches:   # the same batch path without CUDA graphs
                e_cold, e_warm, e_new, _ = _time_groups(eager, groups, new_tokens)
                row["eager_tokens_per_s"] = e_new / e_warm if e_warm > 0 else 0.0
            if B == 1:   # the batch-1 path with its CUDA graphs, same prompts
                gen.warmup()          # every window's graphs, so no capture is timed
                t = time.perf_counter()
                n1 = sum(gen.generate(g[0], max_new_tokens=new_tokens, ignore_eos=True).stats.new_tokens
                         for g in groups)
                row["generate_tokens_per_s"] = n1 / (time.perf_counter() - t)
            print(f"{name:7} B={B:2}  {row['tokens_per_s']:9.1f} tokens/s (first calls {row['cold_tokens_per_s']:.1f})"
                  + (f"  tau {row['tau']:.2f}" if row["tau"] else "")
                  + (f"  eager {row['eager_tokens_per_s']:.1f}" if "eager_tokens_per_s" in row else "")
                  + (f"  (generate: {row['generate_tokens_per_s']:.1f})" if "generate_tokens_per_s" in row else ""),
                  flush=True)
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--heads", default="none,eagle,medusa", help="none, eagle, medusa or head directories")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--eager", default="1,8", help="batch sizes also timed without CUDA graphs ('' for none)")
    ap.add_argument("--out", default="batch.json")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.batch times a CUDA GPU (--device cpu runs it as a smoke test)")
    lt = load_target(a.model, device=a.device, dtype=getattr(torch, a.dtype))
    batches = [int(b) for b in a.batches.split(",")]
    eager = [int(b) for b in a.eager.split(",") if b]
    rows = run(lt, a.heads.split(","), batches, _prompts(a.prompts), a.new_tokens, a.max_seq_len, eager)
    path = write(a.out, {"model": a.model, "dtype": a.dtype, "mode": "greedy", "new_tokens": a.new_tokens,
                         "prompts": a.prompts, "rows": rows})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
