"""python -m train: train one draft head (distillation, optionally KOALA adversarial learning).

  python -m train --target smollm2-135m-instruct --kind eagle --layers 2 --adversarial --lam 0.1 \
      --data data/sharegpt --out runs/eagle-k2-adv --steps 2000 [--resume]
  torchrun --nproc_per_node 2 -m train ...   (DistributedDataParallel; the global batch is split)

Writes <out>/checkpoint.pt (at --ckpt-every and at the end), <out>/train_log.jsonl,
<out>/summary.json and, when finished, <out>/head (load with koala.heads.load_head).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

import torch
import torch.distributed as dist

from train.trainer import TrainConfig, Trainer


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        if isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            ap.add_argument(flag, type=type(default), default=default)
    ap.add_argument("--resume", action="store_true", help="continue <out>/checkpoint.pt exactly")
    return ap


def main(argv=None) -> int:
    a = vars(parser().parse_args(argv))
    resume = a.pop("resume")
    if not a["data"]:
        print("--data is required: a shard set written by python -m train.data", file=sys.stderr)
        return 2
    cfg = TrainConfig(**a)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    try:
        summary = Trainer(cfg, resume=resume).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{summary['status']}: step {summary['step']}/{summary['steps']}, "
              f"{summary['train_seconds']:.0f} s, {summary['tokens_per_s']:.0f} tokens/s, "
              f"eval top-1 {summary['final_eval'].get('eval/top1')}")
    return 3 if summary["status"] == "diverged" else 0


if __name__ == "__main__":
    sys.exit(main())
