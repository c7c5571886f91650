"""python -m koala: the main job. Generates a chat answer with the embedded SmolLM2 model and its
shipped KOALA head (or plainly with --draft none), printing the answer, tau and the speed."""
from __future__ import annotations

import argparse
import json
import sys

from . import SpeculativeGenerator
from .errors import KoalaError


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m koala", description=__doc__)
    ap.add_argument("prompt", nargs="?", default="Explain in three sentences why the sky is blue.")
    ap.add_argument("--target", default="smollm2-135m-instruct", help="embedded default, HF directory or .gguf")
    ap.add_argument("--draft", default="default", help="'default' (shipped head), a head directory, or 'none'")
    ap.add_argument("--mode", default=None, choices=["chain", "tree"], help="drafting mode (default: the head's)")
    ap.add_argument("--draft-vocab", default="head",
                    help="draft from this many of the head's most frequent tokens ('none': all; 'head': its config)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--max-seq-len", type=int, default=2048, help="cache slots per sequence (prompt + answer)")
    ap.add_argument("--compare", action="store_true", help="also decode plainly and report the speedup")
    ap.add_argument("--prompts-file", default=None,
                    help="a text file of prompts, one a line, decoded together as one batch (generate_batch)")
    ap.add_argument("--json", action="store_true", help="print the stats as JSON")
    a = ap.parse_args(argv)
    try:
        draft = None if a.draft in ("none", "None", "") else a.draft
        opts = {"mode": a.mode} if (a.mode and draft) else {}
        if draft:
            from koala.heads import parse_draft_vocab
            opts["draft_vocab"] = parse_draft_vocab(a.draft_vocab)
        gen = SpeculativeGenerator.from_pretrained(a.target, draft=draft, device=a.device, dtype=a.dtype,
                                                   max_seq_len=a.max_seq_len, **opts)
        kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                  seed=a.seed)
        if a.prompts_file:
            return _batch(gen, a.prompts_file, kw, a.json)
        gen.generate(a.prompt, max_new_tokens=8)  # warm-up: graph capture and kernel compilation
        print(f"> {a.prompt}\n", flush=True)
        res = gen.generate(a.prompt, stream=lambda s: print(s, end="", flush=True), **kw)
        print("\n")
        s = res.stats
        line = f"{s.new_tokens} tokens in {s.wall_s:.2f} s: {s.tokens_per_s:.1f} tokens/s on {gen.device}"
        if s.tau is not None:
            line += f"; tau {s.tau:.2f} tokens per target forward"
            if s.alpha:
                line += ", " + ", ".join(f"{i + 1}-alpha {x:.2f}" for i, x in enumerate(s.alpha))
        print(line)
        if a.compare and gen.spec is not None:
            plain = SpeculativeGenerator(gen.target, None, max_seq_len=gen.max_seq_len)
            plain.generate(a.prompt, max_new_tokens=8)
            p = plain.generate(a.prompt, **kw)
            same = "identical output" if p.token_ids == res.token_ids else "outputs differ (sampling)"
            print(f"plain decoding: {p.stats.tokens_per_s:.1f} tokens/s; speedup {s.tokens_per_s / p.stats.tokens_per_s:.2f}x; {same}")
        if a.json:
            print(json.dumps(s.to_dict()))
    except KoalaError as e:
        print(f"koala: error: {e}", file=sys.stderr)
        return 2
    return 0


def _batch(gen, path, kw, as_json) -> int:
    """--prompts-file: every non-empty line a prompt, all decoded in one generate_batch call."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise KoalaError(f"cannot read --prompts-file {path}: {e.strerror or e}") from None
    if not prompts:
        raise KoalaError(f"--prompts-file {path} holds no prompts: write one prompt a line")
    gen.generate_batch(prompts[:1], max_new_tokens=8)          # warm-up: kernel compilation
    res = gen.generate_batch(prompts, **kw)
    for p, r in zip(prompts, res):
        s = r.stats
        extra = f", tau {s.tau:.2f}" if s.tau is not None else ""
        print(f"> {p}\n{r.text}\n({s.new_tokens} tokens{extra})\n")
        if as_json:
            print(json.dumps(s.to_dict()))
    total, wall = sum(r.stats.new_tokens for r in res), res[0].stats.wall_s
    print(f"{total} tokens for a batch of {len(prompts)} in {wall:.2f} s: {total / wall:.1f} tokens/s on {gen.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
