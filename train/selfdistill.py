"""Self-distillation: regenerate the assistant turns with the target itself, batched.

The heads must draft the *target's* text, not ChatGPT's, so the training conversations are
re-answered by the target: each conversation's prompt (system + user turn + assistant header,
the tokens before its first assistant token) is continued by the target until its end-of-turn
token. Later turns (--turns N) are regenerated in turn, each prompted with the target's own
earlier answers and the original user messages.

Batched generation (`generate`): prompts are left-padded to a common length P; the KV cache is
the runtime's static cache (setup_cache(B, S)); slots are shared by the batch (prefill 0..P-1,
then P, P+1, ...); each row has its own RoPE positions (t - pad_b) and mask (B, T, S): a row
sees slots from its first real token to the query's slot. Pad queries see only their own slot,
so no row of the mask is empty (an all-masked row would give NaN and poison the cache).

Works in token space on a shard set (python -m train.data), so the GPU machine needs neither
`datasets` nor the ShareGPT wheel; it writes a shard set of the same format, in resumable parts:

  python -m train.selfdistill --data data/sharegpt --out data/sharegpt-sd --batch-size 128 \
      --max-new 512 [--turns 1] [--temperature 0] [--time-budget 540] [--limit N]
  (run again with the same arguments to continue; it merges the parts when all are done)

Only the prompts of the regenerated turns are read, so a GPU call can carry just those:

  python -m train.selfdistill --data data/sharegpt --prompts-out data/sharegpt-prompts [--turns 1]

writes a shard set in which every answer is cut to its first token (and nothing follows the last
regenerated turn's): 3.9 MB for ShareGPT's first turns against 28 MB for the whole set, which
with the repository (about 36 MB) would not fit the 64 MiB a GPU call carries. Self-distilling it
gives what self-distilling the whole set gives.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from train.data import ShardData, write_split


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new: int | list[int], eos_ids, temperature: float = 0.0,
             generator: torch.Generator | None = None, pad_id: int = 0) -> list[list[int]]:
    """Continue each prompt (greedy if temperature == 0, else sampled) until an EOS id (kept in
    the output) or max_new tokens: one limit for all, or one per prompt. Returns the new tokens of
    each prompt."""
    dev = model.device
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    if int(lens.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    limits = [max_new] * B if isinstance(max_new, int) else list(max_new)
    if len(limits) != B or min(limits) < 1:
        raise ValueError(f"max_new must be >= 1, one value or one per prompt ({B}), got {max_new}")
    limit = torch.tensor(limits, device=dev)
    max_new = max(limits)
    P = int(lens.max())
    S = P + max_new
    model.setup_cache(B, S)
    start = P - lens                                                 # (B,) first real slot
    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p, device=dev)
    ar = torch.arange(S, device=dev)
    t = torch.arange(P, device=dev)
    positions = (t[None, :] - start[:, None]).clamp(min=0)          # (B, P)
    visible = (ar[None, None, :] >= start[:, None, None]) & (ar[None, None, :] <= t[None, :, None])
    mask = visible | (ar[None, None, :] == t[None, :, None])        # (B, P, S); pad rows see themselves
    logits, _ = model(tokens, positions, t, mask, logits_index=torch.tensor([P - 1], device=dev))
    eos = torch.tensor(list(eos_ids) or [-1], device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = torch.full((B, max_new), pad_id, dtype=torch.long, device=dev)
    n_out = torch.zeros(B, dtype=torch.long, device=dev)
    for k in range(max_new):
        last = logits[:, -1].float()
        if temperature > 0:
            probs = torch.softmax(last / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = last.argmax(-1)
        out[:, k] = torch.where(done, pad_id, nxt)
        n_out += (~done).long()
        done |= torch.isin(nxt, eos) | (limit <= k + 1)
        if k == max_new - 1 or bool(done.all()):
            break
        slot = torch.tensor([P + k], device=dev)
        m = ((ar >= start[:, None]) & (ar <= P + k)).unsqueeze(1)   # (B, 1, S)
        logits, _ = model(nxt[:, None], (lens + k)[:, None], slot, m)
    return [out[b, : int(n_out[b])].tolist() for b in range(B)]


def segments(tokens: np.ndarray, mask: np.ndarray) -> list[tuple[np.ndarray, bool]]:
    """Split a sequence into maximal runs of context (False) and assistant (True) tokens."""
    out, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and mask[j] == mask[i]:
            j += 1
        out.append((tokens[i:j], bool(mask[i])))
        i = j
    return out


def regenerate(model, seqs: list[tuple[np.ndarray, np.ndarray]], batch_size: int, max_new: int,
               max_len: int, eos_ids, end_of_turn: list[int], turns: int = 1, temperature: float = 0.0,
               seed: int = 0, progress=None) -> list[tuple[list[int], list[int]]]:
    """Re-answer the first `turns` assistant turns of each sequence with the model.
    end_of_turn: tokens appended after the generated EOS (SmolLM2: the newline after <|im_end|>),
    marked as assistant tokens as train.data does. Returns (ids, mask) per sequence."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    convs = []
    for tok, msk in seqs:
        segs = segments(tok, msk)
        ctx = [s for s, a in segs if not a]
        convs.append({"ctx": ctx, "ids": [], "mask": [], "open": True})
    for turn in range(turns):
        todo = []
        for c in convs:
            if c["open"] and turn < len(c["ctx"]) and (turn == 0 or c["ids"]):
                prompt_add = c["ctx"][turn].tolist()
                if len(c["ids"]) + len(prompt_add) + 8 > max_len:
                    c["open"] = False
                    continue
                c["ids"] += prompt_add
                c["mask"] += [0] * len(prompt_add)
                todo.append(c)
            else:
                c["open"] = False
        todo.sort(key=lambda c: len(c["ids"]))                      # similar lengths batch together
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            # each row's own room up to max_len: a batch-wide budget (set by its longest prompt)
            # cut the short prompts' answers too (most of a 200-row eval batch to ~40 tokens)
            budgets = [max(1, min(max_new, max_len - len(c["ids"]) - len(end_of_turn))) for c in chunk]
            new = generate(model, [c["ids"] for c in chunk], budgets, eos_ids, temperature, g)
            for c, n in zip(chunk, new):
                ended = bool(n) and n[-1] in eos_ids
                n = n + (end_of_turn if ended else [])
                c["ids"] += n
                c["mask"] += [1] * len(n)
                c["open"] = ended
            if progress is not None:
                progress(len(chunk))
    return [(c["ids"][:max_len], c["mask"][:max_len]) for c in convs if any(c["mask"])]


def prompts_only(tok: np.ndarray, mask: np.ndarray, turns: int) -> tuple[np.ndarray, np.ndarray]:
    """What regenerate reads of a sequence: its context segments up to the `turns`-th answer, each
    answer cut to its first token (so the segments, and their order, stay those of the sequence).
    Returns (ids, mask)."""
    ids, msk, answers = [], [], 0
    for seg, is_answer in segments(tok, mask):
        if is_answer:
            ids.append(seg[:1])
            msk.append(np.ones(1, dtype=bool))
            answers += 1
            if answers == turns:
                break
        else:
            ids.append(seg)
            msk.append(np.zeros(len(seg), dtype=bool))
    return np.concatenate(ids), np.concatenate(msk)


def write_prompts(data: str, out: str, turns: int = 1) -> dict:
    """The shard set `data` reduced to what regenerate reads for `turns` turns (prompts_only),
    written to `out` in the same format, with the source's meta. Returns the counts."""
    counts = {}
    for split in ("eval", "train"):
        src = ShardData(data, split, batch_size=1)
        seqs = [prompts_only(*src.sequence(i), turns) for i in range(src.n)]
        write_split(out, split, [s[0] for s in seqs], [s[1] for s in seqs])
        counts[split] = {"sequences": len(seqs), "tokens": int(sum(len(s[0]) for s in seqs))}
    _write_meta(data, out, counts, {"prompts_of": str(data), "prompts_turns": turns})
    return counts


def _write_meta(data: str, out: str, counts: dict, settings: dict):
    """out/meta.json: the source's meta with the counts of what was written and the settings."""
    meta = json.loads((Path(data) / "meta.json").read_text()) if (Path(data) / "meta.json").is_file() else {}
    meta.update(counts)
    meta.update(settings)
    (Path(out) / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def run(model, eos_ids, end_of_turn, data: str, out: str, batch_size=64, max_new=512, max_len=1024,
        turns=1, temperature=0.0, seed=0, part_size=1024, time_budget=0.0, limit=None) -> bool:
    """Regenerate the train and eval splits of a shard set into out, in parts of part_size
    sequences (skipping parts already written). Returns True when complete (and merged)."""
    out = Path(out)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for split in ("eval", "train"):
        src = ShardData(data, split, batch_size=1)
        n = min(src.n, limit or src.n)
        for p0 in range(0, n, part_size):
            f = parts / f"{split}-{p0:07d}.npz"
            if f.is_file():
                continue
            if time_budget and time.perf_counter() - t0 > time_budget:
                print(f"time budget reached; run again with the same arguments to continue")
                return False
            seqs = [src.sequence(i) for i in range(p0, min(n, p0 + part_size))]
            tp = time.perf_counter()
            res = regenerate(model, seqs, batch_size, max_new, max_len, eos_ids, end_of_turn, turns,
                             temperature, seed + p0)
            ids = [np.asarray(r[0], dtype=np.int32) for r in res]
            msk = [np.asarray(r[1], dtype=bool) for r in res]
            gen = sum(int(m.sum()) for m in msk)
            np.savez(f.with_suffix(".tmp.npz"), lens=np.array([len(x) for x in ids]),
                     ids=np.concatenate(ids), mask=np.concatenate(msk))
            f.with_suffix(".tmp.npz").rename(f)
            dt = time.perf_counter() - tp
            print(f"{split} {p0}..{p0 + len(seqs)}: {gen} tokens generated in {dt:.0f} s ({gen / dt:.0f} tokens/s)")
    counts = {}
    for split in ("eval", "train"):
        ids, masks = [], []
        for f in sorted(parts.glob(f"{split}-*.npz")):
            z = np.load(f)
            ends = np.cumsum(z["lens"])
            ids += np.split(z["ids"], ends[:-1])
            masks += np.split(z["mask"], ends[:-1])
        write_split(out, split, ids, masks)
        # the counts of what was written (the source's meta describes the source, maybe all of it)
        counts[split] = {"sequences": len(ids), "tokens": int(sum(len(x) for x in ids)),
                         "train_tokens": int(sum(int(np.asarray(m).sum()) for m in masks))}
    _write_meta(data, out, counts, {"selfdistilled_from": str(data), "max_new": max_new, "turns": turns,
                                    "temperature": temperature, "max_len": max_len, "limit": limit})
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.selfdistill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--data", required=True, help="shard set from python -m train.data")
    ap.add_argument("--out", help="where the self-distilled shard set goes")
    ap.add_argument("--prompts-out", help="instead: write only the prompts of --data that --turns turns read, "
                                          "to carry to the GPU machine, and exit (no model is loaded)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--turns", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part-size", type=int, default=1024)
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds; then stop cleanly (resumable)")
    ap.add_argument("--limit", type=int, help="only the first N sequences of each split")
    a = ap.parse_args(argv)
    if a.prompts_out:
        print(json.dumps(write_prompts(a.data, a.prompts_out, a.turns)))
        return
    if not a.out:
        ap.error("--out is required (or --prompts-out)")
    from koala.loading import load_target
    lt = load_target(a.target)
    eos = list(lt.model.config.eos_token_ids)
    eot = lt.tokenizer("\n", add_special_tokens=False)["input_ids"]
    done = run(lt.model, eos, eot, a.data, a.out, a.batch_size, a.max_new, a.max_len, a.turns,
               a.temperature, a.seed, a.part_size, a.time_budget, a.limit)
    print("complete" if done else "incomplete")


if __name__ == "__main__":
    main()
