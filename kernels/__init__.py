"""Triton kernels of koala (issue 5). Each module holds one op: a private @triton.jit kernel, a
host function that checks its inputs and launches, and a plain PyTorch reference `*_ref`.

    rms_norm              kernels.rmsnorm       RMSNorm in fp32, as koala.model.RMSNorm
    add_rms_norm          kernels.rmsnorm       residual add + RMSNorm, one launch
    silu_mul              kernels.swiglu        SiLU(gate) * up over fused gate|up rows
    linear                kernels.linear        small-M GEMV / row tiles: RMSNorm prologue, bias and
                                                residual epilogue, one launch
    linear_silu           kernels.linear        RMSNorm + gate|up product + SiLU(gate) * up, one launch
    linear_combine        kernels.linear        a split attention's combine in the output projection's
                                                prologue (opt-in, measured slower: bench/RESULTS.md)
    linear_rope_cache     kernels.linear_rope   RMSNorm + q|k|v product + RoPE + KV-cache write, one launch
    rope_and_cache_write  kernels.rope_cache    RoPE on q,k + KV-cache write, one launch
    embed_rope            kernels.embed         token embeddings (and EAGLE's [embedding; feature]) with
                                                the RoPE rows of their positions, one launch
    tree_attention        kernels.tree_attention masked GQA attention, split-K (2 launches)
    rope_tree_attention   kernels.tree_attention RoPE + cache write inside the attention (opt-in)
    exact_tree_attention  kernels.tree_attention a tree's rows with the bits of a chain's (exact mode)
    medusa_resblocks      kernels.medusa        H heads x K ResBlocks in K launches
    argmax, gumbel_argmax kernels.argmax        row-wise argmax over the vocabulary, 2 launches
    topk_logprobs         kernels.topk          row-wise top-k (k <= 16) with log-softmax values, 2 launches
    tree_expand           kernels.tree_draft    a greedy EAGLE tree level's pool rows and next inputs, one launch
    tree_select           kernels.tree_draft    a drafted pool's rerank into the tree to verify, one launch
    chain_indices         kernels.chain_index   a chain iteration's slots, masks and catch-up rows, one launch
    accept_greedy         kernels.accept        longest accepted tree path + bonus, one launch
    compact_kv            kernels.accept        every layer's KV compaction, one launch
    commit_step           kernels.accept        an iteration's accepted tokens and state into the buffers
    accept_sampling_chain kernels.spec_sample   speculative sampling along a chain + bonus draw, 3 launches
    kl_div_rows, fused_kl kernels.distill       training: row-wise KL + gradient + top-1 agreement, one launch

Import the module you need; bench/kernels_notes.md has the integration notes. On sm_90+ every
kernel is launched with Programmatic Dependent Launch (KOALA_PDL=0 turns it off): the rules are in
kernels/_common.py, `python -m kernels.pdl_check` measures it on a GEMV chain.
"""
