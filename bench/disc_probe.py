"""Can KOALA's discriminator tell the target's logits from a trained head's? A probe on the CPU.

    python -m bench.disc_probe --head koala/default_heads/eagle --data runs/data/sharegpt-sd8k \
        [--positions 2048] [--steps 300] [--inputs logprob,prob] [--out disc_probe.json]

Takes real (target) and fake (head, EAGLE rollout step 0 or Medusa head 0) logits at the assistant
positions of the shard set's first sequences, trains a fresh train.discriminator.Discriminator on
them exactly as the trainer's discriminator step does (same loss, optimiser and learning rate, the
head frozen), and reports its accuracy on positions of the sequences that follow (a third as
many), for each input representation of the logits:
  logprob  the trainer's: centred, unit-norm log-softmax (the long tail of very negative
           log-probabilities dominates the norm)
  prob     centred, unit-norm softmax (the mass of the top tokens dominates)
Accuracy 0.5 means the discriminator cannot tell them apart, so the head's adversarial loss
carries no signal. The training logs showed D(real) = D(fake) = 0.50 +- 0.02 for EAGLE heads
throughout (bench/results/training/sd8k_lr5e-4_1800), against 0.77 / 0.22 for Medusa.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import write


def collect(target, head, data: str, positions: int, seed: int = 0, first: int = 0):
    """(cond (N, D), real (N, V), fake (N, V)) at up to `positions` assistant positions of the
    sequences from `first` on (all positions of each sequence taken, in order)."""
    from train.data import ShardData
    from train.losses import eagle_terms, medusa_terms
    d = ShardData(data, "train", batch_size=4, seed=seed, max_len=512)
    conds, reals, fakes, n = [], [], [], 0
    with torch.no_grad():
        for k in range(first, d.n, 4):
            b = d.rows(list(range(k, min(d.n, k + 4))))
            logits, hidden = target(b.tokens)
            if head.config.kind == "eagle":
                t = eagle_terms(head, b.tokens, hidden.to(head.dtype), logits, b.mask, 1)[0]
            else:
                t = medusa_terms(head, hidden.float(), logits, b.mask)[0]
            conds.append(t.cond.float())
            reals.append(t.teacher.float())
            fakes.append(t.draft.float())
            n += t.draft.shape[0]
            if n >= positions:
                break
    return torch.cat(conds)[:positions], torch.cat(reals)[:positions], torch.cat(fakes)[:positions], k + 4


def probe(train, test, inputs: str, steps: int, batch: int, lr: float, n_fc: int, width: int, seed: int = 0):
    """train, test: (cond, real, fake) from disjoint sequences (a discriminator of 53M parameters
    memorises positions of sequences it has seen, so a split by position would flatter it)."""
    cond, real, fake = train
    import train.discriminator as TD
    torch.manual_seed(seed)
    disc = TD.Discriminator(cond.shape[1], real.shape[1], n_fc, width, inputs=inputs)   # the trainer's (checks inputs)
    opt = torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.5, 0.999))   # as the trainer's
    ntr = cond.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        i = torch.randint(0, ntr, (batch,), generator=g)
        loss = TD.discriminator_sum(disc(cond[i], real[i]), disc(cond[i], fake[i])) / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
        opt.step()
    tc, tr, tf = test
    with torch.no_grad():
        dr, df = torch.sigmoid(disc(tc, tr)), torch.sigmoid(disc(tc, tf))
    acc = 0.5 * ((dr > 0.5).float().mean() + (df < 0.5).float().mean()).item()
    return {"inputs": inputs, "held_out_accuracy": acc, "D_real": dr.mean().item(), "D_fake": df.mean().item(),
            "final_train_loss": loss.item()}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.disc_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--head", default="koala/default_heads/eagle")
    ap.add_argument("--data", default="runs/data/sharegpt-sd8k")
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4, help="the trainer's disc_lr default")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--inputs", default="logprob,prob")
    ap.add_argument("--out", default="disc_probe.json")
    a = ap.parse_args(argv)
    from koala.heads import load_head
    from koala.loading import load_target
    from koala.model import Transformer
    from train.discriminator import fc_layers_for
    t0 = time.perf_counter()
    lt = load_target("smollm2-135m-instruct", device="cpu", dtype=torch.float32)
    Transformer.use_kernels(False)
    head = load_head(a.head, lt, device="cpu", dtype=torch.float32).eval()
    *train, nxt = collect(lt.model, head, a.data, a.positions)
    *test, _ = collect(lt.model, head, a.data, a.positions // 3, first=nxt)
    agree = [(x[1].argmax(-1) == x[2].argmax(-1)).float().mean().item() for x in (train, test)]
    print(f"{train[0].shape[0]} training positions (sequences 0..{nxt - 1}), {test[0].shape[0]} held-out "
          f"positions (from sequence {nxt}); top-1 agreement of head and target {agree[0]:.3f} / {agree[1]:.3f}")
    results = []
    for inp in [s for s in a.inputs.split(",") if s]:
        r = probe(train, test, inp, a.steps, a.batch, a.lr, fc_layers_for(head.config.layers), a.width)
        print(f"{inp:8} held-out accuracy {r['held_out_accuracy']:.3f}  D(real) {r['D_real']:.3f}  "
              f"D(fake) {r['D_fake']:.3f}", flush=True)
        results.append(r)
    write(a.out, {"settings": vars(a), "positions": [int(train[0].shape[0]), int(test[0].shape[0])],
                  "top1_agreement": agree,
                  "results": results, "elapsed_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
