"""python -m bench <name> [args]: one command per table or figure (each name is also
`python -m bench.<name>`). Without a name, the list. Every GPU benchmark writes its JSON under
bench/results/ (or $OUT) with device, date, commit, command and settings; see bench/README.md."""
from __future__ import annotations

import importlib
import sys

BENCHES = {
    "vanilla": "plain decoding ms/token: koala fused, koala PyTorch path, transformers generate (GPU)",
    "spec_cost": "one speculative iteration's draft and verify cost against a plain step, K = 1..4 (GPU)",
    "mtbench": "MT-bench tau, n-alpha, speedup per head, mode and temperature, with peers (GPU)",
    "batch": "generate_batch throughput at batch 1, 2, 4, 8, plain and with the shipped heads (GPU)",
    "scale": "the speculative loop's cost on a Llama-7B shape, implied speedup at tau 3, 4, 5 (GPU)",
    "kernels_bench": "each Triton kernel against its PyTorch reference, GB/s (GPU)",
    "linear_bench": "small-M linear kernels against cuBLAS (GPU)",
    "profile_step": "kernels launched per decode step or draft/verify half (GPU)",
    "layer_share": "one target layer's cost (plain step and verify) against an EAGLE draft layer's (GPU)",
    "attn_variants": "the decode / verify attention's us per launch at SmolLM2's shape, per tile choice (GPU)",
    "heads": "Table I from the ablation's training summary and its MT-bench files (CPU)",
    "depth": "tau, speedup and the KOALA tau gain against drafting depth and tree, per head (CPU)",
    "plots": "the README's figures from the committed JSON (CPU)",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n")
        for name, what in BENCHES.items():
            print(f"  {name:14} {what}")
        return 0
    name, rest = argv[0].replace("-", "_"), argv[1:]
    if name not in BENCHES:
        print(f"no benchmark {argv[0]!r}; choose one of: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    saved, sys.argv = sys.argv, [f"bench/{name}.py"] + rest    # each main() parses sys.argv
    try:
        out = module.main()
    finally:
        sys.argv = saved
    return out if isinstance(out, int) else 0


if __name__ == "__main__":
    sys.exit(main())
