"""Does decoding accept what training measured? Decode MT-bench questions with a head (chains,
greedy), then run the training-time computation over the same text (the target over prompt and
answer at once, the head teacher-forced: EAGLE's rollout of train/losses.py, Medusa's heads over
the target's hidden states) and replay each decoding iteration from it: an iteration that started
after token x_p drafted x_{p+1..p+d}, and teacher forcing predicts how many of those the target
accepts (the leading matches). Where the two paths compute the same thing, the counts agree
iteration by iteration; where they do not (a cache, position or feature offset at inference that
training does not have), decoding accepts less than the held-out top-1 figures promise.

Also reported: the teacher-forced top-1 agreement at every answer position (the trainer's
held-out metric, here on MT-bench text) against decoding's 1-alpha.

  python -m bench.acceptance --head default --questions 8 --turns 2 --max-new 256 --depth 1 --dtype float32

Writes bench/results/acceptance_<head>_d<depth>.json ($OUT/ on the GPU machine) (device, date, commit, command, settings).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.common import mt_bench, write


def teacher_forced_tokens(head, model, seq, depth: int):
    """seq (1, T) prompt + answer -> (depth, T) int64: entry [s, p] is the token the head drafts
    at level s (0-based) of an iteration whose last known token is x_p, computed teacher-forced
    (every earlier draft taken as correct); -1 where it does not exist."""
    from train.losses import eagle_rollout
    T = seq.shape[1]
    out = torch.full((depth, T), -1, dtype=torch.long)
    _, hidden = model(seq)
    if head.config.kind == "eagle":
        # shifted frame u = p - 1 + s: input token x_{u+1}, output predicting x_{u+2} = x_{p+1+s}
        outs = eagle_rollout(head, seq[:, 1:], hidden[:, :-1], depth)
        for s, o in enumerate(outs):
            tok = head.to_token_ids(head.draft_project(o[0]).argmax(-1)).cpu()   # (T-1,) at u
            p = torch.arange(T - 1) + 1 - s                                 # p = u + 1 - s
            ok = p >= 1
            out[s, p[ok]] = tok[ok]
    else:
        # Medusa head s from h_{p-1} predicts x_{p+1+s} (the bonus x_p came from h_{p-1} too)
        logits = head(hidden, draft=True, heads=depth)                     # (depth, 1, T, Vd)
        for s in range(depth):
            tok = head.to_token_ids(logits[s, 0].argmax(-1)).cpu()         # at t = p - 1
            out[s, 1:] = tok[:-1]
    return out


def replay(tf, seq, P: int, accepted: list[int], depth: int):
    """Predicted acceptance of every decoding iteration that lies inside the answer, from the
    teacher-forced drafts tf (depth, T). Returns (predicted, decoded) lists of equal length."""
    T = seq.shape[1]
    pred, dec = [], []
    p = P                                            # the first answer token x_P comes from the prefill
    for a in accepted:
        if p + depth + 1 > T - 1:                    # the answer ends inside this iteration's window
            break
        m = 0
        while m < depth and int(tf[m, p]) == int(seq[0, p + 1 + m]):
            m += 1
        pred.append(m)
        dec.append(int(a))
        p += int(a) + 1
    return pred, dec


def answer_replay(gen, msgs, max_new: int, depth: int):
    """Decode one answer to msgs and compute its teacher-forced drafts.
    Returns (result, seq (1, T) prompt + answer on the CPU, tf (depth, T), prompt length P)."""
    ids = gen.encode(list(msgs))
    r = gen.generate(list(msgs), max_new_tokens=max_new)
    seq = torch.tensor([ids + r.token_ids], device=gen.device)
    with torch.inference_mode():
        tf = teacher_forced_tokens(gen.head, gen.model, seq, depth)
    return r, seq.cpu(), tf, len(ids)


def run(gen, questions, max_new: int, depth: int, turns: int = 1, progress: bool = True):
    """Decode the first `turns` turns of each question (the second follows the model's own first
    answer, as bench.mtbench does) and replay every answer's iterations."""
    rows = []
    for q in questions:
        msgs = []
        for t, turn in enumerate(q["turns"][:turns]):
            msgs.append({"role": "user", "content": turn})
            r, seq, tf, P = answer_replay(gen, msgs, max_new, depth)
            msgs.append({"role": "assistant", "content": r.text})
            pred, dec = replay(tf, seq, P, r.stats.accepted_per_step, depth)
            hit = tf[0, P:-1] == seq[0, P + 1:]    # level-0 agreement at every answer position
            same = sum(x == y for x, y in zip(pred, dec))
            rows.append({"question_id": q["question_id"], "category": q["category"], "turn": t + 1,
                         "new_tokens": len(r.token_ids), "iterations": len(dec), "iterations_equal": same,
                         "decoded_accepted": sum(dec), "predicted_accepted": sum(pred), "tau": r.stats.tau,
                         "top1_hits": int(hit.sum()), "answer_positions": hit.numel()})
            if progress:
                print(f"q{q['question_id']} turn {t + 1} {q['category']:<11} iterations {len(dec):4d}  equal {same:4d}"
                      f"  accepted: decoded {sum(dec)}  teacher-forced {sum(pred)}", flush=True)

    def summarise(rs):
        it = sum(r["iterations"] for r in rs)
        n = sum(r["answer_positions"] for r in rs)
        return {"iterations": it, "iterations_equal": sum(r["iterations_equal"] for r in rs),
                "decoded_accepted_per_iteration": sum(r["decoded_accepted"] for r in rs) / max(it, 1),
                "predicted_accepted_per_iteration": sum(r["predicted_accepted"] for r in rs) / max(it, 1),
                "teacher_forced_top1_all_positions": sum(r["top1_hits"] for r in rs) / max(n, 1),
                "answer_positions": n}
    summary = summarise(rows)
    if turns > 1:
        summary["by_turn"] = {str(t): summarise([r for r in rows if r["turn"] == t]) for t in range(1, turns + 1)}
    return rows, summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.acceptance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--head", default="default", help="a head directory, 'default' (EAGLE) or 'default-medusa'")
    ap.add_argument("--questions", type=int, default=8, help="first turns of this many MT-bench questions, "
                    "spread over the categories")
    ap.add_argument("--turns", type=int, default=1, choices=(1, 2), help="1: first turns; 2: both turns")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--depth", type=int, default=1, help="chain depth")
    ap.add_argument("--draft-vocab", default="head", help="'head' (the head's default), 'none' or n")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the target's)")
    ap.add_argument("--out", default="")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.questions < 1 or a.max_new < 1 or a.depth < 1:
        ap.error("--questions, --max-new and --depth must be positive")
    from koala import SpeculativeGenerator
    from koala.heads import parse_draft_vocab
    opts = {"mode": "chain", "depth": a.depth}
    if a.draft_vocab != "head":
        opts["draft_vocab"] = parse_draft_vocab(a.draft_vocab)
    gen = SpeculativeGenerator.from_pretrained(draft=a.head, device=a.device, dtype=a.dtype, **opts)
    qs = mt_bench()
    step = max(1, len(qs) // a.questions)
    rows, summary = run(gen, qs[::step][:a.questions], a.max_new, a.depth, a.turns,
                        progress=not a.no_progress)
    print(json.dumps(summary, indent=1))
    name = a.out or f"acceptance_{Path(a.head).name}_d{a.depth}.json"
    res = {"settings": vars(a), "head_kind": gen.head.config.kind, "K": gen.head.config.layers,
           "draft_vocab": gen.head.draft_vocab_size, "dtype": str(gen.model.dtype), "summary": summary,
           "questions": rows}
    print(f"-> {write(name, res)}")


if __name__ == "__main__":
    main()
