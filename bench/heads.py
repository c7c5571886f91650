"""The paper's Table I from our own runs: each ablation head's training summary (train.ablation's
ablation.json) joined with its MT-bench evaluation (bench.mtbench files), written as heads.json
(with the source files' devices, commits and commands) and as a Markdown table, heads_table.md.

    python -m bench.heads --ablation runs/ablation/ablation.json \
        --evals mtbench_ablation_medusa.json,mtbench_ablation_eagle.json [--out heads.json]

Heads are matched by name: an evaluated head at .../<kind>-k<K>-<adv|base>/head (or at a
directory of that name) is the ablation's <kind>-k<K>-<adv|base>; --alias names the others, e.g.
`--alias koala/default_heads/eagle=eagle-k3-adv` for a shipped head that is that ablation head. Table I uses the chain-mode
greedy rows (--mode, --temperature to change). Speedup is against plain koala measured in the
same file as the head, so compare speedups within one kind (one file), as the targets do:
  tau gain     tau(best K >= 2 with adv.) - tau(K = 1 without adv.)          target >= +0.3
  speedup gain speedup(best K >= 2 with adv.) / speedup(K = 1 without adv.) - 1  target >= 15%
CPU only; no GPU needed.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from bench.common import RESULTS, write

NAME = re.compile(r"^(eagle|medusa)-k(\d+)-(adv|base)$")
KINDS = ("medusa", "eagle")
LABEL = {"medusa": "Medusa", "eagle": "EAGLE"}
TAU_TARGET = 0.3       # the issue's targets for the best K >= 2 adversarial head against K = 1 without
SPEEDUP_TARGET = 0.15


def resolve(path: str | Path) -> Path:
    """A path as given if it exists, else the same name under bench/results/."""
    p = Path(path)
    return p if p.exists() or p.is_absolute() else RESULTS / p


def head_name(path: str) -> str:
    p = Path(path.rstrip("/"))
    return p.parent.name if p.name == "head" else p.name


def method_temperature(m: dict, ev: dict) -> float:
    return float(m.get("temperature", ev.get("settings", {}).get("temperature", 0.0)))


def plain_tokens_per_s(ev: dict, temperature: float) -> float | None:
    for p in ev.get("plain_by_temperature", []):
        if float(p["temperature"]) == temperature:
            return p["tokens_per_s"]
    return ev.get("plain", {}).get("tokens_per_s")


def merge(ablation: dict, evals: list[tuple[str, dict]], mode: str = "chain", temperature: float = 0.0,
          depth: int | None = None, aliases: dict | None = None) -> dict:
    """ablation: train.ablation's table {name: {status, step, ...}}; evals: (path, mtbench result)
    pairs; aliases: {head path as the files record it: ablation name} for heads whose path does
    not say their name. Returns {name: {kind, K, adversarial, training, eval}} with None where a
    side is missing."""
    aliases = {k.rstrip("/"): v for k, v in (aliases or {}).items()}
    heads = {}

    def entry(name):
        m = NAME.match(name)
        if not m:
            return None
        if name not in heads:
            heads[name] = {"kind": m.group(1), "K": int(m.group(2)), "adversarial": m.group(3) == "adv",
                           "training": None, "eval": None}
        return heads[name]

    for name, tr in ablation.items():
        e = entry(name)
        if e is None:
            print(f"ablation: {name!r} is not <kind>-k<K>-<adv|base>: ignored")
            continue
        e["training"] = tr
    for i, (path, ev) in enumerate(evals):
        for m in ev.get("methods", []):
            if m.get("mode") != mode or method_temperature(m, ev) != temperature:
                continue
            if depth is not None and m.get("depth") != depth:
                continue
            name = aliases.get(m["head"].rstrip("/")) or head_name(m["head"])
            e = entry(name)
            if e is None:
                print(f"{path}: head {m['head']!r} is not an ablation head: ignored")
                continue
            if (m.get("kind"), m.get("K")) != (e["kind"], e["K"]):
                raise SystemExit(f"{path}: head {m['head']} is a {m.get('kind')} K={m.get('K')} head, "
                                 f"but its name says {e['kind']} K={e['K']}")
            if e["eval"] is not None:
                print(f"{path}: {name} {mode} evaluated twice: the later file's row is used")
            e["eval"] = {k: m.get(k) for k in ("head", "mode", "temperature", "depth", "tau", "alpha",
                                                "tokens_per_s", "speedup", "identical_to_plain", "new_tokens")}
            e["eval"].update(temperature=temperature, source=i,
                             plain_tokens_per_s=plain_tokens_per_s(ev, temperature))
            if e["eval"]["alpha"] and m.get("depth"):   # files before bench.mtbench's fix wrote 0
                e["eval"]["alpha"] = e["eval"]["alpha"][:m["depth"]]   # for n-alpha past the depth
    return dict(sorted(heads.items(), key=lambda kv: (KINDS.index(kv[1]["kind"]), kv[1]["K"], kv[1]["adversarial"])))


def targets(heads: dict) -> dict:
    """Per kind: the best K >= 2 adversarial head against K = 1 without adversarial learning."""
    out = {}
    for kind in KINDS:
        base = heads.get(f"{kind}-k1-base", {}).get("eval")
        adv = [(n, h["eval"]) for n, h in heads.items()
               if h["kind"] == kind and h["K"] >= 2 and h["adversarial"] and h["eval"]]
        r = {"baseline": f"{kind}-k1-base" if base else None}
        if not base or not adv:
            r["note"] = "missing: " + ", ".join(x for x, ok in ((f"{kind}-k1-base", base),
                                                                (f"{kind}-k>=2-adv", adv)) if not ok)
            out[kind] = r
            continue
        bt, bt_ev = max(((n, e) for n, e in adv if e.get("tau") is not None), key=lambda x: x[1]["tau"],
                        default=(None, None))
        if bt and base.get("tau") is not None:
            d = bt_ev["tau"] - base["tau"]
            r.update(best_tau_head=bt, tau_base=base["tau"], tau_best=bt_ev["tau"], tau_gain=d,
                     tau_target=TAU_TARGET, tau_target_met=d >= TAU_TARGET - 1e-12)
        bs, bs_ev = max(adv, key=lambda x: x[1]["speedup"])
        g = bs_ev["speedup"] / base["speedup"] - 1
        r.update(best_speedup_head=bs, speedup_base=base["speedup"], speedup_best=bs_ev["speedup"],
                 speedup_gain=g, speedup_target=SPEEDUP_TARGET, speedup_target_met=g >= SPEEDUP_TARGET - 1e-12,
                 same_source=bs_ev["source"] == base["source"])
        out[kind] = r
    return out


def _f(x, fmt, dash="—"):
    return dash if x is None else format(x, fmt)


def table_markdown(heads: dict) -> str:
    """Table I's layout: Medusa then EAGLE, K = 1, 2, 3, without and with adversarial learning.
    The best tau and speedup of each kind are bold."""
    lines = ["| | K | adv. | tau | 1-alpha | 2-alpha | 3-alpha | speedup | train s | train tokens/s | held-out top-1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        rows = [(n, h) for n, h in heads.items() if h["kind"] == kind]
        evs = [h["eval"] for _, h in rows if h["eval"]]
        best_tau = max((e["tau"] for e in evs if e.get("tau") is not None), default=None)
        best_sp = max((e["speedup"] for e in evs if e.get("speedup") is not None), default=None)
        for i, (n, h) in enumerate(rows):
            e, t = h["eval"] or {}, h["training"] or {}
            alpha = (e.get("alpha") or []) + [None] * 3
            tau = _f(e.get("tau"), ".2f")
            if e.get("tau") is not None and e["tau"] == best_tau:
                tau = f"**{tau}**"
            sp = _f(e.get("speedup"), ".2f") + ("x" if e.get("speedup") is not None else "")
            if e.get("speedup") is not None and e["speedup"] == best_sp:
                sp = f"**{sp}**"
            secs = _f(t.get("train_seconds"), ".0f")
            if t and t.get("status") != "finished":
                secs += f" ({t.get('status')} at {t.get('step')}/{t.get('steps')})"
            top1 = (t.get("final_eval") or {}).get("eval/top1") or []
            lines.append(f"| {LABEL[kind] if i == 0 else ''} | {h['K']} | {'w/ adv.' if h['adversarial'] else 'w/o adv.'} "
                         f"| {tau} | {_f(alpha[0], '.2f')} | {_f(alpha[1], '.2f')} | {_f(alpha[2], '.2f')} | {sp} "
                         f"| {secs} | {_f(t.get('tokens_per_s'), ',.0f')} | {' / '.join(f'{x:.2f}' for x in top1) or '—'} |")
    return "\n".join(lines) + "\n"


def summary_lines(summ: dict) -> list[str]:
    out = []
    for kind in KINDS:
        r = summ.get(kind, {})
        if "note" in r:
            out.append(f"- {LABEL[kind]}: no comparison ({r['note']})")
            continue
        if "tau_gain" in r:
            out.append(f"- {LABEL[kind]} tau: {r['best_tau_head']} {r['tau_best']:.2f} vs {r['baseline']} "
                       f"{r['tau_base']:.2f}: **{r['tau_gain']:+.2f}** (target >= +{TAU_TARGET}: "
                       f"{'met' if r['tau_target_met'] else 'not met'})")
        out.append(f"- {LABEL[kind]} speedup: {r['best_speedup_head']} {r['speedup_best']:.2f}x vs {r['baseline']} "
                   f"{r['speedup_base']:.2f}x: **{r['speedup_gain']:+.1%}** (target >= +{SPEEDUP_TARGET:.0%}: "
                   f"{'met' if r['speedup_target_met'] else 'not met'})"
                   + ("" if r["same_source"] else " [the two heads were measured in different files]"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.heads", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ablation", required=True, help="train.ablation's ablation.json")
    ap.add_argument("--evals", required=True, help="comma-separated bench.mtbench result files (bench/results/ names ok)")
    ap.add_argument("--mode", default="chain", help="drafting mode of the rows used (Table I: chain)")
    ap.add_argument("--temperature", type=float, default=0.0, help="temperature of the rows used")
    ap.add_argument("--depth", type=int, default=None,
                    help="use only rows drafted at this chain depth (files measuring several depths)")
    ap.add_argument("--alias", default="",
                    help="comma-separated PATH=NAME: the evaluated head at PATH is ablation head NAME")
    ap.add_argument("--out", default="heads.json")
    a = ap.parse_args(argv)
    aliases = {}
    for item in filter(None, a.alias.split(",")):
        path, eq, name = item.partition("=")
        if not eq or not NAME.match(name):
            raise SystemExit(f"--alias {item!r}: give PATH=NAME with NAME as <kind>-k<K>-<adv|base>")
        aliases[path] = name
    abl_path = resolve(a.ablation)
    ablation = json.loads(abl_path.read_text())
    evals = [(str(resolve(p)), json.loads(resolve(p).read_text())) for p in a.evals.split(",") if p]
    heads = merge(ablation, evals, a.mode, a.temperature, a.depth, aliases)
    summ = targets(heads)
    table = table_markdown(heads)
    sources = {"ablation": {"path": str(a.ablation),
                            "devices": sorted({str(t.get("device")) for t in ablation.values() if isinstance(t, dict)})},
               "evals": [{"path": str(p), **{k: ev.get(k) for k in ("device", "date", "commit", "command", "settings")},
                          "plain": ev.get("plain"), "plain_by_temperature": ev.get("plain_by_temperature"),
                          "incomplete": ev.get("incomplete", False)} for p, ev in evals]}
    path = write(a.out, {"settings": vars(a), "sources": sources, "heads": heads, "targets": summ})
    lines = summary_lines(summ)
    src = "; ".join(f"`{Path(p).name}` ({ev.get('device')}, commit {str(ev.get('commit'))[:7]})" for p, ev in evals)
    md = (f"MT-bench, {a.mode} mode{f' depth {a.depth}' if a.depth else ''}, temperature {a.temperature:g}; "
          f"speedup vs plain koala in the same run. "
          f"Sources: `{Path(a.ablation).name}`; {src}.\n\n" + table + "\n" + "\n".join(lines) + "\n")
    md_path = path.with_name(Path(a.out).stem + "_table.md")
    md_path.write_text(md)
    print(table)
    print("\n".join(lines))
    print(f"-> {path}\n-> {md_path}")
    return heads, summ


if __name__ == "__main__":
    main()
