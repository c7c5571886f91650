"""Kernel-level profile of one plain decode step, or one speculative iteration's draft and
verify halves (eager, as captured): kernels launched and where the time goes.

    python -m bench.profile_step [--spec eagle|medusa] [--layers K] [--mode chain|tree]
        [--depth D] [--tree-size N] [--top-k k] [--random-weights] [--rows R]

--random-weights profiles SmolLM2's shape with random weights (bench.scale.random_target): no
model to stage, the same kernels and shapes.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from koala import SpeculativeGenerator, load_target


def report(title, fn, rows=15):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in ev) if ev and hasattr(ev[0], "device_time") else float("nan")
    print(f"== {title}: {len(ev)} kernels, {total:.0f} us of kernel time")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", choices=["eagle", "medusa"], default=None)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--mode", default="chain")
    ap.add_argument("--depth", type=int, default=None,
                    help="chain depth (default 4) or tree depth (default: the decoder's)")
    ap.add_argument("--tree-size", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--rows", type=int, default=15, help="kernels listed per table")
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2's shape with random weights: no model to stage")
    a = ap.parse_args()
    if a.random_weights:
        from bench.scale import random_target
        lt = random_target("smollm2-135m", "cuda", torch.bfloat16)
    else:
        lt = load_target("smollm2-135m-instruct", device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        if a.spec is None:
            gen = SpeculativeGenerator(lt, max_seq_len=2048)
            dec = gen.plain

            def step():
                dec.step.zero_(); dec.pos.fill_(300); dec._step(True, 512)
            for _ in range(3):
                step()
            report("plain decode step", step, a.rows)
            return
        from bench.spec_cost import random_head
        head = random_head(lt, a.spec, a.layers)
        if a.mode == "chain":
            opts = dict(mode="chain", depth=a.depth or 4)
        else:
            opts = dict(mode="tree", tree_size=a.tree_size, top_k=a.top_k, depth=a.depth)
        gen = SpeculativeGenerator(lt, head, max_seq_len=2048, use_cuda_graph=False, **opts)
        spec = gen.spec
        W = spec.window(300)

        def reset():
            spec.L.fill_(300); spec.cu_n.fill_(1)
        with spec._exact():   # the numerics mode the decoder's graphs are captured in
            for _ in range(3):
                reset(); spec.draft(W); spec.verify(W)
            reset()
            report("draft", lambda: spec.draft(W), a.rows)
            reset()
            report("verify", lambda: spec.verify(W), a.rows)


if __name__ == "__main__":
    main()
