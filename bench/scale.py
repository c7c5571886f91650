"""Scale projection: the speculative loop on a Llama-7B-shaped target with random bf16 weights
and random heads (acceptance is meaningless there, so this measures cost only). One iteration's
draft, verify and accept as a multiple of one plain decode step, for chain depths 1..8 and trees
up to 64 nodes, and the speedup that implies at tau = 3, 4, 5:
    speedup(tau) = tau * plain_step / iteration.
The 7B weights are 13.5 GB: the bandwidth floor is 4.5 ms a step on the H100.

    python -m bench.scale [--preset llama-7b] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from bench.common import write
from bench.common import plain_step_ms
from bench.spec_cost import iteration_ms, random_head
from koala.config import ModelConfig
from koala.loading import LoadedTarget
from koala.model import Transformer


def random_target(preset: str, device, dtype, n_layers: int | None = None) -> LoadedTarget:
    """The preset's shape with random weights (normal(0, 0.02), unit norms); n_layers replaces
    the preset's layer count (bench.layer_share)."""
    cfg = ModelConfig.from_name(preset)
    if n_layers is not None:
        cfg = dataclasses.replace(cfg, n_layers=n_layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():  # never zeros: real-looking magnitudes
            p.normal_(0, 0.02)
        for layer in model.layers:
            layer.attention_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
    model = model.to(dtype).eval().requires_grad_(False)
    name = f"{preset}-random" + (f"-{n_layers}l" if n_layers is not None else "")
    return LoadedTarget(model=model, tokenizer=None, name=name, source="random")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-7b")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--out", default="scale.json", help="result file name")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lt = random_target(a.preset, dev, torch.bfloat16 if dev == "cuda" else torch.float32)
    plain = plain_step_ms(lt, a.context, a.max_seq_len) if dev == "cuda" else float("nan")
    depths = [1, 2, 4, 8] if a.quick else list(range(1, 9))
    trees = [16, 64] if a.quick else [8, 16, 32, 64]
    rows = []
    for kind in ("eagle", "medusa"):
        configs = [dict(mode="chain", depth=d) for d in depths if kind == "eagle" or d <= 5]
        configs += [dict(mode="tree", tree_size=n, top_k=8, depth=6 if kind == "eagle" else 5) for n in trees]
        head = random_head(lt, kind, 1)
        for opts in configs:
            if dev != "cuda":  # CPU: a functional check of the script only
                continue
            d_ms, v_ms, N = iteration_ms(lt, head, opts, a.context, a.max_seq_len)
            it = d_ms + v_ms
            row = {"kind": kind, "K": 1, **opts, "N": N, "draft_ms": d_ms, "verify_ms": v_ms,
                   "iteration_over_plain_step": it / plain,
                   "implied_speedup": {str(t): t * plain / it for t in (3, 4, 5)}}
            rows.append(row)
            print(f"{kind:6} {opts['mode']:5} N={N:3} draft {d_ms:6.2f} verify {v_ms:6.2f} ms = "
                  f"{it / plain:4.2f} x step; speedup at tau 3/4/5: "
                  + " / ".join(f"{row['implied_speedup'][str(t)]:.2f}" for t in (3, 4, 5)), flush=True)
            torch.cuda.empty_cache()
    if dev == "cuda":
        path = write(a.out, {"preset": a.preset, "weights_GB": lt.model.config.n_params * 2 / 1e9,
                                    "plain_step_ms": plain, "context": a.context, "rows": rows})
        print(f"plain step {plain:.2f} ms -> {path}")
    else:
        print(f"built {a.preset} ({lt.model.config.n_params / 1e9:.2f} B parameters) and its heads; "
              "timing needs a CUDA GPU")


if __name__ == "__main__":
    main()
