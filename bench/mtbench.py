"""Speedup and acceptance on MT-bench, measured side by side in one process.

All 80 questions (or the first --questions, balanced over the 8 categories), both turns (the
second turn follows each method's own first answer), the target's chat template, batch 1.
For each head, drafting mode and temperature: tau (tokens per target forward, bonus included),
n-alpha (n = 1, 2, 3, chain mode), tokens/s and walltime speedup over koala's own plain CUDA-graph
decoding at the same temperature, run in the same process, per category too. Peers: transformers'
generate and its prompt-lookup decoding on a subset (they run ~60x slower, so --peer-questions).

    python -m bench.mtbench --heads koala/default_heads/eagle,koala/default_heads/medusa \
        --modes chain,tree [--max-new-tokens 256] [--temperature 0 | --temperatures 0,0.7,1.0] \
        [--seed 0] [--time-budget 540] [--peer-questions 4] [--no-progress]

Sampling (T > 0) is seeded: turn t of every question uses seed + t, for plain and speculative
decoding alike. n-alpha is counted from the accepted lengths, so it means the same under
speculative sampling (chains); trees report tau only.

Plain decoding is measured again after every --plain-every methods (default 2) and at the end,
and each speedup is against the mean of the plain runs just before and after the method
("plain_tokens_per_s", with "speedup_bounds" against either run; every plain run is listed in
"plain_runs"). Plain koala drifted by up to 22% within one machine start when it was measured once.
Before the first timed plain run, plain decoding answers the first --warm-questions questions
(default 8) untimed: the first plain run of a process had come out 20% slow.

With --time-budget, no new (head, mode) starts once that many seconds have passed since the
start; the file is still written, with "incomplete": true and the methods not run in "not_run".
The file is also rewritten after every method, so a killed run leaves what it had measured.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import mt_bench, write

CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


def select(questions, n):
    if n >= len(questions):
        return questions
    by = defaultdict(list)
    for q in questions:
        by[q["category"]].append(q)
    out, i = [], 0
    while len(out) < n:
        for c in CATEGORIES:
            if i < len(by[c]) and len(out) < n:
                out.append(by[c][i])
        i += 1
    return out


def run_method(gen, questions, max_new, temperature, seed, desc, progress=True):
    """Both turns of every question; returns per-question records."""
    from tqdm import tqdm
    recs = []
    for q in tqdm(questions, desc=desc, leave=False, mininterval=5, disable=not progress):
        msgs = []
        for turn, text in enumerate(q["turns"][:2]):
            msgs.append({"role": "user", "content": text})
            r = gen.generate(list(msgs), max_new_tokens=max_new, temperature=temperature,
                             seed=None if seed is None else seed + turn)
            msgs.append({"role": "assistant", "content": r.text})
            s = r.stats
            recs.append({"qid": q["question_id"], "category": q["category"], "turn": turn,
                         "new_tokens": s.new_tokens, "wall_s": s.wall_s, "forwards": s.target_forwards,
                         "accepted": list(s.accepted_per_step), "ids": r.token_ids,
                         "draft_s": getattr(s, "draft_s", None), "verify_s": getattr(s, "verify_s", None)})
    return recs


def summarise(recs, chain: bool, depth: int | None = None):
    """Totals and, for speculative records, tau and (chains) n-alpha for n = 1, 2, 3 up to the
    chain's depth: a chain of depth d drafts no (d+1)-th token, so its n-alpha for n > d is
    undefined and left out (not 0)."""
    tok = sum(r["new_tokens"] for r in recs)
    wall = sum(r["wall_s"] for r in recs)
    acc = [a for r in recs for a in r["accepted"]]
    out = {"new_tokens": tok, "wall_s": wall, "tokens_per_s": tok / wall}
    if acc:
        out["tau"] = sum(a + 1 for a in acc) / len(acc)
        # GPU time of an iteration's draft and verification graphs (CUDA events; graphs only)
        for part in ("draft", "verify"):
            v = [r.get(f"{part}_s") for r in recs]
            if v and all(x is not None for x in v):
                out[f"{part}_ms_per_iter"] = 1e3 * sum(v) / len(acc)
        if chain:
            out["alpha"] = [sum(a >= n for a in acc) / max(1, sum(a >= n - 1 for a in acc))
                            for n in (1, 2, 3) if depth is None or n <= depth]
    return out


def parse_temperatures(temperatures: str | None, temperature: float) -> list[float]:
    """--temperatures "0,0.7,1.0" if given, else the single --temperature."""
    if not temperatures:
        ts = [float(temperature)]
    else:
        try:
            ts = [float(x) for x in temperatures.split(",") if x.strip()]
        except ValueError as e:
            raise SystemExit(f"--temperatures takes comma-separated numbers, e.g. 0,0.7,1.0 ({e})")
    if not ts or any(t < 0 for t in ts) or len(set(ts)) != len(ts):
        raise SystemExit(f"temperatures must be distinct numbers >= 0, got {ts}")
    return ts


def measure(plain, methods, questions, temperatures, max_new, seed, *, time_budget=0.0, t0=None,
            progress=True, save=None, clock=time.perf_counter, plain_every=0, warm_questions=0):
    """Plain decoding at every temperature, then every method at every temperature.

    plain: a generator without a head. methods: (name, mode, build) triples, build() -> (gen, head
    config) or raising (that method is skipped). save(results) is called after every method.
    plain_every = k > 0: plain decoding is measured again after every k methods and after the last
    one (even past the time budget, so that every method is bracketed), and each method's speedup
    is against the mean of the plain runs just before and just after it, with the speedups
    against each of the two as "speedup_bounds". Plain koala drifted by up to 22% within one
    machine start, which a single plain run at the start cannot show. 0: one plain run.
    warm_questions = n > 0: before the first timed plain run, plain decoding answers the first n
    questions once, untimed. In two machine starts the first plain run of a process came out 20%
    below the later ones (1,269 and 1,273 against 1,600 to 1,650 tokens/s:
    mtbench_sdfull_1800_d5.json, mtbench_sdfull_eagle_d1_d3.json), after the kernels and graphs
    had been warmed up; which speedups it inflates is then an accident of order.
    Returns (results, plain records by temperature of the first plain run)."""
    t0 = clock() if t0 is None else t0
    seed_at = {T: (seed if T > 0 else None) for T in temperatures}
    res = {"temperatures": list(temperatures), "plain_by_temperature": [], "methods": [],
           "skipped": [], "not_run": [], "incomplete": True, "plain_every": plain_every, "plain_runs": [],
           "warm_questions": warm_questions}
    base = {}
    runs = []        # one entry per plain measurement: {T: (tokens/s, {category: tokens/s})}

    def plain_run(first: bool):
        run = {}
        for T in temperatures:
            if first:
                plain.warmup([T])   # every window's kernels and graphs, so the timed runs pay none of it
                if warm_questions:
                    run_method(plain, questions[:warm_questions], max_new, T, seed_at[T],
                               f"plain T={T} (untimed warm-up)", progress)
            recs = run_method(plain, questions, max_new, T, seed_at[T], f"plain T={T}", progress)
            summ = summarise(recs, False)
            if first:
                base[T] = recs
                res["plain_by_temperature"].append({"temperature": T, **summ})
            by = defaultdict(list)
            for r in recs:
                by[r["category"]].append(r)
            tps = summ["tokens_per_s"]
            run[T] = (tps, {c: summarise(rs, False)["tokens_per_s"] for c, rs in by.items()})
            res["plain_runs"].append({"temperature": T, "after_methods": len(res["methods_done"]),
                                      "tokens_per_s": tps})
            print(f"plain koala T={T}: {tps:.1f} tokens/s" + ("" if first else " (again)"), flush=True)
        runs.append(run)

    def set_speedup(s, T, lo_run, hi_run=None):
        """s's speedups against the mean of the plain runs bracketing it (or the one before it)."""
        pair = [lo_run] if hi_run is None else [lo_run, hi_run]
        p = sum(r[T][0] for r in pair) / len(pair)
        s["plain_tokens_per_s"] = p
        s["speedup"] = s["tokens_per_s"] / p
        s["speedup_bounds"] = sorted(s["tokens_per_s"] / r[T][0] for r in pair)
        s["plain_bracketed"] = hi_run is not None
        for c, cs in s.get("per_category", {}).items():
            cs["speedup"] = cs["tokens_per_s"] / (sum(r[T][1][c] for r in pair) / len(pair))

    res["methods_done"] = []
    plain_run(first=True)
    if len(temperatures) == 1:
        res["plain"] = {k: v for k, v in res["plain_by_temperature"][0].items() if k != "temperature"}
    if save:
        save(res)
    methods = list(methods)
    pending = []     # (summary, T, index of the plain run before it) awaiting the next plain run

    def rebracket():
        plain_run(first=False)
        for s, T, lo in pending:
            set_speedup(s, T, runs[lo], runs[-1])
            print(f"{Path(s['head']).name:24} {s['mode']:5} d={s['depth']} T={T:<4} speedup {s['speedup']:.2f}x "
                  f"against the mean of the plain runs around it ({s['speedup_bounds'][0]:.2f}x to "
                  f"{s['speedup_bounds'][1]:.2f}x against either)", flush=True)
        pending.clear()

    for i, (name, mode, build) in enumerate(methods):
        if time_budget and clock() - t0 > time_budget:
            res["not_run"] = [f"{n} {m}" for n, m, _ in methods[i:]]
            print(f"time budget of {time_budget:.0f} s spent: not run {res['not_run']}", flush=True)
            break
        try:
            gen, cfg = build()
        except Exception as e:  # e.g. a Medusa head with fewer heads than the depth asked
            print(f"{name} {mode}: skipped ({e})")
            res["skipped"].append({"head": str(name), "mode": mode, "reason": str(e)})
            continue
        chain = mode == "chain"
        for T in temperatures:
            gen.warmup([T])
            recs = run_method(gen, questions, max_new, T, seed_at[T], f"{Path(name).name} {mode} T={T}", progress)
            s = summarise(recs, chain, gen.spec.depth)
            if T == 0:
                s["identical_to_plain"] = sum(r["ids"] == b["ids"] for r, b in zip(recs, base[T])) / len(recs)
            cats = {}
            for c in CATEGORIES:
                rc = [r for r in recs if r["category"] == c]
                if rc:
                    cats[c] = summarise(rc, chain, gen.spec.depth)
            s["per_category"] = cats
            s.update(head=str(name), kind=cfg.kind, K=cfg.layers, mode=mode, temperature=T,
                     depth=gen.spec.depth, tree_size=gen.spec.N, top_k=gen.spec.k,
                     draft_vocab=getattr(gen.spec, "draft_vocab", None))
            set_speedup(s, T, runs[-1])
            res["methods"].append(s)
            pending.append((s, T, len(runs) - 1))
            print(f"{Path(name).name:24} {mode:5} d={gen.spec.depth} v={getattr(gen.spec, 'draft_vocab', None) or 'all'} T={T:<4} tau {s.get('tau', 0):.2f}  "
                  f"alpha {[round(x, 2) for x in s.get('alpha', [])]}  {s['tokens_per_s']:7.1f} tok/s  "
                  f"speedup {s['speedup']:.2f}x  identical {s.get('identical_to_plain', '-')}"
                  + (f"  draft {s['draft_ms_per_iter']:.3f} / verify {s['verify_ms_per_iter']:.3f} ms"
                     if "draft_ms_per_iter" in s else ""), flush=True)
        del gen
        res["methods_done"].append(f"{name} {mode} d={s['depth']} v={s['draft_vocab'] or 'all'}")
        if plain_every and len(res["methods_done"]) % plain_every == 0:
            rebracket()
        res["elapsed_s"] = clock() - t0
        if save:
            save(res)
    if plain_every and pending:
        rebracket()
    res["incomplete"] = bool(res["not_run"])
    res["elapsed_s"] = clock() - t0
    if plain_every and res["plain_runs"]:
        for T in temperatures:
            v = [r["tokens_per_s"] for r in res["plain_runs"] if r["temperature"] == T]
            print(f"plain koala T={T}: {len(v)} runs, {min(v):.1f} to {max(v):.1f} tokens/s "
                  f"({(max(v) / min(v) - 1):.1%} spread)", flush=True)
    return res, base


def main(argv=None):
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(prog="python -m bench.mtbench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m-instruct",
                    help="the target: the embedded default, a Hugging Face checkpoint directory or a .gguf "
                         "(then --heads must name heads trained for it)")
    ap.add_argument("--heads", default="koala/default_heads/eagle,koala/default_heads/medusa")
    ap.add_argument("--modes", default="chain,tree")
    ap.add_argument("--questions", type=int, default=80)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="one temperature (0 = greedy)")
    ap.add_argument("--temperatures", default="", help="several, e.g. 0,0.7,1.0 (overrides --temperature)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (turn t uses seed + t)")
    ap.add_argument("--depth", type=int, default=None, help="chain depth (default: the decoder's)")
    ap.add_argument("--depths", default="", help="several chain depths, e.g. 1,2,3 (one method each; "
                    "overrides --depth)")
    ap.add_argument("--tree-depths", default="", help="tree depths, e.g. 3,4 (one method each; "
                    "default: the decoder's)")
    ap.add_argument("--draft-vocabs", default="head",
                    help="draft vocabularies, e.g. none,8192,16384 (one method each): a size, 'none' for "
                         "the whole vocabulary, 'head' for the head's config (default)")
    ap.add_argument("--tree-size", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--peer-questions", type=int, default=0, help="transformers peers on this many questions")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds from the start after which no new head/mode starts (0: none)")
    ap.add_argument("--plain-every", type=int, default=2,
                    help="measure plain decoding again after every k methods and at the end; each "
                         "speedup is against the mean of the plain runs around it (0: plain once, at the start)")
    ap.add_argument("--warm-questions", type=int, default=8,
                    help="questions plain decoding answers untimed before its first timed run (0: none)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    ap.add_argument("--out", default="mtbench.json")
    a = ap.parse_args(argv)
    temps = parse_temperatures(a.temperatures, a.temperature)
    from koala import SpeculativeGenerator, load_target
    from koala.heads import load_head
    lt = load_target(a.target)
    qs = select(mt_bench(), a.questions)
    plain = SpeculativeGenerator(lt, None, max_seq_len=2048)
    heads = {}

    def builder(hd, mode, depth, vocab):
        def build():
            if hd not in heads:
                heads.clear()  # one head in memory at a time
                heads[hd] = load_head(hd, lt)
            opts = dict(mode=mode, draft_vocab=vocab)
            if depth:
                opts["depth"] = depth
            if mode == "tree":
                opts.update(tree_size=a.tree_size, top_k=a.top_k)
            return SpeculativeGenerator(lt, heads[hd], max_seq_len=2048, **opts), heads[hd].config
        return build

    def depths(mode):
        given = a.depths if mode == "chain" else a.tree_depths
        if given:
            return [int(d) for d in given.split(",") if d]
        return [a.depth if mode == "chain" else None]

    from koala.heads import parse_draft_vocab
    methods = [(hd, mode, builder(hd, mode, d, parse_draft_vocab(v))) for hd in a.heads.split(",") if hd
               for mode in a.modes.split(",") if mode for d in depths(mode)
               for v in a.draft_vocabs.split(",") if v]
    settings = {**vars(a), "temperatures": temps}
    res, _ = measure(plain, methods, qs, temps, a.max_new_tokens, a.seed, time_budget=a.time_budget, t0=t0,
                     progress=a.progress, save=lambda r: write(a.out, {"settings": settings, **r}),
                     plain_every=a.plain_every, warm_questions=a.warm_questions)
    if a.peer_questions:
        if a.time_budget and time.perf_counter() - t0 > a.time_budget:
            res["not_run"].append("peers")
            res["incomplete"] = True
        else:
            res["peers"] = peers(lt, select(mt_bench(), a.peer_questions), a.max_new_tokens, plain, a.target)
    path = write(a.out, {"settings": settings, **res})
    print(f"-> {path}" + ("  (incomplete: time budget spent)" if res["incomplete"] else ""))


def peers(lt, qs, max_new, plain, target="smollm2-135m-instruct"):
    """transformers' generate (plain) and prompt-lookup decoding, same GPU, first turns only."""
    from koala.loading import _gguf_to_cache, resolve, transformers_api
    AutoModelForCausalLM, = transformers_api("AutoModelForCausalLM")
    kind, path = resolve(target)
    hf = AutoModelForCausalLM.from_pretrained(_gguf_to_cache(path) if kind == "gguf" else path,
                                              local_files_only=True, dtype=torch.bfloat16).cuda().eval()
    out = {"questions": len(qs), "note": "first turns only; no smaller model with the target's tokenizer "
           "is available offline, so transformers' assisted generation has no usable assistant here"}
    for name, kw in (("transformers_generate", {}), ("transformers_prompt_lookup", {"prompt_lookup_num_tokens": 10})):
        tok = wall = 0
        for q in qs:
            ids = torch.tensor([plain.encode(q["turns"][0])], device="cuda")
            torch.cuda.synchronize(); t = time.perf_counter()
            o = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                            pad_token_id=0, **kw)
            torch.cuda.synchronize()
            wall += time.perf_counter() - t
            tok += o.shape[1] - ids.shape[1]
        out[name] = {"new_tokens": tok, "wall_s": wall, "tokens_per_s": tok / wall}
        print(f"{name}: {tok / wall:.1f} tokens/s", flush=True)
    tok = wall = 0
    for q in qs:
        r = plain.generate(q["turns"][0], max_new_tokens=max_new)
        tok += r.stats.new_tokens
        wall += r.stats.wall_s
    out["koala_plain_same_questions"] = {"new_tokens": tok, "wall_s": wall, "tokens_per_s": tok / wall}
    return out


if __name__ == "__main__":
    main()
