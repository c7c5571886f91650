"""tau and speedup against drafting depth, per head, from bench.mtbench files (CPU, no GPU needed).

Table I measures every head at one chain depth. A deeper head's gain over the one-layer head grows
with the depth drafted (each accepted token compounds the next one's odds), so this table puts every
drafting setting a file measured (chain depth d, tree of N nodes and depth d) side by side for each
head, with the KOALA tau gain of each head over its kind's baseline head at that setting:

    python -m bench.depth --evals mtbench_eagle_depth_sweep_015a72a.json,mtbench_medusa_depth_sweep_015a72a.json \
        --labels /tmp/ablation/eagle-k1-base/head=eagle-k1-base,koala/default_heads/eagle=eagle-k3-adv \
        --baselines eagle-k1-base,medusa-k1-base --out depth_sweep_015a72a

writes <out>.json (every cell with its source file, device and commit), <out>.md (the table) and
<out>.png (tau and speedup against the setting, one line per head). Speedups are those of the
files: each against plain koala measured around it in the same run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import write
from bench.heads import resolve

TARGET_TAU_GAIN = 0.3   # issue 4: KOALA (K >= 2, adversarial) over the one-layer head, both kinds


def default_label(head: str) -> str:
    """A head's name from its path: the folder, or the folder above a trailing 'head'."""
    parts = [p for p in str(head).rstrip("/").split("/") if p]
    if not parts:
        return str(head)
    return parts[-2] if parts[-1] == "head" and len(parts) > 1 else parts[-1]


def parse_labels(text: str) -> dict[str, str]:
    out = {}
    for item in (s for s in text.split(",") if s):
        if "=" not in item:
            raise SystemExit(f"--labels: {item!r} is not PATH=LABEL (e.g. koala/default_heads/eagle=eagle-k3-adv)")
        path, label = item.split("=", 1)
        out[path.rstrip("/")] = label
    return out


def setting(m: dict) -> str:
    """The drafting setting of a method row, as the table's column name."""
    if m.get("mode") == "tree":
        return f"tree N={m.get('tree_size')} d={m.get('depth')}"
    return f"chain d={m.get('depth')}"


def _order(s: str) -> tuple:
    kind, rest = s.split(" ", 1)
    nums = [int(x.split("=")[1]) for x in rest.split(" ")]
    return (kind != "chain", nums[::-1] if kind == "tree" else nums)


def collect(evals: list[tuple[str, dict]], labels: dict[str, str], temperature: float = 0.0) -> dict:
    """{label: {"kind", "K", "cells": {setting: cell}}} from the files' methods at `temperature`.
    A cell measured twice (two files, or one file twice) is refused: which one would count?"""
    heads: dict[str, dict] = {}
    for src, ev in evals:
        for m in ev.get("methods", []):
            if float(m.get("temperature", ev.get("settings", {}).get("temperature", 0.0))) != temperature:
                continue
            label = labels.get(str(m["head"]).rstrip("/"), default_label(m["head"]))
            h = heads.setdefault(label, {"kind": m["kind"], "K": m.get("K"), "cells": {}})
            if h["kind"] != m["kind"] or h["K"] != m.get("K"):
                raise SystemExit(f"{label}: rows of different heads ({h['kind']} K={h['K']} and {m['kind']} "
                                 f"K={m.get('K')}) share one label; give them distinct --labels")
            s = setting(m)
            if s in h["cells"]:
                raise SystemExit(f"{label}, {s}: measured twice ({h['cells'][s]['source']} and {src}); "
                                 "pass one of the files")
            h["cells"][s] = {"tau": m["tau"], "alpha": m.get("alpha"), "speedup": m.get("speedup"),
                             "speedup_bounds": m.get("speedup_bounds"), "tokens_per_s": m.get("tokens_per_s"),
                             "draft_ms": m.get("draft_ms_per_iter"), "verify_ms": m.get("verify_ms_per_iter"),
                             "identical_to_plain": m.get("identical_to_plain"), "draft_vocab": m.get("draft_vocab"),
                             "source": src, "device": ev.get("device"), "commit": ev.get("commit")}
    return heads


def gains(heads: dict, baselines: list[str]) -> dict:
    """Per kind with a baseline: at each setting, every other head's tau gain over the baseline,
    and the best gain of a head with K >= 2 against the target."""
    out = {}
    for base in baselines:
        if base not in heads:
            raise SystemExit(f"--baselines: no head labelled {base!r} in the files (heads: {', '.join(heads)})")
        b = heads[base]
        per = {}
        for s, cell in b["cells"].items():
            row = {lab: round(h["cells"][s]["tau"] - cell["tau"], 4)
                   for lab, h in heads.items() if lab != base and h["kind"] == b["kind"] and s in h["cells"]}
            deep = {lab: g for lab, g in row.items() if (heads[lab]["K"] or 0) >= 2}
            best = max(deep, key=deep.get) if deep else None
            per[s] = {"baseline_tau": cell["tau"], "gain": row, "best": best,
                      "best_gain": deep.get(best) if best else None,
                      "met": bool(best) and deep[best] >= TARGET_TAU_GAIN}
        out[b["kind"]] = {"baseline": base, "settings": per}
    return out


def table_markdown(heads: dict, g: dict) -> str:
    settings = sorted({s for h in heads.values() for s in h["cells"]}, key=_order)
    lines = ["| head | K | " + " | ".join(settings) + " |", "|---|---|" + "---|" * len(settings)]
    for lab, h in sorted(heads.items(), key=lambda kv: (kv[1]["kind"], kv[1]["K"] or 0, kv[0])):
        cells = []
        for s in settings:
            c = h["cells"].get(s)
            cells.append("—" if c is None else f"{c['tau']:.2f} ({c['speedup']:.2f}x)" if c.get("speedup")
                         else f"{c['tau']:.2f}")
        lines.append(f"| {lab} | {h['K']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: tau (speedup against plain koala in the same run).")
    for kind, r in g.items():
        parts = []
        for s in sorted(r["settings"], key=_order):
            v = r["settings"][s]
            if v["best"]:
                parts.append(f"{s}: {v['best_gain']:+.2f} ({v['best']})")
        lines.append(f"- {kind} tau gain over {r['baseline']} (best K >= 2 head; target >= +{TARGET_TAU_GAIN}): "
                     + "; ".join(parts))
    return "\n".join(lines) + "\n"


def plot(heads: dict, out: Path, stamp: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = sorted({s for h in heads.values() for s in h["cells"]}, key=_order)
    x = {s: i for i, s in enumerate(settings)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"eagle": "tab:blue", "medusa": "tab:orange"}
    for lab, h in sorted(heads.items(), key=lambda kv: (kv[1]["kind"], kv[1]["K"] or 0)):
        for ax, key in ((axes[0], "tau"), (axes[1], "speedup")):
            pts = sorted((x[s], c[key]) for s, c in h["cells"].items() if c.get(key) is not None)
            if pts:
                k = h["K"] or 1
                ax.plot(*zip(*pts), "o-" if k >= 2 else "s--", color=colors.get(h["kind"], "k"),
                        alpha=min(1.0, 0.35 + 0.18 * k), label=f"{lab} (K={h['K']})")
    for ax, ylabel in ((axes[0], "tau (tokens per target forward)"), (axes[1], "walltime speedup vs koala plain")):
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(settings, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].axhline(1.0, color="k", lw=0.8)
    fig.suptitle(f"MT-bench, greedy: tau and speedup against the drafting setting ({stamp})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.depth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--evals", required=True, help="comma-separated bench.mtbench files (bench/results/ names ok)")
    ap.add_argument("--labels", default="", help="comma-separated PATH=LABEL for heads whose path does not name them")
    ap.add_argument("--baselines", default="", help="comma-separated labels of each kind's baseline (K = 1) head")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--out", default="depth_sweep", help="output stem: <out>.json, <out>.md, <out>.png")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    evals = []
    for f in (s for s in a.evals.split(",") if s):
        p = resolve(f)
        if not p.is_file():
            raise SystemExit(f"--evals: {p} not found")
        evals.append((p.name, json.loads(p.read_text())))
    heads = collect(evals, parse_labels(a.labels), a.temperature)
    if not heads:
        raise SystemExit(f"no method at temperature {a.temperature} in {a.evals}")
    g = gains(heads, [s for s in a.baselines.split(",") if s])
    md = table_markdown(heads, g)
    stamps = sorted({f"{ev.get('device', '?')}, commit {str(ev.get('commit', '?'))[:7]}" for _, ev in evals})
    result = {"sources": [{"file": n, "device": ev.get("device"), "date": ev.get("date"), "commit": ev.get("commit"),
                           "command": ev.get("command")} for n, ev in evals],
              "temperature": a.temperature, "target_tau_gain": TARGET_TAU_GAIN, "heads": heads, "gains": g}
    jp = write(f"{a.out}.json", result)
    mp = jp.with_suffix(".md")
    mp.write_text(md)
    print(md)
    written = [jp, mp]
    if not a.no_plot:
        written.append(plot(heads, jp.with_suffix(".png"), "; ".join(stamps)))
    for p in written:
        print(f"wrote {p}")
    return result


if __name__ == "__main__":
    main()
