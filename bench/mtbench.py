"""Speedup and acceptance on MT-bench, measured side by side in one process.

All 80 questions (or the first --questions, balanced over the 8 categories), both turns (the
second turn follows each method's own first answer), the target's chat template, batch 1.
For each head and drafting mode: tau (tokens per target forward, bonus included), n-alpha
(n = 1, 2, 3, chain mode), tokens/s and walltime speedup over koala's own plain CUDA-graph
decoding run in the same process, per category too. Peers: transformers' generate and its
prompt-lookup decoding on a subset (they run ~60x slower, so --peer-questions of them).

    python -m bench.mtbench --heads koala/heads/default-eagle,koala/heads/default-medusa \
        --modes chain,tree [--max-new-tokens 256] [--temperature 0] [--peer-questions 4]
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


def run_method(gen, questions, max_new, temperature, seed, desc):
    """Both turns of every question; returns per-question records."""
    from tqdm import tqdm
    recs = []
    for q in tqdm(questions, desc=desc, leave=False, mininterval=5):
        msgs = []
        for turn, text in enumerate(q["turns"][:2]):
            msgs.append({"role": "user", "content": text})
            r = gen.generate(list(msgs), max_new_tokens=max_new, temperature=temperature,
                             seed=None if seed is None else seed + turn)
            msgs.append({"role": "assistant", "content": r.text})
            s = r.stats
            recs.append({"qid": q["question_id"], "category": q["category"], "turn": turn,
                         "new_tokens": s.new_tokens, "wall_s": s.wall_s, "forwards": s.target_forwards,
                         "accepted": list(s.accepted_per_step), "ids": r.token_ids})
    return recs


def summarise(recs, chain: bool):
    tok = sum(r["new_tokens"] for r in recs)
    wall = sum(r["wall_s"] for r in recs)
    acc = [a for r in recs for a in r["accepted"]]
    out = {"new_tokens": tok, "wall_s": wall, "tokens_per_s": tok / wall}
    if acc:
        out["tau"] = sum(a + 1 for a in acc) / len(acc)
        if chain:
            out["alpha"] = [sum(a >= n for a in acc) / max(1, sum(a >= n - 1 for a in acc)) for n in (1, 2, 3)]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="koala/heads/default-eagle,koala/heads/default-medusa")
    ap.add_argument("--modes", default="chain,tree")
    ap.add_argument("--questions", type=int, default=80)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depth", type=int, default=None, help="chain depth (default: the decoder's)")
    ap.add_argument("--tree-size", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--peer-questions", type=int, default=0, help="transformers peers on this many questions")
    ap.add_argument("--out", default="mtbench.json")
    a = ap.parse_args()
    from koala import SpeculativeGenerator, load_target
    from koala.heads import load_head
    lt = load_target("smollm2-135m-instruct")
    qs = select(mt_bench(), a.questions)
    seed = a.seed if a.temperature > 0 else None
    plain = SpeculativeGenerator(lt, None, max_seq_len=2048)
    plain.generate("warm up", max_new_tokens=32)
    base = run_method(plain, qs, a.max_new_tokens, a.temperature, seed, "plain")
    base_sum = summarise(base, False)
    print(f"plain koala: {base_sum['tokens_per_s']:.1f} tokens/s", flush=True)
    results = {"settings": vars(a), "plain": base_sum, "methods": []}
    base_by_cat = defaultdict(list)
    for r in base:
        base_by_cat[r["category"]].append(r)
    for hd in [h for h in a.heads.split(",") if h]:
        head = load_head(hd, lt)
        for mode in a.modes.split(","):
            opts = dict(mode=mode)
            if mode == "chain" and a.depth:
                opts["depth"] = a.depth
            if mode == "tree":
                opts.update(tree_size=a.tree_size, top_k=a.top_k)
            try:
                gen = SpeculativeGenerator(lt, head, max_seq_len=2048, **opts)
            except Exception as e:  # e.g. a Medusa head with fewer heads than the depth asked
                print(f"{hd} {mode}: skipped ({e})")
                continue
            gen.generate("warm up", max_new_tokens=32)
            recs = run_method(gen, qs, a.max_new_tokens, a.temperature, seed, f"{Path(hd).name} {mode}")
            s = summarise(recs, mode == "chain")
            s["speedup"] = s["tokens_per_s"] / base_sum["tokens_per_s"]
            if a.temperature == 0:
                s["identical_to_plain"] = sum(r["ids"] == b["ids"] for r, b in zip(recs, base)) / len(recs)
            cats = {}
            for c in CATEGORIES:
                rc = [r for r in recs if r["category"] == c]
                if rc:
                    cs = summarise(rc, mode == "chain")
                    cs["speedup"] = cs["tokens_per_s"] / summarise(base_by_cat[c], False)["tokens_per_s"]
                    cats[c] = cs
            s["per_category"] = cats
            s.update(head=str(hd), kind=head.config.kind, K=head.config.layers, mode=mode,
                     depth=gen.spec.depth, tree_size=gen.spec.N, top_k=gen.spec.k)
            results["methods"].append(s)
            print(f"{Path(hd).name:24} {mode:5} tau {s.get('tau', 0):.2f}  "
                  f"alpha {[round(x, 2) for x in s.get('alpha', [])]}  {s['tokens_per_s']:7.1f} tok/s  "
                  f"speedup {s['speedup']:.2f}x  identical {s.get('identical_to_plain', '-')}", flush=True)
            del gen
    if a.peer_questions:
        results["peers"] = peers(lt, select(mt_bench(), a.peer_questions), a.max_new_tokens, plain)
    for r in base:
        r.pop("ids", None)
    path = write(a.out, results)
    print(f"-> {path}")


def peers(lt, qs, max_new, plain):
    """transformers' generate (plain) and prompt-lookup decoding, same GPU, first turns only."""
    from transformers import AutoModelForCausalLM

    from koala.loading import _gguf_to_cache, default_gguf_path
    hf = AutoModelForCausalLM.from_pretrained(_gguf_to_cache(default_gguf_path()), local_files_only=True,
                                              dtype=torch.bfloat16).cuda().eval()
    out = {"questions": len(qs), "note": "first turns only; no smaller model with SmolLM2's tokenizer "
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
