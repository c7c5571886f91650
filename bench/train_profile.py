"""Training throughput: time and profile the trainer's steps for one head configuration.

  python -m bench.train_profile --data runs/data/sharegpt --kind eagle --layers 2 --adversarial \
      [--batch-size 16] [--steps 20] [--profile-steps 3] [--top 25]

Runs `--warmup` steps, then times `--steps` steps (CUDA-synchronised wall time, real tokens per
second), then profiles `--profile-steps` more with torch.profiler and prints the operators that
take the most device time. Nothing is written: it is a tool for finding where a step's time goes.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.train_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--kind", default="eagle", choices=("eagle", "medusa"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--adversarial", action="store_true")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    from train.trainer import TrainConfig, Trainer
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=a.data, out=out, target=a.target, kind=a.kind, layers=a.layers,
                          adversarial=a.adversarial, batch_size=a.batch_size, max_len=a.max_len,
                          steps=a.warmup + a.steps + a.profile_steps + 1, warmup=1, eval_every=10**9,
                          ckpt_every=10**9, progress=False)
        tr = Trainer(cfg)
        for _ in range(a.warmup):
            tr.train_step()
        sync()
        tok0, t0 = tr.tokens_seen, time.perf_counter()
        for _ in range(a.steps):
            tr.train_step()
        sync()
        dt = time.perf_counter() - t0
        toks = tr.tokens_seen - tok0
        print(f"{a.kind} K={a.layers}{' adv' if a.adversarial else ''} batch {a.batch_size}: "
              f"{dt / a.steps * 1e3:.1f} ms/step, {toks / dt:.0f} tokens/s, {toks / a.steps:.0f} tokens/step")
        if a.profile_steps:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(a.profile_steps):
                    tr.train_step()
                sync()
            key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=a.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
