"""PNG figures from the committed results (no GPU needed):
  cost_vs_k.png           drafting and iteration cost against K (spec_cost.json), as multiples of a plain step
  mtbench_heads.png       tau and speedup of the shipped heads on MT-bench (mtbench.json)
  fig4_speedup.png        the paper's Fig. 4: speedup of Medusa and EAGLE, K = 1 without adversarial learning
                          against the best K >= 2 with it (heads.json), plus the shipped heads (--defaults, T = 0)
  fig5_speedup_vs_k.png   Fig. 5: speedup and tau against K, per kind, adversarial learning on (off dashed)
  fig6_adversarial.png    Fig. 6: tau and speedup without and with adversarial learning, per kind and K
  sampling.png            tau and speedup against temperature (--sampling, from bench.mtbench --temperatures)

    python -m bench.plots [--heads heads.json] [--defaults mtbench_sampling.json[,B.json]]
                          [--sampling mtbench_sampling.json[,B.json]] [--only fig4,fig5] [--out-dir DIR]

Input names are looked up as given, then under bench/results/. A figure whose input is missing is
skipped with a message; the others are still drawn.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import RESULTS  # noqa: E402

COLOR = {"medusa": "tab:orange", "eagle": "tab:blue"}
LABEL = {"medusa": "Medusa", "eagle": "EAGLE"}
KINDS = ("medusa", "eagle")


def _save(fig, out, title: str, fontsize: int):
    """Title the figure with its provenance, write the PNG and free the figure."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _first_eval(heads_json: dict) -> dict:
    """The first MT-bench file heads.json was built from (its device and commit stamp the figure)."""
    return (heads_json.get("sources", {}).get("evals") or [{}])[0]


def _find(path) -> Path:
    p = Path(path)
    return p if p.exists() or p.is_absolute() else RESULTS / p


def _load(path, what: str):
    """The JSON at path, or None (printing why the figure is skipped)."""
    p = _find(path)
    if not p.is_file():
        print(f"{what}: skipped ({p} not found)")
        return None
    return json.loads(p.read_text())


def _stamp(r: dict) -> str:
    return f"{r.get('device', '?')}, commit {str(r.get('commit', '?'))[:7]}"


def cost_vs_k(src="spec_cost.json", out=RESULTS / "cost_vs_k.png"):
    r = _load(src, "cost_vs_k.png")
    if r is None:
        return None
    plain = r["plain_step_ms"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("medusa", "eagle")):
        for depth, style in ((1, "o-"), (4, "s-"), (8, "^-")):
            rows = sorted((x for x in r["rows"] if x["kind"] == kind and x["mode"] == "chain" and x["depth"] == depth
                           and x.get("kernels", True)),
                          key=lambda x: x["K"])
            if rows:
                ax.plot([x["K"] for x in rows], [x["draft_ms"] / plain for x in rows], style, label=f"draft, chain d={depth}")
        rows = sorted((x for x in r["rows"] if x["kind"] == kind and x["mode"] == "tree" and x["tree_size"] == 64
                       and x.get("kernels", True)),
                      key=lambda x: x["K"])
        ax.plot([x["K"] for x in rows], [x["iteration_ms"] / plain for x in rows], "k--", label="whole iteration, tree N=64")
        ax.set_title(f"{kind}: cost against K (SmolLM2, H100)")
        ax.set_xlabel("K (layers per head)")
        ax.set_ylabel("x one plain decode step")
        ax.set_xticks([1, 2, 3])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out, f"commit {r['commit'][:7]}, plain step {plain:.3f} ms", 9)


def mtbench_heads(src="mtbench.json", out=RESULTS / "mtbench_heads.png"):
    r = _load(src, "mtbench_heads.png")
    if r is None:
        return None
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
    return _save(fig, out, f"MT-bench, {r['settings']['questions']} questions x 2 turns, greedy, H100 "
                 f"(commit {r['commit'][:7]})", 9)


# ------------------------------------------------------------------ the paper's figures (heads.json)
def _ev(heads: dict, kind: str, k: int, adv: bool) -> dict | None:
    return heads.get(f"{kind}-k{k}-{'adv' if adv else 'base'}", {}).get("eval")


def _ks(heads: dict) -> list[int]:
    return sorted({h["K"] for h in heads.values()})


def _bars(ax, xs, vals, colors, hatches=None):
    bars = ax.bar(xs, [v if v is not None else 0 for v in vals], color=colors, edgecolor="k", linewidth=0.5,
                  hatch=None)
    for i, (b, v) in enumerate(zip(bars, vals)):
        if hatches and hatches[i]:
            b.set_hatch(hatches[i])
        ax.annotate("n/a" if v is None else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)


def _temperature(m: dict, r: dict) -> float:
    return float(m.get("temperature", r.get("settings", {}).get("temperature", 0.0)))


def fig4_speedup(heads_src="heads.json", defaults_src=(), out=RESULTS / "fig4_speedup.png"):
    """defaults_src: mtbench files whose greedy rows (the shipped heads) are added as bars."""
    r = _load(heads_src, "fig4_speedup.png")
    if r is None:
        return None
    heads = r["heads"]
    labels, vals, colors, hatches = [], [], [], []
    for kind in KINDS:
        base = _ev(heads, kind, 1, False)
        adv = [(h["K"], h["eval"]) for h in heads.values()
               if h["kind"] == kind and h["adversarial"] and h["K"] >= 2 and h["eval"]]
        if base is None and not adv:
            continue
        labels.append(f"{LABEL[kind]}\nK=1 w/o adv.")
        vals.append(base["speedup"] if base else None)
        colors.append(COLOR[kind]); hatches.append("")
        if adv:
            k, e = max(adv, key=lambda x: x[1]["speedup"])
            labels.append(f"{LABEL[kind]}\nKOALA K={k}")
            vals.append(e["speedup"])
            colors.append(COLOR[kind]); hatches.append("//")
    stamps = []
    for src in defaults_src or ():
        d = _load(src, f"fig4_speedup.png, shipped heads ({src})")
        if d is None:
            continue
        rows = [m for m in d.get("methods", []) if _temperature(m, d) == 0]
        if rows:                     # a file of sampled rows only adds no bar and no stamp
            stamps.append(_stamp(d))
        for m in rows:
            labels.append(f"shipped {LABEL.get(m['kind'], m['kind'])}\nK={m['K']} {m['mode']}")
            vals.append(m["speedup"])
            colors.append(COLOR.get(m["kind"], "gray")); hatches.append("..")
    note = f"; shipped heads: {'; '.join(sorted(set(stamps)))}" if stamps else ""
    if not labels:
        print("fig4_speedup.png: skipped (no evaluated heads in heads.json)")
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    _bars(ax, labels, vals, colors, hatches)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("walltime speedup vs koala plain")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("MT-bench speedup, greedy\nablation heads (chain): K=1 w/o adv. vs best K>=2 w/ adv.; shipped heads",
                 fontsize=9)
    ev = _first_eval(r)
    return _save(fig, out, f"ablation heads: {_stamp(ev)}{note}", 8)


def fig5_speedup_vs_k(heads_src="heads.json", out=RESULTS / "fig5_speedup_vs_k.png"):
    r = _load(heads_src, "fig5_speedup_vs_k.png")
    if r is None:
        return None
    heads = r["heads"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for ax, key, ylabel in ((axes[0], "speedup", "walltime speedup vs koala plain"),
                            (axes[1], "tau", "tau (tokens per target forward)")):
        for kind in KINDS:
            for adv, style in ((True, "o-"), (False, "s--")):
                pts = [(k, e[key]) for k in _ks(heads) if (e := _ev(heads, kind, k, adv)) and e.get(key) is not None]
                if pts:
                    drawn = True
                    ax.plot(*zip(*pts), style, color=COLOR[kind], alpha=1.0 if adv else 0.45,
                            label=f"{LABEL[kind]} {'w/ adv.' if adv else 'w/o adv.'}")
        ax.set_xlabel("K (layers per draft head)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(_ks(heads) or [1, 2, 3])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not drawn:
        plt.close(fig)
        print("fig5_speedup_vs_k.png: skipped (no evaluated heads in heads.json)")
        return None
    axes[0].axhline(1.0, color="k", lw=0.8)
    ev = _first_eval(r)
    return _save(fig, out, f"MT-bench, greedy, chain drafting: speedup and tau against K ({_stamp(ev)})", 9)


def fig6_adversarial(heads_src="heads.json", out=RESULTS / "fig6_adversarial.png"):
    r = _load(heads_src, "fig6_adversarial.png")
    if r is None:
        return None
    heads = r["heads"]
    groups = [(kind, k) for kind in KINDS for k in _ks(heads)
              if any(_ev(heads, kind, k, adv) for adv in (False, True))]
    if not groups:
        print("fig6_adversarial.png: skipped (no evaluated heads in heads.json)")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.38
    xs = range(len(groups))
    for ax, key, ylabel in ((axes[0], "tau", "tau (tokens per target forward)"),
                            (axes[1], "speedup", "walltime speedup vs koala plain")):
        for j, adv in enumerate((False, True)):
            vals = [(_ev(heads, kind, k, adv) or {}).get(key) for kind, k in groups]
            bars = ax.bar([x + (j - 0.5) * w for x in xs], [v or 0 for v in vals], w,
                          color=[COLOR[kind] for kind, _ in groups], alpha=1.0 if adv else 0.45,
                          hatch="//" if adv else None, edgecolor="k", linewidth=0.5,
                          label="w/ adv." if adv else "w/o adv.")
            for b, v in zip(bars, vals):
                ax.annotate("n/a" if v is None else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=6)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{LABEL[kind]}\nK={k}" for kind, k in groups], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].axhline(1.0, color="k", lw=0.8)
    ev = _first_eval(r)
    return _save(fig, out, f"without and with adversarial learning, MT-bench, greedy, chain ({_stamp(ev)})", 9)


def sampling(srcs=("mtbench_sampling.json",), out=RESULTS / "sampling.png"):
    """tau and speedup against temperature per (head, mode), from one or more mtbench files."""
    series, stamps = {}, []
    for src in srcs:
        r = _load(src, f"sampling.png ({src})")
        if r is None:
            continue
        stamps.append(_stamp(r))
        for m in r.get("methods", []):
            key = (m["kind"], m["K"], m["mode"], Path(m["head"]).name)
            series.setdefault(key, {})[_temperature(m, r)] = (m.get("tau"), m["speedup"])
    if not series:
        print("sampling.png: skipped (no sampling results)")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (kind, k, mode, head), pts in sorted(series.items()):
        ts = sorted(pts)
        style = "o-" if mode == "chain" else "s--"
        lab = (f"shipped {LABEL.get(kind, kind)} K={k} {mode}" if head == kind
               else f"{head} ({LABEL.get(kind, kind)} K={k}) {mode}")
        tau = [(t, pts[t][0]) for t in ts if pts[t][0] is not None]
        if tau:
            axes[0].plot(*zip(*tau), style, color=COLOR.get(kind), label=lab)
        axes[1].plot(ts, [pts[t][1] for t in ts], style, color=COLOR.get(kind), label=lab)
    axes[0].set_ylabel("tau (tokens per target forward)")
    axes[1].set_ylabel("speedup vs koala plain at the same T")
    axes[1].axhline(1.0, color="k", lw=0.8)
    for ax in axes:
        ax.set_xlabel("temperature")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out, f"MT-bench under sampling ({'; '.join(sorted(set(stamps)))})", 9)


FIGURES = ("cost_vs_k", "mtbench_heads", "fig4", "fig5", "fig6", "sampling")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec-cost", default="spec_cost.json")
    ap.add_argument("--mtbench", default="mtbench.json", help="for mtbench_heads.png")
    ap.add_argument("--heads", default="heads.json", help="bench.heads output, for Figs. 4-6")
    ap.add_argument("--defaults", default="mtbench.json",
                    help="comma-separated mtbench files with the shipped heads; their T=0 rows join Fig. 4 ('' for none)")
    ap.add_argument("--sampling", default="mtbench_sampling.json", help="comma-separated mtbench files for sampling.png")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(FIGURES)}")
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args(argv)
    only = {s for s in a.only.split(",") if s}
    bad = only - set(FIGURES)
    if bad:
        raise SystemExit(f"--only: unknown figures {sorted(bad)}; choose from {FIGURES}")
    d = Path(a.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    jobs = {"cost_vs_k": lambda: cost_vs_k(a.spec_cost, d / "cost_vs_k.png"),
            "mtbench_heads": lambda: mtbench_heads(a.mtbench, d / "mtbench_heads.png"),
            "fig4": lambda: fig4_speedup(a.heads, [s for s in a.defaults.split(",") if s], d / "fig4_speedup.png"),
            "fig5": lambda: fig5_speedup_vs_k(a.heads, d / "fig5_speedup_vs_k.png"),
            "fig6": lambda: fig6_adversarial(a.heads, d / "fig6_adversarial.png"),
            "sampling": lambda: sampling([s for s in a.sampling.split(",") if s], d / "sampling.png")}
    written = [p for name, job in jobs.items() if not only or name in only if (p := job()) is not None]
    for p in written:
        print(f"wrote {p}")
    return written


if __name__ == "__main__":
    main()
