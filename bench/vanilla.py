"""Plain decoding of SmolLM2-135M-Instruct, bf16, batch 1, greedy: koala (CUDA-graph step)
against transformers' generate, in the same process. Writes bench/results/vanilla.json.

    python -m bench.vanilla [--new-tokens 256] [--hf-tokens 64]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import mt_bench, plain_step_ms, write
from koala import SpeculativeGenerator, load_target


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=5)
    a = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    lt = load_target("smollm2-135m-instruct", device="cuda", dtype=torch.bfloat16)
    prompts = [q["turns"][0] for q in mt_bench()[: a.prompts * 10: 10]]  # one per category

    def measure(kernels: bool):
        os.environ["KOALA_KERNELS"] = "1" if kernels else "0"
        gen = SpeculativeGenerator(lt, max_seq_len=2048)
        gen.generate(prompts[0], max_new_tokens=64, ignore_eos=True)        # capture graphs
        rows = []
        for p in prompts:
            r = gen.generate(p, max_new_tokens=a.new_tokens, ignore_eos=True)
            s = r.stats
            rows.append({"prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens, "wall_s": s.wall_s,
                         "prefill_s": s.prefill_s,
                         "decode_ms_per_token": (s.wall_s - s.prefill_s) / (s.new_tokens - 1) * 1e3})
        return gen, rows, sorted(r["decode_ms_per_token"] for r in rows)[len(rows) // 2]
    _, rows_pt, pytorch_ms = measure(False)
    gen, rows, koala_ms = measure(True)
    step_ms = plain_step_ms(lt, 300)   # the bare step: one graph replay at 300 committed tokens

    from koala.loading import _gguf_to_cache, default_gguf_path, transformers_api
    AutoModelForCausalLM, = transformers_api("AutoModelForCausalLM")
    hf = AutoModelForCausalLM.from_pretrained(_gguf_to_cache(default_gguf_path()), local_files_only=True,
                                              dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor([gen.encode(prompts[0])], device="cuda")
    am = torch.ones_like(ids)
    hf.generation_config.eos_token_id = None

    def hf_gen(n):
        torch.cuda.synchronize(); t = time.perf_counter()
        hf.generate(ids, attention_mask=am, max_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t
    hf_gen(8)
    t1, tn = hf_gen(1), hf_gen(a.hf_tokens)
    hf_ms = (tn - t1) / (a.hf_tokens - 1) * 1e3
    res = {"model": "SmolLM2-135M-Instruct", "dtype": "bfloat16", "batch": 1, "mode": "greedy",
           "koala_ms_per_token": koala_ms, "koala_graph_step_ms": step_ms,
           "koala_pytorch_path_ms_per_token": pytorch_ms, "koala_pytorch_rows": rows_pt,
           "transformers_generate_ms_per_token": hf_ms, "speedup_vs_transformers": hf_ms / koala_ms,
           "target_ms_per_token": 1.0, "koala_rows": rows,
           "note": "koala: median over prompts of (wall - prefill) / (new_tokens - 1), 256 tokens, EOS ignored, "
                   "one host sync per 16 tokens; graph step: one replay at 300 committed tokens"}
    path = write("vanilla.json", res)
    print(f"\n{'':28}{'ms/token':>10}\n{'koala PyTorch path (graph)':28}{pytorch_ms:10.3f}\n{'koala fused (CUDA graph)':28}{koala_ms:10.3f}\n{'koala bare graph step':28}{step_ms:10.3f}"
          f"\n{'transformers generate':28}{hf_ms:10.3f}\nspeedup {hf_ms / koala_ms:.1f}x -> {path}")


if __name__ == "__main__":
    main()
