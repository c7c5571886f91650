"""The training loop: distillation (+ optional KOALA adversarial learning) for one draft head.

One step, on the global batch of `batch_size` sequences (each rank takes its contiguous slice):
  1. the frozen target runs once without a cache: teacher logits z (B, T, V), hidden h (B, T, D);
  2. head step: L_distill (+ lambda * adversarial term, discriminator frozen) -> backward ->
     clip -> AdamW -> cosine schedule;
  3. discriminator step (adversarial only) on the same positions: target logits vs the draft
     logits of step 2 (detached).
Every loss is a sum divided by a count over the *global* batch (each rank holds the whole
batch's mask, so no communication is needed for the counts) and multiplied by the world size,
because DistributedDataParallel averages gradients: N ranks reproduce one process.

Checkpoint (<out>/checkpoint.pt, written atomically at intervals and at the end): head,
discriminator, both optimisers and schedulers, RNG states, step (= data position: the batch
order is a pure function of (seed, step)), loss statistics, elapsed time. `resume=True`
continues exactly. The finished head is also written with save_pretrained to <out>/head.

Guard: a non-finite loss or gradient norm, or a loss above `divergence` x its running average
for 3 consecutive steps after warm-up, stops the run before the optimiser step; the last
checkpoint (the last good state) is kept and exported to <out>/head, and the run says so.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call

from koala.heads import DraftConfig
from train.data import ShardData
from train.discriminator import (DISC_INPUTS, Discriminator, discriminator_sum, fc_layers_for,
                                 head_adversarial_sum)
from train.losses import distill_sums, eagle_terms, eagle_valid, kl_backend, medusa_terms, medusa_valid

CKPT = "checkpoint.pt"


@dataclass
class TrainConfig:
    data: str = ""                       # prepared shard set (python -m train.data)
    out: str = "runs/head"
    target: str = "smollm2-135m-instruct"
    kind: str = "eagle"                  # "medusa" | "eagle"
    layers: int = 1                      # K
    n_heads: int = 4                     # Medusa heads
    shared_lm_head: bool = True          # Medusa: share the target's frozen LM head
    adversarial: bool = False            # KOALA adversarial learning on/off (the ablation)
    lam: float = 0.1                     # lambda, weight of the adversarial head loss, in [0.05, 0.5]
    lr: float = 5e-4                     # head learning rate, in [1e-5, 5e-4]; 5e-4 beat 3e-4 on SmolLM2
                                         # (bench/results/mtbench_sd8k_lr*.json, README "Longer training")
    disc_lr: float = 1e-4                # discriminator learning rate, in [1e-5, 5e-4]
    weight_decay: float = 0.0
    batch_size: int = 16                 # global batch, sequences; split across ranks
    max_len: int = 1024                  # truncate sequences (the shard set may hold longer)
    steps: int = 1000
    warmup: int = 50                     # linear warm-up steps, then cosine to 10% of lr
    grad_clip: float = 1.0
    seed: int = 0
    rollout: int = 2                     # EAGLE: training rollout steps (1 = plain EAGLE, 2-3 = HASS-like)
    w_feat: float = 1.0                  # EAGLE: feature regression weight (EAGLE: 1.0)
    w_prob: float = 0.1                  # EAGLE: distribution loss weight (EAGLE: 0.1)
    disc_tokens: int = 1024              # positions per term per step fed to the discriminator
    disc_width: int = 256                # hidden width of the discriminator's FC layers
    disc_input: str = "logprob"          # what the discriminator reads of the logits: logprob | prob
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    time_budget: float = 0.0             # seconds of training in this invocation; 0 = no limit
    divergence: float = 5.0              # loss > divergence x running mean for 3 steps -> stop
    save_dtype: str = "float32"          # dtype of the exported head: float32 | bfloat16
    autocast: bool = True                # bf16 autocast on CUDA (ignored on CPU)
    progress: bool = True                # tqdm bar on rank 0

    def __post_init__(self):
        DraftConfig(self.kind, self.layers, self.n_heads, self.shared_lm_head)  # validates
        if not 0.05 <= self.lam <= 0.5:
            raise ValueError(f"lam (lambda) must be in [0.05, 0.5], got {self.lam}")
        for name in ("lr", "disc_lr"):
            v = getattr(self, name)
            if not 1e-5 <= v <= 5e-4:
                raise ValueError(f"{name} must be in [1e-5, 5e-4], got {v}")
        if not 1 <= self.rollout <= 3:
            raise ValueError(f"rollout must be 1, 2 or 3, got {self.rollout}")
        for name in ("batch_size", "steps", "max_len", "eval_every", "ckpt_every", "disc_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.disc_input not in DISC_INPUTS:
            raise ValueError(f"disc_input must be one of {DISC_INPUTS}, got {self.disc_input!r}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"save_dtype must be float32 or bfloat16, got {self.save_dtype}")

    @property
    def draft(self) -> DraftConfig:
        return DraftConfig(self.kind, self.layers, self.n_heads, self.shared_lm_head)


# fields that must agree between a checkpoint and the run that resumes it
_RESUME_FIXED = ("kind", "layers", "n_heads", "shared_lm_head", "adversarial", "lam", "lr", "disc_lr",
                 "batch_size", "max_len", "steps", "warmup", "seed", "rollout", "w_feat", "w_prob",
                 "disc_tokens", "disc_width", "disc_input", "weight_decay", "grad_clip")

# fields added after checkpoints were written: the value such a checkpoint was trained with
_RESUME_ADDED = {"disc_input": "logprob"}


class Diverged(RuntimeError):
    pass


def cosine_lambda(warmup: int, total: int, floor: float = 0.1):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return f


class _HeadStep(nn.Module):
    """The head's loss as a module, so DistributedDataParallel wraps exactly the head's forward.
    The discriminator is called with detached parameters: the head step must not train it."""

    def __init__(self, head, cfg: TrainConfig):
        super().__init__()
        self.head = head
        self.cfg = cfg

    def forward(self, tokens, hidden, teacher, mask, counts, disc_sel, disc: Discriminator | None, scale):
        cfg = self.cfg
        if cfg.kind == "medusa":
            terms = medusa_terms(self.head, hidden, teacher, mask)
        else:
            terms = eagle_terms(self.head, tokens, hidden, teacher, mask, cfg.rollout)
        loss = hidden.new_zeros((), dtype=torch.float32)
        stats = {}
        fakes = []
        dparams = {k: v.detach() for k, v in disc.named_parameters()} if disc is not None else None
        for t, n, sel in zip(terms, counts, disc_sel):
            n = max(n, 1)
            kl, agree = distill_sums(t)
            if t.feat_sum is not None:
                term = cfg.w_feat * t.feat_sum + cfg.w_prob * kl
                stats[f"feat/{t.name}"] = t.feat_sum.detach() / n
            else:
                term = kl
            stats[f"kl/{t.name}"] = kl.detach() / n
            stats[f"top1/{t.name}"] = agree / n
            loss = loss + term / n
            if disc is not None:
                s, n_sel = sel                       # (N,) bool over this term's rows, global count
                d_fake = functional_call(disc, dparams, (t.cond[s], t.draft[s]))
                adv = head_adversarial_sum(d_fake) / max(n_sel, 1)
                loss = loss + cfg.lam * adv
                stats[f"adv/{t.name}"] = adv.detach()
                fakes.append((t.cond[s].detach(), t.draft[s].detach(), t.teacher_src[t.rows[s]], max(n_sel, 1)))
        return loss * scale, loss.detach(), stats, fakes


class _DiscStep(nn.Module):
    def __init__(self, disc):
        super().__init__()
        self.disc = disc

    def forward(self, fakes, scale):
        loss = torch.zeros((), device=next(self.disc.parameters()).device)
        real_p, fake_p = [], []
        for cond, fake, real, n in fakes:
            d_real, d_fake = self.disc(cond, real), self.disc(cond, fake)
            loss = loss + discriminator_sum(d_real, d_fake) / n
            real_p.append(torch.sigmoid(d_real).detach().mean())
            fake_p.append(torch.sigmoid(d_fake).detach().mean())
        stats = {"disc/loss": loss.detach(), "disc/D_real": torch.stack(real_p).mean(),
                 "disc/D_fake": torch.stack(fake_p).mean()}
        return loss * scale, stats


def _rng_state():
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st):
    # RNG states are CPU byte tensors; torch.load(map_location=cuda) moves them to the GPU
    torch.set_rng_state(st["torch"].cpu())
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])


class Trainer:
    def __init__(self, cfg: TrainConfig, target=None, target_name: str | None = None, resume: bool = False,
                 device=None):
        self.cfg = cfg
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.world} ranks")
        if device is None:
            if torch.cuda.is_available():
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(device)
            else:
                device = torch.device("cpu")
        self.device = torch.device(device)
        if target is None:
            from koala.loading import load_target
            target = load_target(cfg.target, device=self.device)
        self.target = getattr(target, "model", target).to(self.device).eval().requires_grad_(False)
        from koala.model import Transformer
        Transformer.use_kernels(False)   # the fused Triton inference kernels have no backward pass
        self.target_name = target_name or getattr(target, "name", None) or cfg.target
        self.out = Path(cfg.out)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)

        torch.manual_seed(cfg.seed)              # the same initial head on every rank
        self.head = cfg.draft.build(target if hasattr(target, "model") else self.target, self.target_name)
        self.head = self.head.to(self.device, torch.float32).train()   # fp32 master weights
        tc = self.target.config
        self.disc = None
        if cfg.adversarial:
            self.disc = Discriminator(tc.dim, tc.vocab_size, fc_layers_for(cfg.layers), cfg.disc_width,
                                      cfg.disc_input).to(self.device)
        self.kl_backend = kl_backend(self.device)
        if self.rank == 0:
            print(f"distillation KL: {'fused Triton kernel (kernels.distill)' if self.kl_backend == 'fused' else 'PyTorch reference formula (train.losses.kl_sum)'} on {self.device}")
        self.head_step = _HeadStep(self.head, cfg)
        self.disc_step = _DiscStep(self.disc) if self.disc is not None else None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            import warnings
            ids = [self.device.index] if self.device.type == "cuda" else None
            with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; 2.11 lacks the new name
                warnings.simplefilter("ignore", FutureWarning)
                # buffers (the rotary tables) are equal on every rank: no need to broadcast per step
                self.head_step = DDP(self.head_step, device_ids=ids, broadcast_buffers=False)
                if self.disc_step is not None:
                    self.disc_step = DDP(self.disc_step, device_ids=ids, broadcast_buffers=False)
        self.opt = torch.optim.AdamW([p for p in self.head.parameters() if p.requires_grad], lr=cfg.lr,
                                     betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine_lambda(cfg.warmup, cfg.steps))
        if self.disc is not None:
            self.dopt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.999))
            self.dsched = torch.optim.lr_scheduler.LambdaLR(self.dopt, cosine_lambda(cfg.warmup, cfg.steps))
        self.data = ShardData(cfg.data, "train", cfg.batch_size, cfg.seed, cfg.max_len)
        if len(self.data) == 0:
            raise ValueError(f"{cfg.data}: {self.data.n} training sequences, fewer than one batch of {cfg.batch_size}")
        self.eval_data = None
        if Path(cfg.data, "eval.offsets.npy").is_file():
            self.eval_data = ShardData(cfg.data, "eval", max(1, min(cfg.batch_size, 8)), cfg.seed, cfg.max_len)
        self.step = 0
        self.loss_avg = None
        self.bad_steps = 0
        self.elapsed = 0.0
        self.tokens_seen = 0
        self.history: list[dict] = []
        if resume and (self.out / CKPT).is_file():
            self.load_checkpoint(self.out / CKPT)

    # ------------------------------------------------------------------------------------------
    def _autocast(self):
        on = self.cfg.autocast and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def _term_masks(self, mask):
        """(valid masks of each term over the global batch) -> list of (B, L) bool."""
        if self.cfg.kind == "medusa":
            return [medusa_valid(mask, i) for i in range(self.cfg.n_heads)]
        return [eagle_valid(mask, s) for s in range(self.cfg.rollout)]

    def _disc_selection(self, valids, step):
        """Choose ~disc_tokens positions per term from the global batch with a generator seeded by
        the step (no global RNG, identical on every rank and on resume)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        out = []
        for v in valids:
            n = int(v.sum())
            keep = v & (torch.rand(v.shape, generator=g) < min(1.0, self.cfg.disc_tokens / max(n, 1)))
            out.append(keep)
        return out

    def _local(self, x):
        per = self.cfg.batch_size // self.world
        return x[self.rank * per:(self.rank + 1) * per]

    def train_step(self):
        cfg = self.cfg
        b = self.data.batch(self.step)
        valids = self._term_masks(b.mask)
        counts = [int(v.sum()) for v in valids]
        sel = self._disc_selection(valids, self.step) if self.disc is not None else [None] * len(valids)
        tokens = self._local(b.tokens).to(self.device)
        mask = self._local(b.mask).to(self.device)
        disc_sel = []
        for v, s in zip(valids, sel):
            if s is None:
                disc_sel.append(None)
                continue
            lv, ls = self._local(v), self._local(s)
            disc_sel.append((ls[lv].to(self.device), int(s.sum())))
        with torch.no_grad(), self._autocast():
            teacher, hidden = self.target(tokens)
        with self._autocast():
            loss, loss_val, stats, fakes = self.head_step(tokens, hidden, teacher, mask, counts, disc_sel,
                                                          self.disc, float(self.world))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.head.parameters(), cfg.grad_clip)
        # the global loss, identical on every rank, decides divergence
        lv = loss_val.detach().clone()
        if self.world > 1:
            dist.all_reduce(lv)
        global_loss = lv.item()
        if not math.isfinite(global_loss) or not math.isfinite(gnorm.item()):
            raise Diverged(f"step {self.step}: loss {global_loss}, gradient norm {gnorm.item()}")
        if self.loss_avg is not None and self.step >= cfg.warmup and global_loss > cfg.divergence * self.loss_avg:
            self.bad_steps += 1
            if self.bad_steps >= 3:
                raise Diverged(f"step {self.step}: loss {global_loss:.4g} above {cfg.divergence}x its running "
                               f"mean {self.loss_avg:.4g} for 3 steps")
        else:
            self.bad_steps = 0
        self.opt.step()
        self.sched.step()
        self.loss_avg = global_loss if self.loss_avg is None else 0.98 * self.loss_avg + 0.02 * global_loss
        out = {"step": self.step, "loss": global_loss, "lr": self.sched.get_last_lr()[0], "grad_norm": gnorm.item()}
        if self.disc is not None:
            with self._autocast():      # bf16 GEMMs: in fp32 the (N, 2V) first layer dominated the step
                dloss, dstats = self.disc_step(fakes, float(self.world))
            self.dopt.zero_grad(set_to_none=True)
            dloss.backward()
            dn = torch.nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.grad_clip)
            if not math.isfinite(dn.item()):
                raise Diverged(f"step {self.step}: discriminator gradient norm {dn.item()}")
            self.dopt.step()
            self.dsched.step()
            stats.update(dstats)
        out.update({k: float(v) for k, v in stats.items()})
        self.tokens_seen += b.n_tokens
        self.step += 1
        return out

    @torch.no_grad()
    def batch_loss(self, step: int) -> float:
        """The distillation loss (no adversarial term) on the global batch of `step`, no update."""
        b = self.data.batch(step)
        counts = [int(v.sum()) for v in self._term_masks(b.mask)]
        tokens, mask = b.tokens.to(self.device), b.mask.to(self.device)
        with self._autocast():
            teacher, hidden = self.target(tokens)
            step_mod = self.head_step.module if hasattr(self.head_step, "module") else self.head_step
            _, loss, _, _ = step_mod(tokens, hidden, teacher, mask, counts, [None] * len(counts), None, 1.0)
        return loss.item()

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Per-position top-1 agreement with the target on the held-out slice
        (Medusa: head i = position i+1 after the target's own token; EAGLE: rollout step s)."""
        if self.eval_data is None:
            return {}
        self.head.eval()
        agree = None
        count = None
        for b in self.eval_data.eval_batches(self.cfg.eval_batches):
            tokens, mask = b.tokens.to(self.device), b.mask.to(self.device)
            with self._autocast():
                teacher, hidden = self.target(tokens)
                if self.cfg.kind == "medusa":
                    terms = medusa_terms(self.head, hidden, teacher, mask)
                else:
                    terms = eagle_terms(self.head, tokens, hidden, teacher, mask, max(self.cfg.rollout, 3))
            a = torch.stack([distill_sums(t)[1].cpu() for t in terms]).double()
            c = torch.tensor([t.draft.shape[0] for t in terms], dtype=torch.float64)
            agree = a if agree is None else agree + a
            count = c if count is None else count + c
        self.head.train()
        top1 = (agree / count.clamp(min=1)).tolist()
        return {"eval/top1": top1}

    # ------------------------------------------------------------------------------------------
    def state(self) -> dict:
        st = {"step": self.step, "config": asdict(self.cfg), "head": self.head.state_dict(),
              "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "rng": _rng_state(),
              "loss_avg": self.loss_avg, "bad_steps": self.bad_steps, "elapsed": self.elapsed,
              "tokens_seen": self.tokens_seen, "history": self.history,
              "data_position": {"step": self.step, "epoch": self.step // len(self.data),
                                "batch": self.step % len(self.data)}}
        if self.disc is not None:
            st.update(disc=self.disc.state_dict(), dopt=self.dopt.state_dict(), dsched=self.dsched.state_dict())
        return st

    def save_checkpoint(self):
        if self.rank == 0:
            tmp = self.out / (CKPT + ".tmp")
            torch.save(self.state(), tmp)
            os.replace(tmp, self.out / CKPT)      # atomic: a kill never leaves half a checkpoint
        if self.world > 1:
            dist.barrier()

    def load_checkpoint(self, path):
        st = torch.load(path, map_location=self.device, weights_only=False)
        old = {**_RESUME_ADDED, **st["config"]}
        diff = {k: (old.get(k), getattr(self.cfg, k)) for k in _RESUME_FIXED if old.get(k) != getattr(self.cfg, k)}
        if diff:
            raise ValueError(f"cannot resume {path}: settings differ from the checkpoint's {diff}; "
                             "use the same settings or a new --out")
        self.head.load_state_dict(st["head"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        if self.disc is not None:
            self.disc.load_state_dict(st["disc"])
            self.dopt.load_state_dict(st["dopt"])
            self.dsched.load_state_dict(st["dsched"])
        _set_rng_state(st["rng"])
        self.step, self.loss_avg, self.bad_steps = st["step"], st["loss_avg"], st["bad_steps"]
        self.elapsed, self.tokens_seen, self.history = st["elapsed"], st["tokens_seen"], st["history"]

    def export_head(self):
        if self.rank == 0:
            # the answer tokens' counts of the training data go with the head (draft vocabularies)
            from train.vocab import answer_counts
            head = self.head
            head.token_counts = torch.from_numpy(answer_counts(self.cfg.data, "train", head.target_config.vocab_size))
            head.save_pretrained(self.out / "head", dtype=getattr(torch, self.cfg.save_dtype))

    def _log(self, rec):
        self.history.append(rec)
        if self.rank == 0:
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict:
        """Train to cfg.steps (or until the time budget, or stop_after more steps: for tests that
        simulate a kill). Returns the summary, also written to <out>/summary.json."""
        cfg = self.cfg
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.kind} K={cfg.layers}"
                       f"{' adv' if cfg.adversarial else ''}", dynamic_ncols=True)
        t_start = time.perf_counter()
        start_elapsed = self.elapsed
        target_steps = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        status = "finished"
        message = ""
        while self.step < target_steps:
            if cfg.time_budget and time.perf_counter() - t_start > cfg.time_budget:
                status = "time budget"
                break
            try:
                rec = self.train_step()
            except Diverged as e:
                status, message = "diverged", (f"{e}. Stopped; kept the last good checkpoint "
                                               f"({self.out / CKPT}) and exported it to {self.out / 'head'}.")
                break
            self.elapsed = start_elapsed + time.perf_counter() - t_start
            rec["tokens_per_s"] = self.tokens_seen / max(self.elapsed, 1e-9)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                rec.update(self.evaluate())
            self._log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", **({"top1": ",".join(f"{x:.2f}" for x in rec["eval/top1"])}
                                                            if "eval/top1" in rec else {}))
            if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if status == "diverged":
            if (self.out / CKPT).is_file():
                self.load_checkpoint(self.out / CKPT)
            else:                          # diverged before the first interval: restart state
                message += " (no interval checkpoint existed yet: the exported head is the initial one)"
            self.export_head()
        elif status == "time budget" or self.step < cfg.steps:
            self.save_checkpoint()
            status = "time budget" if status == "time budget" else "stopped"
        else:
            self.save_checkpoint()
            self.export_head()
        summary = {"status": status, "message": message, "step": self.step, "steps": cfg.steps,
                   "train_seconds": self.elapsed, "tokens_seen": self.tokens_seen,
                   "tokens_per_s": self.tokens_seen / max(self.elapsed, 1e-9),
                   "final_eval": self.evaluate() if status == "finished" else {},
                   "config": asdict(cfg), "world_size": self.world, "kl_backend": self.kl_backend,
                   "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"}
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if message:
                print(message)
        return summary
