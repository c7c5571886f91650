"""PNG figures from the committed results (no GPU needed):
  cost_vs_k.png      drafting and iteration cost against K (spec_cost.json), as multiples of a plain step
  mtbench_heads.png  tau and speedup of the shipped heads on MT-bench (mtbench.json)

    python -m bench.plots
"""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import RESULTS  # noqa: E402


def cost_vs_k():
    r = json.loads((RESULTS / "spec_cost.json").read_text())
    plain = r["plain_step_ms"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("medusa", "eagle")):
        for depth, style in ((1, "o-"), (4, "s-"), (8, "^-")):
            rows = sorted((x for x in r["rows"] if x["kind"] == kind and x["mode"] == "chain" and x["depth"] == depth),
                          key=lambda x: x["K"])
            if rows:
                ax.plot([x["K"] for x in rows], [x["draft_ms"] / plain for x in rows], style, label=f"draft, chain d={depth}")
        rows = sorted((x for x in r["rows"] if x["kind"] == kind and x["mode"] == "tree" and x["tree_size"] == 64),
                      key=lambda x: x["K"])
        ax.plot([x["K"] for x in rows], [x["iteration_ms"] / plain for x in rows], "k--", label="whole iteration, tree N=64")
        ax.set_title(f"{kind}: cost against K (SmolLM2, H100)")
        ax.set_xlabel("K (layers per head)")
        ax.set_ylabel("x one plain decode step")
        ax.set_xticks([1, 2, 3])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"commit {r['commit'][:7]}, plain step {plain:.3f} ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "cost_vs_k.png", dpi=110)


def mtbench_heads():
    r = json.loads((RESULTS / "mtbench.json").read_text())
    ms = r["methods"]
    labels = [f"{m['kind']} K={m['K']}\n{m['mode']}" for m in ms]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(labels, [m["tau"] for m in ms], color="tab:blue")
    axes[0].set_ylabel("tau (tokens per target forward)")
    axes[1].bar(labels, [m["speedup"] for m in ms], color="tab:green")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_ylabel("walltime speedup vs koala plain")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"MT-bench, {r['settings']['questions']} questions x 2 turns, greedy, H100 "
                 f"(commit {r['commit'][:7]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "mtbench_heads.png", dpi=110)


if __name__ == "__main__":
    cost_vs_k()
    mtbench_heads()
    print(f"wrote {RESULTS / 'cost_vs_k.png'} and {RESULTS / 'mtbench_heads.png'}")
