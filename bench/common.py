"""Shared by the benchmarks: where results go and what each records (device, date, commit, command)."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from koala.model import draft_exact_default, exact_tiles_source

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    # the GPU machine receives the work tree without .git: the caller passes the commit in
    if os.environ.get("KOALA_COMMIT"):
        return os.environ["KOALA_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


_ROOT = Path(__file__).resolve().parent.parent


def source_digest() -> str:
    """sha256 (first 16 hex digits) of every .py file of koala/, kernels/, bench/ and train/, in
    path order: it names the code that ran even where the commit cannot be known (the GPU
    machine's copy of the tree has no reliable git; a missing KOALA_COMMIT once recorded a stale
    commit). Compare with `python -c "from bench.common import source_digest as d; print(d())"`
    at a checkout."""
    h = hashlib.sha256()
    for d in ("koala", "kernels", "bench", "train"):
        for f in sorted((_ROOT / d).rglob("*.py")):
            h.update(str(f.relative_to(_ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def environment() -> dict:
    import triton
    import transformers
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": dev, "date": datetime.date.today().isoformat(), "commit": commit(),
            "source_digest": source_digest(),
            "command": "python " + " ".join([sys.argv[0].replace(str(Path.cwd()) + "/", "")] + sys.argv[1:]),
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "kernels": os.environ.get("KOALA_KERNELS", "1") != "0", "pdl": _pdl(),
            "fused_combine": os.environ.get("KOALA_FUSED_COMBINE", "0") == "1",
            "cast_by_hand": os.environ.get("KOALA_CAST_BY_HAND", "0") not in ("", "0"),
            "pipeline": os.environ.get("KOALA_PIPELINE", "1") != "0",
            "batch_pipeline": os.environ.get("KOALA_BATCH_PIPELINE", "0") not in ("", "0"),
            "exact": os.environ.get("KOALA_EXACT", "1") != "0",
            # prompts prefilled by CUDA graphs (koala/prefill.py); recorded after 86f5fbf, whose two
            # MT-bench files name the setting (mtbench_prefill_graphs_/_eager_86f5fbf.json)
            "prefill_graphs": os.environ.get("KOALA_PREFILL_GRAPHS", "1") != "0",
            "row_tile": int(os.environ.get("KOALA_ROW_TILE", "0") or 0),
            "fused_rope": os.environ.get("KOALA_FUSED_ROPE", "0") not in ("", "0"),
            # RoPE inside the attention launch (rope_tree_attention); recorded after f588e10, before
            # which every forward ran the separate RoPE launch
            "rope_attn": os.environ.get("KOALA_ROPE_ATTN", "0") not in ("", "0"),
            "oproj_combine": os.environ.get("KOALA_OPROJ_COMBINE", "0") not in ("", "0"),
            "oproj_tile": os.environ.get("KOALA_OPROJ_TILE", ""),
            "exact_trees": os.environ.get("KOALA_EXACT_TREES", "0") == "1",
            "draft_exact": draft_exact_default(),
            # exact mode's tiles file (None: its own tiles): koala/exact_tiles.json on sm_90 unless
            # KOALA_EXACT_TILES names another or none; at 7c09695 and before there was no default
            "exact_tiles": exact_tiles_source()}


def _pdl() -> bool:
    """Whether the Triton kernels launch with Programmatic Dependent Launch in this process."""
    try:
        from kernels._common import pdl
        return bool(pdl())
    except Exception:
        return False


def write(name: str, data: dict) -> Path:
    """Write results to $OUT/<name> when set (the GPU machine), else bench/results/<name>."""
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps({**environment(), **data}, indent=2) + "\n")
    return path


def cuda_time_ms(fn, iters: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def gpu_time_ms(fn, warmup: int = 10, rep: int = 60) -> float:
    """Median milliseconds of fn() on the GPU by triton.testing.do_bench: calls queued without a
    host sync between them, L2 flushed (a 256 MB buffer zeroed) before each. Unlike
    cuda_time_ms, it leaves out the host's launch latency on an idle GPU, which a decoding loop
    hides behind the previous graph, and it reads the weights from HBM, as a draft or verify that
    follows another forward does."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def mt_bench(path: str | None = None) -> list[dict]:
    cands = [path] if path else [os.environ.get("KOALA_MT_BENCH", ""), "shared/data/mt_bench.jsonl",
                                 "../shared/data/mt_bench.jsonl", "bench/data/mt_bench.jsonl"]
    for c in cands:
        if c and Path(c).is_file():
            return [json.loads(line) for line in Path(c).read_text().splitlines() if line.strip()]
    raise FileNotFoundError("mt_bench.jsonl not found: pass --questions or set KOALA_MT_BENCH")


def plain_step_ms(lt, context: int, max_seq_len: int = 2048) -> float:
    """Median ms of one graph-replayed plain decode step at `context` committed tokens."""
    from koala import SpeculativeGenerator
    plain = SpeculativeGenerator(lt, None, max_seq_len=max_seq_len)
    dec = plain.plain
    g = dec._graph(True, dec.window(context + 16))

    def step():
        dec.step.zero_(); dec.pos.fill_(context)
        g.replay()
    return cuda_time_ms(step, iters=100)


def plain_step_gpu_ms(lt, context: int, max_seq_len: int = 2048) -> float:
    """plain_step_ms by gpu_time_ms: one queued graph replay, L2 flushed before it."""
    from koala import SpeculativeGenerator
    plain = SpeculativeGenerator(lt, None, max_seq_len=max_seq_len)
    dec = plain.plain
    g = dec._graph(True, dec.window(context + 16))

    def step():
        dec.step.zero_(); dec.pos.fill_(context)
        g.replay()
    return gpu_time_ms(step)
