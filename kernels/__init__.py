"""Triton kernels of koala (issue 5). Each module holds one op: a private @triton.jit kernel, a
host function that checks its inputs and launches, and a plain PyTorch reference `*_ref`.

    rms_norm              kernels.rmsnorm       RMSNorm in fp32, as koala.model.RMSNorm
    add_rms_norm          kernels.rmsnorm       residual add + RMSNorm, one launch
    silu_mul              kernels.swiglu        SiLU(gate) * up over fused gate|up rows
    rope_and_cache_write  kernels.rope_cache    RoPE on q,k + KV-cache write, one launch
    medusa_resblocks      kernels.medusa        H heads x K ResBlocks in K launches
    accept_greedy         kernels.accept        longest accepted tree path + bonus, one launch
    compact_kv            kernels.accept        every layer's KV compaction, one launch
    accept_sampling_chain kernels.spec_sample   speculative sampling along a chain + bonus draw, 3 launches
    tree_attention        kernels.tree_attention masked GQA attention, split-K (2 launches)
    kl_div_rows, fused_kl kernels.distill       training: row-wise KL + gradient + top-1 agreement, one launch

Import the module you need; bench/kernels_notes.md has the integration notes. On sm_90+ every
kernel is launched with Programmatic Dependent Launch (KOALA_PDL=0 turns it off): the rules are in
kernels/_common.py, `python -m kernels.pdl_check` measures it on a GEMV chain.
"""
