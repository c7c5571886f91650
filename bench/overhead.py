"""Where the wall time of a generation goes: GPU work, host work, and the GPU's idle time.

MT-bench's tokens/s count a turn's whole `generate()` call. For each method this measures, on the
first --questions questions (both turns, greedy):
- per turn: the prefill's wall time, the decode loop's wall time, and (speculative) the GPU time
  of the draft and verify graphs (CUDA events), so that `host_gap_ms_per_iter` is the part of an
  iteration's wall time that no graph fills;
- per captured graph: the GPU time of one replay (events around back-to-back replays) and the
  host time that `replay()` itself takes (time.perf_counter around the same calls, before any
  synchronisation). When the host takes longer to submit an iteration than the GPU takes to run
  it, the loop is bound by the host, whatever the kernels cost;
- one profiled turn (torch.profiler, CUDA activity): the span of the decode and the union of the
  GPU's kernel intervals in it, i.e. how much of the time the GPU sat idle;
- the prefill alone (the target's, and an EAGLE head's over the prompt's features) at several
  prompt lengths, with exact mode's batch-invariant kernels on and off (--prefill-lengths).

    python -m bench.overhead [--heads koala/default_heads/eagle,koala/default_heads/medusa]
        [--questions 10] [--max-new-tokens 256] [--out overhead.json]
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import mt_bench, write
from bench.mtbench import select


def _replay_cost(graphs, reset, n=40):
    """(GPU ms, host ms) per replay of the graph sequence `graphs` (one iteration), n times."""
    torch.cuda.synchronize()
    for _ in range(3):
        reset()
        for g in graphs:
            g.replay()
    torch.cuda.synchronize()
    host = 0.0
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        reset()
        t = time.perf_counter()
        for g in graphs:
            g.replay()
        host += time.perf_counter() - t
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n, 1e3 * host / n


def _kernel_busy(prof):
    """(span ms, busy ms, kernels): the GPU events' span and the union of their intervals."""
    iv = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0:
            iv.append((e.time_range.start, e.time_range.end))
    if not iv:
        return 0.0, 0.0, 0
    iv.sort()
    busy, cs, ce = 0, iv[0][0], iv[0][1]
    for s, e in iv[1:]:
        if s > ce:
            busy += ce - cs
            cs, ce = s, e
        else:
            ce = max(ce, e)
    busy += ce - cs
    return (iv[-1][1] - iv[0][0]) / 1e3, busy / 1e3, len(iv)


def _wall_ms(fn, reps=5):
    fn(); fn()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize(); t = time.perf_counter()
        fn()
        torch.cuda.synchronize(); ts.append(1e3 * (time.perf_counter() - t))
    return sorted(ts)[len(ts) // 2]


def prefill_sweep(gen, lengths):
    """Median wall ms of the target's prefill forward (and of the EAGLE head's prompt pass, when
    gen has one) at each prompt length, exact mode on and off."""
    from koala.model import _Fast, causal_mask
    model, dev = gen.model, gen.device
    head = gen.spec.head if gen.spec is not None and gen.spec.eagle else None
    rows = []
    for n in lengths:
        ids = torch.randint(100, 20000, (1, n), device=dev)
        s = torch.arange(n, device=dev)
        m = causal_mask(s, gen.plain.window(n - 1))
        last = torch.tensor([n - 1], device=dev)
        row = {"prompt_tokens": n}
        if gen.prefill_graphs is not None and gen.prefill_graphs.bucket(n) is not None:
            host_ids = ids[0].tolist()           # the generator's path: graphs (with the head's pass)
            with torch.inference_mode():
                row["graph_ms"] = _wall_ms(lambda: gen.prefill_graphs.run(host_ids))
        hidden = None
        for exact in (True, False):
            saved = _Fast.exact
            _Fast.exact = exact
            try:
                with torch.inference_mode():
                    row[f"target_ms_exact_{'on' if exact else 'off'}"] = _wall_ms(
                        lambda: model(ids, s[None], s, m, logits_index=last))
                    if head is not None:
                        if hidden is None:
                            hidden = model(ids, s[None], s, m, logits_index=last)[1]
                        p = s[: n - 1]
                        row[f"head_ms_exact_{'on' if exact else 'off'}"] = _wall_ms(
                            lambda: head(ids[:, 1:], hidden[:, : n - 1], p[None], p, causal_mask(p, m.shape[-1])))
            finally:
                _Fast.exact = saved
        rows.append(row)
    return rows


def run(gen, questions, max_new, name, lengths=()):
    gen.warmup([0.0])
    spec = gen.spec
    head_s = []
    if spec is not None and spec.eagle:            # time the head's pass over the prompt apart
        inner = spec._eagle_prefill

        def timed(*args, **kw):
            torch.cuda.synchronize(); t = time.perf_counter()
            inner(*args, **kw)
            torch.cuda.synchronize(); head_s.append(time.perf_counter() - t)
        spec._eagle_prefill = timed
    turns = []
    for q in questions:
        msgs = []
        for text in q["turns"][:2]:
            msgs.append({"role": "user", "content": text})
            r = gen.generate(list(msgs), max_new_tokens=max_new)
            msgs.append({"role": "assistant", "content": r.text})
            s = r.stats
            turns.append({"prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens, "wall_s": s.wall_s,
                          "prefill_s": s.prefill_s, "iters": s.target_forwards,
                          "draft_s": getattr(s, "draft_s", None), "verify_s": getattr(s, "verify_s", None),
                          "head_prefill_s": head_s[-1] if head_s else None})
    if head_s:
        del spec._eagle_prefill
    tok = sum(t["new_tokens"] for t in turns)
    wall = sum(t["wall_s"] for t in turns)
    pre = sum(t["prefill_s"] for t in turns)
    iters = sum(t["iters"] for t in turns)
    out = {"method": name, "prefill_graphs": gen.prefill_graphs is not None, "turns": len(turns),
           "new_tokens": tok, "wall_s": wall, "tokens_per_s": tok / wall,
           "prefill_s": pre, "prefill_ms_per_turn": 1e3 * pre / len(turns), "decode_s": wall - pre,
           "target_forwards": iters, "decode_ms_per_forward": 1e3 * (wall - pre) / max(1, iters)}
    if head_s:
        out["head_prefill_ms_per_turn"] = 1e3 * sum(head_s) / len(turns)
    if spec is not None and all(t["draft_s"] is not None for t in turns):
        gpu = sum(t["draft_s"] + t["verify_s"] for t in turns)
        out.update(tau=sum(t["new_tokens"] for t in turns) / max(1, iters),
                   gpu_ms_per_iter=1e3 * gpu / iters,
                   host_gap_ms_per_iter=1e3 * (wall - pre - gpu) / iters,
                   host_gap_ms_per_iter_less_head_prefill=1e3 * (wall - pre - gpu - sum(head_s)) / iters)
    # replay costs of every captured graph, at the largest window reached
    costs = {}
    if spec is not None:
        for key, (gd, gv) in spec.graphs.items():
            def reset(spec=spec):
                spec.L.fill_(64); spec.cu_n.fill_(1)
            g_ms, h_ms = _replay_cost([gd, gv], reset)
            gd_ms, hd_ms = _replay_cost([gd], reset)
            costs[str(key)] = {"iteration_gpu_ms": g_ms, "iteration_host_ms": h_ms,
                               "draft_gpu_ms": gd_ms, "draft_host_ms": hd_ms}
    else:
        plain = gen.plain
        for key, g in plain.graphs.items():
            def reset(plain=plain):
                plain.step.zero_(); plain.pos.fill_(64)
            g_ms, h_ms = _replay_cost([g], reset)
            costs[str(key)] = {"step_gpu_ms": g_ms, "step_host_ms": h_ms}
    out["graphs"] = costs
    out["turn_records"] = turns
    if lengths:
        out["prefill_sweep"] = prefill_sweep(gen, lengths)
    # one profiled turn: the GPU's busy fraction over the whole generate() call
    from torch.profiler import ProfilerActivity, profile
    q = questions[0]
    msgs = [{"role": "user", "content": q["turns"][0]}]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        r = gen.generate(msgs, max_new_tokens=max_new)
        torch.cuda.synchronize()
        w = time.perf_counter() - t
    span, busy, n = _kernel_busy(prof)
    out["profiled_turn"] = {"new_tokens": r.stats.new_tokens, "wall_ms": 1e3 * w, "gpu_span_ms": span,
                            "gpu_busy_ms": busy, "gpu_idle_ms": span - busy, "kernels": n,
                            "note": "profiling slows the host; read the busy fraction, not the speed"}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", default="koala/default_heads/eagle,koala/default_heads/medusa")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prefill-lengths", default="16,64,128,129,256,512,1024",
                    help="prompt lengths of the prefill sweep (empty: none)")
    ap.add_argument("--out", default="overhead.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.overhead measures CUDA graphs: it needs a GPU")
    from koala import SpeculativeGenerator
    from koala.loading import load_target
    from koala.speculative import resolve_draft
    lt = load_target("smollm2-135m-instruct", device="cuda", dtype=torch.bfloat16)
    qs = select(mt_bench(), a.questions)
    lengths = [int(x) for x in a.prefill_lengths.split(",") if x.strip()]
    results = [run(SpeculativeGenerator(lt, None), qs, a.max_new_tokens, "plain", lengths)]
    for h in [x for x in a.heads.split(",") if x]:
        g = SpeculativeGenerator(lt, resolve_draft(h, lt))
        results.append(run(g, qs, a.max_new_tokens, h, lengths if g.spec.eagle else ()))
    path = write(a.out, {"settings": vars(a), "methods": results})
    print(f"{'method':34s} {'tok/s':>7s} {'prefill ms':>10s} {'ms/fwd':>7s} {'gpu ms/it':>9s} {'gap ms/it':>9s}")
    for m in results:
        print(f"{m['method'][-34:]:34s} {m['tokens_per_s']:7.0f} {m['prefill_ms_per_turn']:10.2f} "
              f"{m['decode_ms_per_forward']:7.3f} {m.get('gpu_ms_per_iter', float('nan')):9.3f} "
              f"{m.get('host_gap_ms_per_iter', float('nan')):9.3f}")
        for k, c in m["graphs"].items():
            print(f"   graph {k}: " + ", ".join(f"{n} {v:.3f}" for n, v in c.items()))
        if "head_prefill_ms_per_turn" in m:
            print(f"   EAGLE head's prompt pass: {m['head_prefill_ms_per_turn']:.2f} ms a turn")
        for r in m.get("prefill_sweep", []):
            print("   prefill " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in r.items()))
        p = m["profiled_turn"]
        print(f"   profiled turn: span {p['gpu_span_ms']:.1f} ms, GPU busy {p['gpu_busy_ms']:.1f} ms "
              f"({100 * p['gpu_busy_ms'] / max(1e-9, p['gpu_span_ms']):.0f}%), {p['kernels']} kernels")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
