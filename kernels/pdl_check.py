"""PDL on the GPU: a chain of SmolLM2-shaped GEMVs under a CUDA graph, with PDL off and on.

    python -m kernels.pdl_check [--layers 30] [--replays 50]

Per layer, 4 dependent launches at M=1, bf16, each reading the previous output: qkv [1728, 576]
with the norm, wo [576, 576] (on the first 576 qkv columns) with the residual, w13 [3072, 576]
with the norm and SiLU, w2 [576, 1536] with the residual. 30 layers: 120 launches, 239 MB of
weights (more than the H100's 50 MB L2, so they stream from HBM as in decoding). Captures the
chain twice (PDL off, on), checks the outputs are bitwise equal, times replays with CUDA events
(interleaved off/on, median; each timed replay queued behind an untimed one, so the host's
submission is not counted), prints a table and a JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from . import linear as L
from ._common import pdl_enabled, pdl_supported

D, QKV, I = 576, 1728, 1536
HBM_BPS = 3.0e12                                   # H100 device-to-device copy, ../shared/GPU.md


def build(layers: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, device="cuda", generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    def nw():
        return (1 + 0.2 * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16)

    x = torch.randn(1, D, device="cuda", generator=g).to(torch.bfloat16)
    ws = [(w(QKV, D), nw(), w(D, D), w(2 * I, D), nw(), w(D, I)) for _ in range(layers)]
    return x, ws


def chain(x, ws):
    h = x
    for wqkv, n1, wo, w13, n2, w2 in ws:
        qkv = L.linear(h, wqkv, norm_weight=n1)
        h = L.linear(qkv[:, :D], wo, residual=h)
        h = L.linear(L.linear_silu(h, w13, n2), w2, residual=h)
    return h


def capture(on: bool, x, ws):
    with pdl_enabled(on):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            chain(x, ws)                           # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = chain(x, ws)
    return g, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--replays", type=int, default=50)
    args = ap.parse_args(argv)
    if not pdl_supported():
        raise SystemExit("PDL needs a CUDA GPU of capability >= 9.0 (and TRITON_INTERPRET unset)")
    x, ws = build(args.layers)
    graphs = {on: capture(on, x, ws) for on in (False, True)}
    for g, _ in graphs.values():
        for _ in range(5):
            g.replay()
    torch.cuda.synchronize()
    out_off, out_on = (graphs[on][1].clone() for on in (False, True))
    equal = torch.equal(out_off, out_on) and bool(torch.isfinite(out_off.float()).all())
    times = {False: [], True: []}
    for _ in range(args.replays):
        for on, (g, _) in graphs.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            g.replay()            # keeps the GPU busy while the timed replay is submitted
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            times[on].append(a.elapsed_time(b) * 1e3)          # us
    launches = 4 * args.layers
    weight_bytes = sum(t.numel() * t.element_size() for lw in ws for t in lw)
    med = {on: statistics.median(t) for on, t in times.items()}
    floor_us = weight_bytes / HBM_BPS * 1e6
    print(f"{torch.cuda.get_device_name()}  {launches} launches  {weight_bytes / 1e6:.0f} MB of weights "
          f"(floor {floor_us:.0f} us at 3.0 TB/s)  outputs bitwise equal: {equal}")
    print(f"{'PDL':<5}{'us/chain':>10}{'us/launch':>11}{'GB/s':>8}")
    for on in (False, True):
        print(f"{'on' if on else 'off':<5}{med[on]:>10.1f}{med[on] / launches:>11.2f}"
              f"{weight_bytes / med[on] / 1e3:>8.0f}")
    print(f"speedup {med[False] / med[True]:.3f}x")
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": __import__("triton").__version__, "layers": args.layers,
                      "launches": launches, "weight_bytes": weight_bytes, "replays": args.replays,
                      "us_per_chain_off": round(med[False], 2), "us_per_chain_on": round(med[True], 2),
                      "speedup": round(med[False] / med[True], 4), "bitwise_equal": equal}))
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
