"""python -m train.vocab: count the answer tokens of a prepared shard set, for draft vocabularies.

  python -m train.vocab --data runs/data/sharegpt --heads koala/default_heads/eagle,koala/default_heads/medusa \
      [--draft-vocab 8192 | --draft-vocab none] [--sizes 2048,4096,8192,16384,32768] [--out counts.json]

Counts how often each token occurs among the assistant tokens (the mask of `python -m train.data`)
of the train split, prints how much of the held-out split's assistant tokens the n most frequent
tokens cover, for each n of --sizes, and writes the counts into each head directory as
token_counts.safetensors (koala.heads.COUNTS). --draft-vocab also sets the head's default draft
vocabulary in its config.json (`draft_vocab`), which the decoder uses unless told otherwise.

A head drafts only from its draft vocabulary, so a target token outside it is never drafted: the
held-out coverage bounds the first-token acceptance a draft vocabulary can keep. The trainer
writes the counts of its own data with every head it exports.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def answer_counts(root, split: str = "train", vocab_size: int | None = None) -> np.ndarray:
    """(V,) int64: occurrences of each token among the split's assistant tokens."""
    root = Path(root)
    for suffix in ("tokens", "mask", "offsets"):
        if not (root / f"{split}.{suffix}.npy").is_file():
            raise FileNotFoundError(f"{root}/{split}.{suffix}.npy is missing: run python -m train.data first")
    tokens = np.load(root / f"{split}.tokens.npy", mmap_mode="r")
    offsets = np.load(root / f"{split}.offsets.npy")
    mask = np.unpackbits(np.load(root / f"{split}.mask.npy"), count=int(offsets[-1])).astype(bool)
    if vocab_size is None:
        vocab_size = int(json.loads((root / "meta.json").read_text())["vocab_size"])
    ids = np.asarray(tokens[: len(mask)])[mask].astype(np.int64)
    if ids.size and int(ids.max()) >= vocab_size:
        raise ValueError(f"{root}/{split}: token id {int(ids.max())} is outside a vocabulary of {vocab_size}")
    return np.bincount(ids, minlength=vocab_size).astype(np.int64)


def top_ids(counts, n: int) -> np.ndarray:
    """The n most frequent token ids (ties: the lower id first), as koala.heads.set_draft_vocab picks them."""
    c = torch.as_tensor(np.asarray(counts))
    return torch.sort(-c, stable=True).indices[:n].numpy()


def coverage(counts, held_out_counts, sizes) -> dict[int, float]:
    """For each n: the fraction of the held-out tokens among the n most frequent of `counts`."""
    total = max(1, int(np.asarray(held_out_counts).sum()))
    held = np.asarray(held_out_counts)
    return {n: float(held[top_ids(counts, n)].sum()) / total for n in sizes}


def write_head(head_dir, counts, source: str, draft_vocab: int | None | str = "keep"):
    """Write token_counts.safetensors into a head directory (checking its vocabulary size) and,
    unless draft_vocab is 'keep', set config.json's draft_vocab (None: drafting uses all)."""
    from koala.heads import save_token_counts
    head_dir = Path(head_dir)
    cfg_file = head_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{head_dir} has no config.json: not a koala draft head")
    cfg = json.loads(cfg_file.read_text())
    if int(cfg["vocab_size"]) != len(counts):
        raise ValueError(f"{head_dir} drafts over {cfg['vocab_size']} tokens but the counts cover {len(counts)}: "
                         "the data was prepared for another tokenizer")
    save_token_counts(head_dir, torch.as_tensor(np.asarray(counts)), source=source)
    if draft_vocab != "keep":
        cfg["draft_vocab"] = draft_vocab
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.vocab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a shard set of python -m train.data (or train.selfdistill)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--heads", default="", help="comma-separated head directories to write the counts into")
    ap.add_argument("--draft-vocab", default="keep",
                    help="also set each head's default draft vocabulary: a size, or 'none' for all tokens")
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--out", default="", help="write the coverage table as JSON here")
    a = ap.parse_args(argv)
    from koala.errors import KoalaError
    from koala.heads import parse_draft_vocab
    try:
        dv = parse_draft_vocab(a.draft_vocab, keep="keep")
    except KoalaError as e:
        ap.error(f"--draft-vocab: {e}")
    sizes = [int(x) for x in a.sizes.split(",") if x]
    counts = answer_counts(a.data, a.split)
    V = len(counts)
    print(f"{a.data}/{a.split}: {int(counts.sum()):,} answer tokens, {int((counts > 0).sum()):,} of {V:,} ids occur")
    table = {}
    if (Path(a.data) / "eval.tokens.npy").is_file() and a.split != "eval":
        held = answer_counts(a.data, "eval", V)
        table = coverage(counts, held, sizes)
        print(f"held-out coverage ({int(held.sum()):,} answer tokens):")
        for n, c in table.items():
            print(f"  top {n:>6,}: {c:.4f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"data": a.data, "split": a.split, "answer_tokens": int(counts.sum()),
                                           "held_out_coverage": {str(k): v for k, v in table.items()}}, indent=2) + "\n")
    source = f"python -m train.vocab --data {a.data} --split {a.split}"
    for h in [x for x in a.heads.split(",") if x]:
        write_head(h, counts, source, dv)
        print(f"wrote {h}/token_counts.safetensors" + ("" if dv == "keep" else f", draft_vocab={dv}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
