"""The paper's ablation: Medusa and EAGLE heads, K = 1, 2, 3, adversarial learning off and on
(12 heads), trained one after another from one shard set, resumable under a time budget.
--only also takes heads deeper than the paper's (eagle-k5-adv, medusa-k4-base: K from 1 to 8),
trained with the same recipe, to see whether more layers keep paying.

  python -m train.ablation --data data/sharegpt-sd --out runs/ablation --steps 1000 --time-budget 540
  (run again with the same arguments until it prints "all 12 finished"; finished heads are
   skipped and a partly trained one resumes from its checkpoint exactly)

Each head lands in <out>/<kind>-k<K>-<adv|base>/head (koala.heads.load_head); <out>/ablation.json
lists every configuration's status, steps, training seconds, tokens/s and held-out top-1
agreement per position.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from train.trainer import TrainConfig, Trainer

CONFIGS = [(kind, k, adv) for adv in (False, True) for k in (1, 2, 3) for kind in ("eagle", "medusa")]


MAX_K = 8


def name(kind, k, adv):
    return f"{kind}-k{k}-{'adv' if adv else 'base'}"


def parse_name(n: str):
    """'eagle-k5-adv' -> ('eagle', 5, True); a clear error for anything else."""
    m = re.fullmatch(r"(eagle|medusa)-k(\d+)-(adv|base)", n)
    if not m or not 1 <= int(m.group(2)) <= MAX_K:
        raise SystemExit(f"--only: {n!r} is not a head name; names are <eagle|medusa>-k<K>-<adv|base> "
                         f"with K from 1 to {MAX_K}, e.g. eagle-k2-adv")
    return m.group(1), int(m.group(2)), m.group(3) == "adv"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=1000, help="steps per head (same for all 12)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-4,
                    help="head learning rate (the committed 1,000-step table used 3e-4; 5e-4 trained "
                         "better heads, mtbench_sd8k_lr5e-4_1800.json)")
    ap.add_argument("--disc-lr", type=float, default=1e-4)
    ap.add_argument("--disc-input", default="logprob", help="logprob | prob: what the discriminator reads")
    ap.add_argument("--w-prob", type=float, default=TrainConfig.w_prob,
                    help="EAGLE: weight of the distribution loss against the feature regression")
    ap.add_argument("--tag", default="", help="suffix of every head's folder name, for a variant recipe "
                    "(e.g. -prob: eagle-k2-adv-prob); --only takes the names without it")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds for this invocation (0: none)")
    ap.add_argument("--only", default="", help="comma-separated names, e.g. eagle-k2-adv,medusa-k1-base")
    ap.add_argument("--save-dtype", default="bfloat16", help="bf16 halves the 12 heads to ~125 MB; the GPU target runs in bf16 anyway")
    ap.add_argument("--table", default="", help="where to write the summary table (default <out>/ablation.json); "
                    "give each of several concurrent invocations its own")
    ap.add_argument("--concurrent", type=int, default=1,
                    help="how many trainings share the GPU with this one (recorded beside the timings, "
                         "which then measure a shared GPU)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.concurrent < 1:
        ap.error(f"--concurrent must be >= 1, got {a.concurrent}")
    only = {s for s in a.only.split(",") if s}
    extra = sorted((c for c in map(parse_name, only) if c not in CONFIGS), key=lambda c: (c[1], c[0], c[2]))
    from koala.loading import load_target
    t0 = time.perf_counter()
    target = load_target(a.target)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    trained_now = []
    for kind, k, adv in CONFIGS + extra:
        n = name(kind, k, adv)
        if only and n not in only:
            continue
        key = n + a.tag
        run_dir = out / key
        summ = run_dir / "summary.json"
        if summ.is_file() and json.loads(summ.read_text())["status"] == "finished":
            results[key] = json.loads(summ.read_text())
            continue
        left = a.time_budget - (time.perf_counter() - t0) if a.time_budget else 0.0
        if a.time_budget and left < 30:
            break
        cfg = TrainConfig(data=a.data, out=str(run_dir), target=a.target, kind=kind, layers=k, adversarial=adv,
                          lam=a.lam, lr=a.lr, disc_lr=a.disc_lr, disc_input=a.disc_input,
                          w_prob=a.w_prob, batch_size=a.batch_size, max_len=a.max_len,
                          steps=a.steps, warmup=max(1, a.steps // 20), ckpt_every=a.ckpt_every,
                          eval_every=a.eval_every, time_budget=max(left, 0.0), save_dtype=a.save_dtype,
                          progress=not a.no_progress)
        results[key] = Trainer(cfg, target=target, resume=True).fit()
        trained_now.append(key)
        print(f"{key}: {results[key]['status']} at step {results[key]['step']}, "
              f"{results[key]['train_seconds']:.0f} s, {results[key]['tokens_per_s']:.0f} tokens/s")
        if results[key]["status"] == "diverged":
            print(results[key]["message"])
    table = {n: {k: r.get(k) for k in ("status", "step", "steps", "train_seconds", "tokens_seen", "tokens_per_s",
                                       "final_eval", "device")} for n, r in results.items()}
    for n, r in results.items():   # each head's own settings: a finished one may predate this invocation's
        cfg = r.get("config", {})
        table[n].update(lr=cfg.get("lr"), disc_input=cfg.get("disc_input", "logprob"), w_prob=cfg.get("w_prob"))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    for n in trained_now:
        table[n]["concurrent_trainings"] = a.concurrent
        table[n]["peak_gpu_gib_of_invocation"] = peak
    table_path = Path(a.table) if a.table else out / "ablation.json"
    table_path.write_text(json.dumps(table, indent=2) + "\n")
    todo = [name(*c) for c in CONFIGS + extra if (not only or name(*c) in only)
            and table.get(name(*c) + a.tag, {}).get("status") != "finished"]
    print("all 12 finished" if not todo and not only else f"not finished yet: {todo}" if todo else "done")


if __name__ == "__main__":
    main()
